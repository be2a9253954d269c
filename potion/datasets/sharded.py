"""Sharded Parquet image sets (Hugging Face's ``train-00000-of-00257.parquet`` exports), streamed.

A split is a glob (``train-*.parquet``), a folder of ``.parquet`` files or one file, on the
local disk or on any filesystem pyarrow opens (``s3://bucket/imagenet/data``). Building the
source reads only the Parquet footers and the label column; ``load`` reads the row groups
that hold the asked-for rows (the last two stay cached per process, because the passes of
a heal read in index order) and decodes just those rows.

**Index order** (what ``--identified``, manifests and deletion sets count in): the shards
sorted by file name (Hugging Face zero-pads the shard number, so this is shard order), then
the rows in file order; image ``i`` is row ``i - offset(shard)`` of the shard whose rows
cover ``i``. The in-memory path (``stream=False``) decodes the same rows in the same order,
so an index means one image on both paths.
"""
from __future__ import annotations

import fnmatch
import posixpath
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from potion.datasets.base import (
    ImageSource,
    channel_histograms,
    check_labels,
    default_workers,
    seeded_subset,
    stats_from_histograms,
)
from potion.datasets.imagefolder import fit
from potion.datasets.parquet import (
    _check_columns, _classes_from_metadata, _probe_channels, decode, place, quiet_decoders,
)
from potion.errors import PotionError, detail_of

CACHED_GROUPS = 2  # row groups of encoded bytes kept per process (a batch may straddle two)
SHARD_LAYOUT = ("every shard of a split is a Parquet file with the image column (struct<bytes, path> or binary "
                "PNG/JPEG) and the integer label column")
STATS_SAMPLE = 5000  # images whose histograms give a streamed set's mean/std (exact below this)


