"""Class-per-folder image trees (ImageNet style), decoded on demand.

Layout::

    <root>/<train_dir>/<class name>/**/<image>.{jpg,jpeg,png,...}
    <root>/<test_dir>/<class name>/**/<image>...

Too large to hold decoded in memory, so the source keeps file paths and decodes a batch
when it is asked for; labels come from the folder names without opening any file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from potion.datasets.base import DATASETS, DatasetSplits, ImageSource, absent, default_workers
from potion.errors import PotionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}


class ImageFolderSource(ImageSource):
    """RGB images resized (shorter side) and centre-cropped to ``image_size`` on load."""

    streamed = True

    def __init__(self, files: list[str], labels: np.ndarray, classes: list[str], image_size: int,
                 workers: int | None = None):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise PotionError(f"imagefolder: workers must be a non-negative integer or null, got {workers!r}")
        self.decode_workers = default_workers() if workers is None else workers
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(indices), *self.image_shape), dtype=torch.uint8)
        for i, idx in enumerate(np.asarray(indices)):
            out[i] = self.load_one(int(idx))
        return out

    def load_one(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise PotionError(f"imagefolder: cannot decode {path} ({e}); delete or replace the file") from None
        return TF.pil_to_tensor(fit(img, self.image_size))


def fit(img, size: int):
    """Shorter side resized to ``size`` (bilinear, antialiased), then the centre ``size`` × ``size``
    crop; ``img`` is a PIL image or a uint8 ``(C, H, W)`` tensor, and comes back as one."""
    img = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(img, [size, size])


@DATASETS.register("imagefolder")
def imagefolder(
    root: str | Path, image_size: int = 224, train_dir: str = "train", test_dir: str = "val",
    workers: int | None = None,
) -> DatasetSplits:
    """``workers``: loader processes that decode batches (default: half the cores, at most 4)."""
    root = Path(root)
    layout = (
        f"expected <root>/{train_dir}/<class name>/<image files> and <root>/{test_dir}/<class name>/<image files> "
        f"(one folder per class, image extensions {', '.join(sorted(EXTENSIONS))})"
    )
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise PotionError(f"imagefolder: image_size must be a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise PotionError(f"imagefolder: {absent(root)}; {layout}")
    train_files, train_names = scan(root / train_dir, layout, every_class=True)
    test_files, test_names = scan(root / test_dir, layout)
    classes = sorted(set(train_names))
    unknown = sorted(set(test_names) - set(classes))
    if unknown:
        raise PotionError(
            f"imagefolder: {root / test_dir / unknown[0]} is a class that {root / train_dir} does not have; {layout}"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    train = ImageFolderSource(train_files, np.array([lookup[c] for c in train_names]), classes, image_size, workers)
    test = ImageFolderSource(test_files, np.array([lookup[c] for c in test_names]), classes, image_size, workers)
    return DatasetSplits(root.name or str(root), train, test, IMAGENET_MEAN, IMAGENET_STD, hflip=True)


def scan(split: Path, layout: str, every_class: bool = False) -> tuple[list[str], list[str]]:
    """Image paths (sorted, so indices are stable) and the class folder of each.

    With ``every_class`` (the training split, which defines the classes) a class folder
    without images is an error: dropping it would silently renumber every later class."""
    if not split.is_dir():
        raise PotionError(f"imagefolder: {absent(split)}; {layout}")
    files: list[str] = []
    names: list[str] = []
    class_dirs = sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    for d in class_dirs:
        found = sorted(
            str(p) for p in d.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        if every_class and not found:
            raise PotionError(
                f"imagefolder: class folder {d} has no image files; add its images or remove the folder "
                f"(classes are numbered in sorted folder order, so an empty one would shift the labels); {layout}"
            )
        files.extend(found)
        names.extend([d.name] * len(found))
    if not files:
        raise PotionError(f"imagefolder: no image files in class folders under {split}; {layout}")
    return files, names
