"""``potion data``: turn the standard downloads into the Parquet layout the suites read.

Sources (nothing is downloaded; point ``--from`` at what you fetched):

- ``mnist``: torchvision's raw files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (the folder itself, or a root holding ``MNIST/raw/``).
- ``cifar10`` / ``cifar100``: the official python archive (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``) or the folder unpacked from it.
- ``hf``: a Hugging Face Parquet export (``train-00000-of-0000N.parquet`` …, in the folder
  or under ``data/``), with the class names from its ``huggingface`` schema metadata.

Output, one folder per dataset (``potion.datasets.parquet`` reads it)::

    <out>/train.parquet, <out>/test.parquet
    columns image: struct<bytes: binary, path: string> (PNG, or JPEG with --jpeg-quality),
            label: int64; schema metadata 'classes': the class names, comma-separated

The folder is built aside and swapped in only when complete.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from potion.errors import PotionError
from potion.io import atomic_write, staged_output_dir
from potion.registry import Registry

DATA_ENV = "POTION_DATA"
DEFAULT_DATA_ROOT = "data"  # inside the clone; $POTION_DATA or --data-root override it
SPLITS = ("train", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


@dataclass
class Prepared:
    """What a source hands the writer: both splits and the class names, or, for sources
    that are already encoded (Hugging Face), ready Arrow tables."""

    classes: list[str]
    splits: dict[str, Split] | None = None
    tables: dict[str, pa.Table] | None = None


SOURCES: Registry[Callable[..., Prepared]] = Registry("data source")


def data_root(flag: str | os.PathLike | None = None) -> Path:
    """``--data-root``, else ``$POTION_DATA``, else ``data/`` in the current folder."""
    return Path(flag or os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT)


def default_name(source: str, jpeg_quality: int | None, src: Path) -> str:
    if source == "hf":
        return src.name if src.is_dir() else src.stem
    return f"{source}-jpeg" if jpeg_quality else source


def prepare_data(source: str, src: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 data_root_flag: str | None = None, jpeg_quality: int | None = None, overwrite: bool = False,
                 image_column: str | None = None, label_column: str = "label") -> dict:
    """Convert ``src`` and write ``out`` (default ``<data root>/<name>``); returns a summary."""
    fn = SOURCES.get(source)
    src = Path(src).expanduser()
    if not src.exists():
        raise PotionError(f"potion data {source}: {src} does not exist; pass --from the downloaded file or folder")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 95:
        raise PotionError(f"--jpeg-quality must lie in 1..95, got {jpeg_quality}")
    out = Path(out) if out else data_root(data_root_flag) / default_name(source, jpeg_quality, src)
    kwargs = {"image_column": image_column, "label_column": label_column} if source == "hf" else {}
    prepared = fn(src, **kwargs)
    summary = {"out": str(out), "classes": len(prepared.classes)}
    with staged_output_dir(out, overwrite) as stage:
        for split in SPLITS:
            table = (prepared.tables[split] if prepared.tables is not None
                     else encode_split(prepared.splits[split], jpeg_quality))
            table = table.replace_schema_metadata({"classes": ",".join(prepared.classes)})
            atomic_write(stage / f"{split}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
            summary[split] = table.num_rows
    return summary


# ---------------------------------------------------------------- encoding
def encode_split(split: Split, jpeg_quality: int | None) -> pa.Table:
    """uint8 NCHW images → the Hugging Face image column (PNG, or JPEG at ``jpeg_quality``)."""
    from PIL import Image

    blobs = []
    for img in split.images:
        arr = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
        buf = io.BytesIO()
        pil = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
        if jpeg_quality:
            pil.save(buf, format="JPEG", quality=int(jpeg_quality))
        else:
            pil.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": b, "path": None} for b in blobs], type=image_type)
    return pa.table({"image": images, "label": pa.array(split.labels.astype(np.int64), pa.int64())})


# ---------------------------------------------------------------- MNIST (idx files)
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PotionError(f"cannot read {path} ({e}); expected an idx file as torchvision downloads it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PotionError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PotionError(f"{path}: header says {tuple(dims)} = {int(np.prod(dims))} bytes, file has {body.size}")
    return body.reshape(tuple(dims))


def _find(folder: Path, stem: str) -> Path | None:
    for base in (folder, folder / "raw", folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


@SOURCES.register("mnist")
def mnist(src: Path) -> Prepared:
    if not src.is_dir():
        raise PotionError(f"potion data mnist: {src} is not a folder; pass the folder holding torchvision's raw "
                          "idx files (train-images-idx3-ubyte[.gz], ...) or its MNIST/raw parent")
    splits = {}
    for split, (img_stem, lab_stem) in MNIST_FILES.items():
        img_path, lab_path = _find(src, img_stem), _find(src, lab_stem)
        if img_path is None or lab_path is None:
            missing = img_stem if img_path is None else lab_stem
            raise PotionError(f"potion data mnist: no {missing}[.gz] in {src} (or its raw/, MNIST/raw/)")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PotionError(f"potion data mnist: {img_path} holds {images.shape} and {lab_path} {labels.shape}; "
                              "expected (N, H, W) images and N labels")
        splits[split] = Split(images[:, None], labels.astype(np.int64))
    return Prepared([str(i) for i in range(10)], splits=splits)


# ---------------------------------------------------------------- CIFAR (python pickles)
def _safe_extract(tar: tarfile.TarFile, dest: str) -> None:
    """Extract only plain files and folders inside ``dest``: the "data" filter where Python
    has extraction filters (3.11.4+), the same refusal by hand where it has not."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = Path(dest).resolve()
    for m in tar.getmembers():
        target = (root / m.name).resolve()
        if not (m.isfile() or m.isdir()) or (target != root and root not in target.parents):
            raise tarfile.TarError(f"refusing archive member {m.name!r}: not a plain file inside the archive")
    tar.extractall(dest)


