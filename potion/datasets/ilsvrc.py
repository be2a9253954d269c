"""ILSVRC (ImageNet-1k) in the layouts it is distributed in, streamed.

``layout="folders"`` (ILSVRC2012's tar files unpacked)::

    <root>/train/<wnid>/<image>.JPEG          one folder per synset, e.g. train/n01440764/
    <root>/val/<image>.JPEG                   flat, e.g. val/ILSVRC2012_val_00000001.JPEG
    <root>/<ground truth file>                the validation labels, one of:
        LOC_val_solution.csv                  ``ImageId,PredictionString`` (Kaggle's; the first word of
                                              PredictionString is the synset)
        a list of ``<file name or stem> <wnid or class index>`` lines (space or comma separated)
        ILSVRC2012_validation_ground_truth.txt  the devkit's: one ILSVRC2012_ID (1..1000) a line for the
                                              files in name order, with ``synsets`` naming the ID order
                                              (e.g. LOC_synset_mapping.txt: line i = the wnid of ID i)

  (a ``val/`` already sorted into synset folders is read like ``train/``). Classes are the
  synset folders of ``train/`` in sorted order (torchvision's ImageFolder order); indices
  run over the files sorted by path.

``layout="parquet"``: Hugging Face's export, ``<root>[/data]/train-XXXXX-of-YYYYY.parquet``
and ``validation-XXXXX-of-YYYYY.parquet`` (the export's test split has no labels), read
as the ``parquet`` dataset reads shards (see ``potion.datasets.sharded`` for the index
order). Its labels are the export's own class order, not the sorted wnids of the folders.

``layout="auto"`` takes ``folders`` when ``<root>/train`` is a folder, else ``parquet``.
Both are streamed: nothing is decoded until a batch asks for it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from potion.datasets.base import DATASETS, DatasetSplits, absent
from potion.datasets.imagefolder import EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource, scan
from potion.errors import PotionError

GROUND_TRUTH_NAMES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val.txt",
                      "val_labels.txt", "ground_truth.txt")
SYNSET_NAMES = ("LOC_synset_mapping.txt", "synsets.txt")
FOLDERS_LAYOUT = ("expected <root>/train/<wnid>/<images> (one folder per synset), <root>/val/<images> (flat) and "
                  "a ground-truth file for val (" + ", ".join(GROUND_TRUTH_NAMES) + " in <root> or <root>/val, "
                  "or give ground_truth=FILE)")


@DATASETS.register("ilsvrc")
def ilsvrc(root: str | Path, image_size: int = 224, layout: str = "auto", ground_truth: str | None = None,
           synsets: str | None = None, workers: int | None = None) -> DatasetSplits:
    """ILSVRC's train tree + validation folder, or its sharded Parquet export (see the module docstring)."""
    if layout not in ("auto", "folders", "parquet"):
        raise PotionError(f"ilsvrc: layout must be auto, folders or parquet, got {layout!r}")
    text = str(root)
    if layout == "auto":
        layout = "folders" if "://" not in text and (Path(text) / "train").is_dir() else "parquet"
    if layout == "parquet":
        from potion.datasets.sharded import sharded_parquet

        splits = sharded_parquet(root, "image", "label", "train-*.parquet", "validation-*.parquet", None, None, 0,
                                 True, image_size, workers)
        splits.mean, splits.std, splits.hflip = IMAGENET_MEAN, IMAGENET_STD, True
        return splits
    root = Path(text)
    if not root.is_dir():
        raise PotionError(f"ilsvrc: {absent(root)}; {FOLDERS_LAYOUT}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise PotionError(f"ilsvrc: image_size must be a positive integer, got {image_size!r}")
    train_files, train_names = scan(root / "train", FOLDERS_LAYOUT, every_class=True)
    classes = sorted(set(train_names))
    lookup = {c: i for i, c in enumerate(classes)}
    val = root / "val"
    if not val.is_dir():
        raise PotionError(f"ilsvrc: {absent(val)}; {FOLDERS_LAYOUT}")
    if any(p.is_dir() and not p.name.startswith(".") for p in val.iterdir()):
        val_files, val_names = scan(val, FOLDERS_LAYOUT)
        for f, name in zip(val_files, val_names):
            if name not in lookup:
                raise PotionError(f"ilsvrc: {Path(f).parent} is synset {name}, which {root / 'train'} has no "
                                  f"folder for; add the synset's training images or remove the folder")
        val_labels = [lookup[n] for n in val_names]
    else:
        val_files, val_labels = flat_validation(root, val, classes, ground_truth, synsets)
    train = ImageFolderSource(train_files, np.array([lookup[c] for c in train_names]), classes, image_size, workers)
    test = ImageFolderSource(val_files, np.array(val_labels), classes, image_size, workers)
    return DatasetSplits(root.name or str(root), train, test, IMAGENET_MEAN, IMAGENET_STD, hflip=True)


def flat_validation(root: Path, val: Path, classes: list[str], ground_truth: str | None,
                    synsets: str | None) -> tuple[list[str], list[int]]:
    """The flat validation images (sorted by name) and their labels from the ground-truth file."""
    files = sorted(str(p) for p in val.iterdir()
                   if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise PotionError(f"ilsvrc: no image files in {val}; {FOLDERS_LAYOUT}")
    gt = _find(root, val, ground_truth, GROUND_TRUTH_NAMES, "ground_truth")
    if gt is None:
        raise PotionError(f"ilsvrc: no ground-truth file for the flat validation folder {val}; {FOLDERS_LAYOUT}")
    lines = [ln.strip() for ln in gt.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if lines and lines[0].split(",")[0] == "ImageId":  # Kaggle's header
        lines = lines[1:]
    lookup = {c: i for i, c in enumerate(classes)}
    if lines and all(ln.isdigit() for ln in lines):  # the devkit's one ID a line
        labels_of = _by_position(gt, lines, files, _find(root, val, synsets, SYNSET_NAMES, "synsets"), lookup)
    else:
        labels_of = _by_name(gt, lines, lookup, len(classes))
    labels = []
    for f in files:
        stem = Path(f).stem
        if stem not in labels_of:
            raise PotionError(f"ilsvrc: {f} has no line in the ground-truth file {gt}; add its label or remove "
                              "the image")
        labels.append(labels_of[stem])
    return files, labels


def _find(root: Path, val: Path, given: str | None, names: tuple[str, ...], param: str) -> Path | None:
    if given is not None:
        path = Path(given) if Path(given).is_absolute() else root / given
        if not path.is_file():
            raise PotionError(f"ilsvrc: {param}: {absent(path, 'file')}")
        return path
    return next((d / n for n in names for d in (root, val) if (d / n).is_file()), None)


def _label(gt: Path, line_no: int, token: str, lookup: dict[str, int], n_classes: int) -> int:
    if token.isdigit():
        if int(token) >= n_classes:
            raise PotionError(f"ilsvrc: line {line_no} of {gt} gives class {token}, but there are only {n_classes} "
                              "synset folders in train/")
        return int(token)
    if token not in lookup:
        raise PotionError(f"ilsvrc: line {line_no} of {gt} names synset {token}, which train/ has no folder for; "
                          "add the synset's training images (train/<wnid>/) or drop its validation images")
    return lookup[token]


def _by_name(gt: Path, lines: list[str], lookup: dict[str, int], n_classes: int) -> dict[str, int]:
    """``<file or stem> <wnid or index>`` lines (the first word of a Kaggle PredictionString)."""
    out = {}
    for i, row in enumerate(csv.reader(lines), start=1):
        words = [w for cell in row for w in cell.split()]
        if len(words) < 2:
            raise PotionError(f"ilsvrc: line {i} of {gt} is not '<image> <synset>'; {FOLDERS_LAYOUT}")
        out[Path(words[0]).stem] = _label(gt, i, words[1], lookup, n_classes)
    return out


def _by_position(gt: Path, lines: list[str], files: list[str], synsets: Path | None,
                 lookup: dict[str, int]) -> dict[str, int]:
    """The devkit's list: line i is the ILSVRC2012_ID of the i-th file by name; ``synsets`` maps IDs to wnids."""
    if synsets is None:
        raise PotionError(f"ilsvrc: {gt} lists class IDs, which need the synset order: give synsets=FILE "
                          f"(LOC_synset_mapping.txt: one '<wnid> <name>' line per ID, in ID order)")
    order = [ln.split()[0] for ln in synsets.read_text().splitlines() if ln.strip()]
    if len(lines) != len(files):
        raise PotionError(f"ilsvrc: {gt} has {len(lines)} labels but the validation folder holds {len(files)} "
                          "images; the devkit's list labels every file in name order")
    out = {}
    for i, (f, token) in enumerate(zip(files, lines), start=1):
        ident = int(token)
        if not 1 <= ident <= len(order):
            raise PotionError(f"ilsvrc: line {i} of {gt} is ID {ident}, outside 1..{len(order)} of {synsets}")
        out[Path(f).stem] = _label(gt, i, order[ident - 1], lookup, len(lookup))
    return out
