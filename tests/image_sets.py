"""Small image sets written the ways big ones are stored: Parquet shards and folder trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from potion.jobs.data import Split, encode_split


def smooth_images(n: int, seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """uint8 (N, C, H, W) images with some structure (blurred noise), so that JPEG keeps them apart."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, channels, max(2, size // 4), max(2, size // 4))).astype(np.float32)
    big = np.kron(low, np.ones((1, 1, size // low.shape[2] + 1, size // low.shape[3] + 1)))[:, :, :size, :size]
    return np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8)


def write_shards(folder: Path, prefix: str, images: np.ndarray, labels, n_shards: int, classes: str | None = "a,b,c",
                 jpeg: int | None = None, row_group: int | None = None) -> list[Path]:
    """``<prefix>-0000i-of-0000n.parquet`` in HF's format, rows split in order over the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(labels)), n_shards)):
        table = encode_split(Split(images[part], labels[part]), jpeg)
        if classes is not None:
            table = table.replace_schema_metadata({"classes": classes})
        path = folder / f"{prefix}-{i:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        paths.append(path)
    return paths


def save_image(path: Path, chw: np.ndarray, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format=fmt)