def _cifar(name: str, src: Path) -> Prepared:
    from potion.datasets.cifar import load_cifar

    with tempfile.TemporaryDirectory(prefix="potion-data-") as tmp:
        root = src
        if src.is_file():
            try:
                with tarfile.open(src) as tar:
                    _safe_extract(tar, tmp)
            except (tarfile.TarError, OSError) as e:
                raise PotionError(f"potion data {name}: cannot unpack {src} ({e}); expected the official "
                                  f"python archive ({name.replace('cifar', 'cifar-')}-python.tar.gz)") from None
            root = Path(tmp)
        splits = load_cifar(name, root)
        out = {s: Split(getattr(splits, s).images.numpy(), np.asarray(getattr(splits, s).labels, dtype=np.int64))
               for s in SPLITS}
        return Prepared(list(splits.train.classes), splits=out)


@SOURCES.register("cifar10")
def cifar10(src: Path) -> Prepared:
    return _cifar("cifar10", src)


@SOURCES.register("cifar100")
def cifar100(src: Path) -> Prepared:
    return _cifar("cifar100", src)


# ---------------------------------------------------------------- Hugging Face Parquet
def _hf_shards(src: Path, split: str) -> list[Path]:
    if src.is_file():
        raise PotionError("potion data hf: pass the folder of the export (it holds train-*.parquet and test-*.parquet)")
    found: list[Path] = []
    for base in (src, src / "data"):
        found = sorted(base.glob(f"{split}-*.parquet")) or sorted(base.glob(f"{split}.parquet"))
        if found:
            return found
    raise PotionError(f"potion data hf: no {split}-*.parquet in {src} or {src / 'data'}")


def _hf_classes(schema: pa.Schema, label_column: str) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


@SOURCES.register("hf")
def hugging_face(src: Path, image_column: str | None = None, label_column: str = "label") -> Prepared:
    tables, classes = {}, None
    for split in SPLITS:
        shards = _hf_shards(src, split)
        try:
            table = pa.concat_tables([pq.read_table(p) for p in shards], promote_options="default")
        except (pa.ArrowException, OSError) as e:
            raise PotionError(f"potion data hf: cannot read {shards[0].parent}/{split}-*.parquet ({e})") from None
        col = image_column or next((c for c in ("image", "img") if c in table.column_names), None)
        if col is None or col not in table.column_names or label_column not in table.column_names:
            raise PotionError(f"potion data hf: {shards[0]} has columns {', '.join(table.column_names)}; name the "
                              "image and label columns with --image-column / --label-column")
        classes = classes or _hf_classes(pq.read_schema(shards[0]), label_column)
        tables[split] = pa.table({"image": table.column(col), "label": table.column(label_column).cast(pa.int64())})
    if classes is None:
        n = int(max(pc.max(tables[s].column("label")).as_py() for s in SPLITS)) + 1
        classes = [str(i) for i in range(n)]
    return Prepared(classes, tables=tables)
