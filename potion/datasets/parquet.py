"""Image datasets exported to Parquet the way Hugging Face does it.

Layout (one file per split)::

    <root>/train.parquet, <root>/test.parquet
    column <image_column>: struct<bytes: binary, path: string> (or plain binary), encoded PNG/JPEG
    column <label_column>: integer class index
    schema metadata 'classes': class names, comma-separated (optional)

Everything is decoded into memory once: 60,000 MNIST PNGs take about a second with
torchvision's decoder (two with PIL, the fallback), so a decoded-array cache would save
little and add a way to go stale.
"""
from __future__ import annotations

import contextlib
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from potion.datasets.base import (
    DATASETS,
    ArraySource,
    DatasetSplits,
    absent,
    channel_stats,
    check_labels,
    seeded_subset,
)
from potion.errors import PotionError, detail_of

LAYOUT = (
    "expected <root>/{train_file} and <root>/{test_file}: Parquet files with an image column "
    "'{image_column}' (struct<bytes: binary, path: string> or binary holding PNG/JPEG bytes), an "
    "integer label column '{label_column}', and optionally the class names comma-separated in the "
    "schema metadata key 'classes'"
)


@DATASETS.register("parquet")
def parquet(
    root: str | Path,
    image_column: str = "image",
    label_column: str = "label",
    train_file: str = "train.parquet",
    test_file: str = "test.parquet",
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    stream: bool | None = None,
    image_size: int | None = None,
    workers: int | None = None,
) -> DatasetSplits:
    """Load both splits; ``*_limit`` keeps a seeded random subset (tests, CPU benchmarks).

    ``train_file``/``test_file`` may also be globs or folders of shards (by default
    ``train-*.parquet`` / ``test-*.parquet``, also under ``data/``, when the single file is
    absent), and ``root`` a URI pyarrow opens. ``stream``: decode on demand with ``workers``
    loader processes (True), decode everything now (False), or stream when the train files
    exceed ``STREAM_BYTES`` (None). ``image_size`` resizes (shorter side) and centre-crops.
    """
    if stream not in (None, True, False):
        raise PotionError(f"parquet dataset: stream must be true, false or null, got {stream!r}")
    from potion.datasets.sharded import STREAM_BYTES, sharded_parquet

    train_path = Path(root) / train_file
    if ("://" in str(root) or stream or image_size is not None or not train_path.is_file()
            or (stream is None and train_path.stat().st_size > STREAM_BYTES)):
        return sharded_parquet(root, image_column, label_column, train_file, test_file, train_limit, test_limit,
                               seed, stream, image_size, workers)
    root = Path(root)
    layout = LAYOUT.format(
        train_file=train_file, test_file=test_file, image_column=image_column, label_column=label_column
    )
    if not root.is_dir():
        raise PotionError(f"parquet dataset: {absent(root)}; {layout}")
    train_images, train_labels, train_classes = read_split(
        root / train_file, image_column, label_column, train_limit, seed, layout, "train_limit"
    )
    test_images, test_labels, test_classes = read_split(
        root / test_file, image_column, label_column, test_limit, seed, layout, "test_limit"
    )
    classes = reconcile_classes(root, train_classes, test_classes, train_labels, test_labels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise PotionError(
            f"parquet dataset {root}: train images are {tuple(train_images.shape[1:])} (C, H, W) but test "
            f"images are {tuple(test_images.shape[1:])}; both splits must hold images of one shape"
        )
    train = ArraySource(train_images, train_labels, classes)
    test = ArraySource(test_images, test_labels, classes)
    mean, std = channel_stats(train.images)
    # Flipping a digit makes another glyph; colour photographs are flip-invariant.
    return DatasetSplits(root.name or str(root), train, test, mean, std, hflip=train.image_shape[0] == 3)


def read_split(
    path: Path, image_column: str, label_column: str, limit: int | None, seed: int, layout: str, limit_name: str
) -> tuple[torch.Tensor, np.ndarray, list[str] | None]:
    """Decoded uint8 images, int64 labels and the class names of one Parquet file."""
    if not path.is_file():
        raise PotionError(f"parquet dataset: {absent(path, 'file')}; {layout}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise PotionError(f"parquet dataset: {path} is not a readable Parquet file ({e}); {layout}") from None
    _check_columns(path, schema, image_column, label_column, layout)
    try:
        table = pq.read_table(path, columns=[image_column, label_column])
    except (pa.ArrowException, OSError) as e:
        raise PotionError(f"parquet dataset: could not read {path} ({e}); {layout}") from None

    rows = seeded_subset(table.num_rows, limit, seed, limit_name)
    if len(rows) == 0:
        raise PotionError(f"parquet dataset: {path} has no rows; {layout}")
    if len(rows) < table.num_rows:
        table = table.take(pa.array(rows))
    labels_col = table.column(label_column)
    if labels_col.null_count:
        raise PotionError(f"parquet dataset: column '{label_column}' of {path} has missing labels")
    labels = labels_col.to_numpy().astype(np.int64)

    images_col = table.column(image_column).combine_chunks()
    if pa.types.is_struct(images_col.type):
        images_col = images_col.field("bytes")
    if images_col.null_count:
        raise PotionError(f"parquet dataset: column '{image_column}' of {path} has rows without image bytes")
    images = decode_all(images_col.to_pylist(), rows, path)
    return images, labels, _classes_from_metadata(schema, label_column)


def decode_all(blobs: list[bytes], rows: np.ndarray, path: Path) -> torch.Tensor:
    """Decode encoded images into one uint8 (N, C, H, W) tensor.

    Grey stays one channel and colour becomes three (alpha dropped): the first image
    decides, the others are converted to match.
    """
    mode = "L" if _probe_channels(blobs[0], rows[0], path) == 1 else "RGB"
    out: torch.Tensor | None = None
    with quiet_decoders():
        for i, blob in enumerate(blobs):
            out = place(out, len(blobs), i, decode(blob, mode, rows[i], path), lambda got, want: (
                f"parquet dataset: row {rows[i]} of {path} is a {got} image but row {rows[0]} is {want}; all "
                "images of a Parquet dataset must have one size (resize them, or use the 'imagefolder' "
                "dataset, which resizes on load)"))
    assert out is not None
    return out


try:  # deprecated in torchvision 0.29 but twice as fast as PIL; PIL takes over once it is gone
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode_image

    USE_TORCHVISION = True
except ImportError:  # pragma: no cover
    USE_TORCHVISION = False


@contextlib.contextmanager
def quiet_decoders():
    """torchvision warns that its decoders are deprecated and that the blobs are read-only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def place(out: torch.Tensor | None, n: int, i: int, img: torch.Tensor, mismatch) -> torch.Tensor:
    """Put image ``i`` of ``n`` into ``out`` (made at the first image's shape); ``mismatch(got,
    want)`` words the error for an image of another size."""
    if out is None:
        out = torch.empty((n, *img.shape), dtype=torch.uint8)
    elif img.shape != out.shape[1:]:
        raise PotionError(mismatch(tuple(img.shape[1:]), tuple(out.shape[2:])))
    out[i] = img
    return out


def decode(blob: bytes, mode: str, row: int, path: Path) -> torch.Tensor:
    """One encoded image → uint8 (C, H, W); ``mode`` is "L" (grey) or "RGB"."""
    try:
        if USE_TORCHVISION:
            damage = png_damage(blob)
            if damage:
                raise ValueError(damage)
            data = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
            return _tv_decode_image(data, mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB)
        with Image.open(io.BytesIO(blob)) as img:
            arr = np.asarray(img.convert(mode))
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
    except (RuntimeError, ValueError, OSError, UnidentifiedImageError) as e:
        raise undecodable(row, path, e) from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damage(blob: bytes) -> str | None:
    """Why a PNG is damaged (a chunk cut short or failing its CRC, no IEND), or None.

    torchvision's PNG decoder crashes the process (SIGSEGV) on some damaged data instead of
    raising, so PNGs are checked before it sees them; the CRCs cost about 4 % of decoding.
    Not PNG: None (JPEG errors are raised properly)."""
    if not blob.startswith(PNG_SIGNATURE):
        return None
    pos, n = len(PNG_SIGNATURE), len(blob)
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", blob, pos)
        end = pos + 12 + length
        if end > n:
            return f"PNG chunk {kind!r} at byte {pos} runs past the end of the data ({n} bytes): truncated"
        if zlib.crc32(blob[pos + 4:end - 4]) != struct.unpack_from(">I", blob, end - 4)[0]:
            return f"PNG chunk {kind!r} at byte {pos} fails its CRC check"
        if kind == b"IEND":
            return None
        pos = end
    return "PNG data ends without an IEND chunk: truncated"


def undecodable(row: int, path: Path, e: BaseException) -> PotionError:
    return PotionError(f"parquet dataset: row {row} of {path} is not a decodable image (damaged, or not PNG/JPEG); "
                       "replace or drop that row", detail=detail_of(e))


def _probe_channels(blob: bytes, row: int, path: Path) -> int:
    """1 for grey images, 3 for everything else (colour, palette); reads the header only."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except (OSError, UnidentifiedImageError) as e:
        raise undecodable(row, path, e) from None


def _check_columns(path: Path, schema: pa.Schema, image_column: str, label_column: str, layout: str) -> None:
    names = schema.names
    for col, param in ((image_column, "image_column"), (label_column, "label_column")):
        if col not in names:
            raise PotionError(
                f"parquet dataset: {path} has no column '{col}' (columns: {', '.join(names)}); "
                f"set the dataset parameter {param}; {layout}"
            )
    itype = schema.field(image_column).type
    is_binary = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)  # noqa: E731
    ok = is_binary(itype) or (
        pa.types.is_struct(itype) and itype.get_field_index("bytes") >= 0 and is_binary(itype.field("bytes").type)
    )
    if not ok:
        raise PotionError(f"parquet dataset: column '{image_column}' of {path} has type {itype}; {layout}")
    ltype = schema.field(label_column).type
    if not pa.types.is_integer(ltype):
        raise PotionError(f"parquet dataset: column '{label_column}' of {path} has type {ltype}, not an integer; {layout}")


def _classes_from_metadata(schema: pa.Schema, label_column: str) -> list[str] | None:
    meta = schema.metadata or {}
    if b"classes" in meta:
        return [c.strip() for c in meta[b"classes"].decode().split(",")]
    # Hugging Face's own exports keep ClassLabel names in a JSON blob.
    try:
        info = json.loads(meta[b"huggingface"])
        names = info["info"]["features"][label_column]["names"]
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    except (KeyError, TypeError, ValueError):
        pass
    return None


def reconcile_classes(
    root: Path, train: list[str] | None, test: list[str] | None, train_labels: np.ndarray, test_labels: np.ndarray
) -> list[str]:
    if train is not None and test is not None and train != test:
        raise PotionError(
            f"parquet dataset {root}: train and test files name different classes "
            f"({','.join(train)} vs {','.join(test)}); both must carry the same 'classes' metadata"
        )
    classes = train if train is not None else test
    if classes is None:
        top = int(max(train_labels.max(), test_labels.max()))
        classes = [str(c) for c in range(top + 1)]
    check_labels(train_labels, classes, f"parquet dataset {root} (train)")
    check_labels(test_labels, classes, f"parquet dataset {root} (test)")
    return classes