def open_location(root: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path in it: URIs (``s3://``, ``gs://``, ``file://``) through pyarrow,
    anything else as a local path."""
    text = str(root)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise PotionError(f"parquet dataset: cannot open {text} ({e}); give a local folder or a URI "
                              "that pyarrow can open (s3://, gs://, hdfs://, file://)") from None
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def list_shards(fs: pafs.FileSystem, base: str, spec: str) -> list[str]:
    """The files of a split: ``spec`` is a file, a folder (its ``*.parquet``) or a glob, relative
    to ``base``; sorted by name (the index order). Empty when nothing matches."""
    path = spec if posixpath.isabs(spec) else posixpath.join(base, spec)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        folder, pattern = path, "*.parquet"
    else:
        folder, pattern = posixpath.split(path)
        if not any(c in pattern for c in "*?["):
            return []
    try:
        entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (pa.ArrowException, OSError):
        return []
    names = [e.path for e in entries if e.type == pafs.FileType.File and fnmatch.fnmatch(posixpath.basename(e.path), pattern)]
    return sorted(names, key=posixpath.basename)


class ShardedParquetSource(ImageSource):
    """The rows of Parquet shards, decoded on demand (see the module docstring for the order)."""

    streamed = True

    def __init__(self, fs: pafs.FileSystem, files: list[str], image_column: str = "image", label_column: str = "label",
                 image_size: int | None = None, limit: int | None = None, seed: int = 0,
                 workers: int | None = None, classes: list[str] | None = None, limit_name: str = "limit"):
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
            raise PotionError(f"parquet dataset: image_size must be a positive integer or null, got {image_size!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise PotionError(f"parquet dataset: workers must be a non-negative integer or null, got {workers!r}")
        self.fs, self.files = fs, list(files)
        self.image_column, self.label_column, self.image_size = image_column, label_column, image_size
        self.decode_workers = default_workers() if workers is None else workers
        self._handles: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict = OrderedDict()
        counts, group_starts, labels, meta_classes = [], [], [], None
        for i, f in enumerate(self.files):
            pf = self._file(i)
            if i == 0:
                meta_classes = _classes_from_metadata(pf.schema_arrow, label_column)
            _check_columns(Path(f), pf.schema_arrow, image_column, label_column, SHARD_LAYOUT)
            md = pf.metadata
            counts.append(md.num_rows)
            group_starts.append(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]))
            labels.append(self._read(i, lambda: pf.read(columns=[label_column]).column(label_column), "its labels"))
        self.file_starts = np.cumsum([0] + counts).astype(np.int64)
        self.group_starts = group_starts
        total = int(self.file_starts[-1])
        if total == 0:
            raise PotionError(f"parquet dataset: the shards {self._named()} hold no rows")
        column = pa.chunked_array([c for col in labels for c in col.chunks], type=labels[0].type)
        if column.null_count:
            raise PotionError(f"parquet dataset: column '{label_column}' of {self._named()} has missing labels")
        self.rows = seeded_subset(total, limit, seed, limit_name)  # position → row of the concatenated shards
        self.labels = column.to_numpy().astype(np.int64)[self.rows]
        self.meta_classes = meta_classes  # the names the shards carry, if any
        self.classes = classes or meta_classes or [str(c) for c in range(int(self.labels.max()) + 1)]
        if classes or meta_classes:
            check_labels(self.labels, self.classes, f"parquet dataset {self._named()}")
        first = self.locate(np.array([0]))[0]
        blob = self._group(int(first[0]), int(first[1]))[int(first[2])]
        if blob is None:
            raise PotionError(f"parquet dataset: row 0 of {self.files[first[0]]} has no image bytes")
        self.mode = "L" if _probe_channels(blob, int(first[2]), Path(self.files[first[0]])) == 1 else "RGB"
        self.image_shape = tuple(self.load(np.array([0]))[0].shape)  # type: ignore[assignment]

    def __getstate__(self) -> dict:
        # Loader workers and Ray tasks get the index, not open files or cached bytes.
        state = dict(self.__dict__)
        state["_handles"], state["_groups"] = {}, OrderedDict()
        return state

    def _named(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{self.files[0]} … ({len(self.files)} files)"

    def _read(self, i: int, fn, what: str):
        try:
            return fn()
        except (pa.ArrowException, OSError) as e:
            raise PotionError(f"parquet dataset: {self.files[i]} is not a readable Parquet file: {what} cannot be "
                              "read, the shard is truncated or damaged; download or write that shard again",
                              detail=detail_of(e)) from None

    def _file(self, i: int) -> pq.ParquetFile:
        if i not in self._handles:
            self._handles[i] = self._read(i, lambda: pq.ParquetFile(self.files[i], filesystem=self.fs), "the footer")
        return self._handles[i]

    def _group(self, i: int, g: int) -> list:
        """The encoded images of row group ``g`` of shard ``i`` (a small per-process cache)."""
        key = (i, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        col = self._read(i, lambda: self._file(i).read_row_group(g, columns=[self.image_column]).column(0),
                         f"row group {g}")
        col = col.combine_chunks()
        if pa.types.is_struct(col.type):
            col = col.field("bytes")
        blobs = col.to_pylist()
        self._groups[key] = blobs
        while len(self._groups) > CACHED_GROUPS:
            self._groups.popitem(last=False)
        return blobs

    def locate(self, indices: np.ndarray) -> np.ndarray:
        """``(n, 3)``: the shard, the row group in it and the row in that group of each position."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        shard = np.searchsorted(self.file_starts, rows, side="right") - 1
        local = rows - self.file_starts[shard]
        out = np.empty((len(rows), 3), dtype=np.int64)
        for k, (s, r) in enumerate(zip(shard, local)):
            g = int(np.searchsorted(self.group_starts[s], r, side="right") - 1)
            out[k] = (s, g, r - self.group_starts[s][g])
        return out

    def load(self, indices: np.ndarray) -> torch.Tensor:
        where = self.locate(indices)
        out: torch.Tensor | None = None
        with quiet_decoders():
            # Row group by row group, so that a batch reads each group once.
            for s, g in dict.fromkeys(map(tuple, where[:, :2].tolist())):
                blobs = self._group(s, g)
                for k in np.flatnonzero((where[:, 0] == s) & (where[:, 1] == g)):
                    row = int(self.group_starts[s][g] + where[k, 2])
                    out = place(out, len(where), k, self._decode(blobs[int(where[k, 2])], s, row),
                                lambda got, want: (
                                    f"parquet dataset: row {row} of {self.files[s]} is a {got} image but the "
                                    f"set's images are {want}; give the dataset an image_size to resize every "
                                    "image to one size on load"))
        if out is None:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return out

    def _decode(self, blob, s: int, row: int) -> torch.Tensor:
        if blob is None:
            raise PotionError(f"parquet dataset: row {row} of {self.files[s]} has no image bytes")
        img = decode(blob, self.mode, row, Path(self.files[s]))
        return img if self.image_size is None else fit(img, self.image_size).contiguous()

    def channel_stats(self, sample: int = STATS_SAMPLE, seed: int = 0, batch: int = 256):
        """Mean and std from a seeded sample of ``sample`` images (all of them, exactly, when fewer)."""
        pos = seeded_subset(len(self), sample, seed, "sample")
        hist = sum(channel_histograms(self.load(pos[i:i + batch])) for i in range(0, len(pos), batch))
        return stats_from_histograms(hist)

    def fingerprint(self) -> list:
        """What identifies the data without reading it: each shard's name, size and row count."""
        sizes = [self.fs.get_file_info(f).size for f in self.files]
        return [[posixpath.basename(f), int(sz or 0), int(b - a)]
                for f, sz, a, b in zip(self.files, sizes, self.file_starts[:-1], self.file_starts[1:])]


STREAM_BYTES = 1 << 30  # encoded train data above which stream=None streams (about 2-8 GB decoded)
SHARD_DEFAULTS = {"train.parquet": ("train-*.parquet", "data/train-*.parquet"),
                  "test.parquet": ("test-*.parquet", "data/test-*.parquet")}


def split_files(fs: pafs.FileSystem, base: str, spec: str, root, layout: str) -> list[str]:
    """The shards of one split, with the default single file falling back to HF's shard names and
    a bare name also looked for under ``data/`` (where HF's exports keep their shards)."""
    fallbacks = SHARD_DEFAULTS.get(spec, ()) + (() if "/" in spec else (f"data/{spec}",))
    for candidate in dict.fromkeys((spec, *fallbacks)):
        files = list_shards(fs, base, candidate)
        if files:
            return files
    path = spec if posixpath.isabs(spec) else posixpath.join(base, spec)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise PotionError(f"parquet dataset: {_absent(root)}; {layout}")
    what = f"no Parquet files match {path}" if any(c in spec for c in "*?[") else f"file {path} does not exist"
    extra = f" (nor {' or '.join(dict.fromkeys(fallbacks))})" if fallbacks else ""
    raise PotionError(f"parquet dataset: {what}{extra}; {layout}")


def _absent(root) -> str:
    from potion.datasets.base import absent

    return absent(Path(root)) if "://" not in str(root) else f"{root} is not a folder"


def sharded_parquet(root, image_column: str, label_column: str, train_file: str, test_file: str,
                    train_limit: int | None, test_limit: int | None, seed: int, stream: bool | None,
                    image_size: int | None, workers: int | None):
    """The ``parquet`` dataset over shards, streamed or (``stream=False``) decoded into memory."""
    from potion.datasets.base import ArraySource, DatasetSplits, channel_stats
    from potion.datasets.parquet import LAYOUT, reconcile_classes

    layout = LAYOUT.format(train_file=train_file, test_file=test_file, image_column=image_column,
                           label_column=label_column) + (
        "; each of the two may also be a glob or a folder of shards (train-00000-of-00004.parquet ...), "
        "read in file-name order")
    fs, base = open_location(root)
    train_files = split_files(fs, base, train_file, root, layout)
    test_files = split_files(fs, base, test_file, root, layout)
    if stream is None:
        stream = sum(fs.get_file_info(f).size or 0 for f in train_files) > STREAM_BYTES
    common = dict(image_column=image_column, label_column=label_column, image_size=image_size, seed=seed,
                  workers=workers)
    train = ShardedParquetSource(fs, train_files, limit=train_limit, limit_name="train_limit", **common)
    test = ShardedParquetSource(fs, test_files, limit=test_limit, limit_name="test_limit", **common)
    classes = reconcile_classes(root, train.meta_classes, test.meta_classes, train.labels, test.labels)
    train.classes = test.classes = classes
    if train.image_shape != test.image_shape:
        raise PotionError(
            f"parquet dataset {root}: train images are {train.image_shape} (C, H, W) but test images are "
            f"{test.image_shape}; both splits must hold images of one shape (or give an image_size)")
    name = posixpath.basename(base.rstrip("/")) or str(root)
    hflip = train.image_shape[0] == 3  # flipping a digit makes another glyph; photographs are flip-invariant
    if not stream:
        train_mem = ArraySource(train.load(np.arange(len(train))), train.labels, classes)
        test_mem = ArraySource(test.load(np.arange(len(test))), test.labels, classes)
        mean, std = channel_stats(train_mem.images)
        return DatasetSplits(name, train_mem, test_mem, mean, std, hflip=hflip)
    mean, std = train.channel_stats(seed=seed)
    return DatasetSplits(name, train, test, mean, std, hflip=hflip)
