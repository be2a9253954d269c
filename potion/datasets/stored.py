"""The owner's data used exactly as stored: no trigger pasted, the owner's transform.

For a model Potion did not train, the poison is already in the stored images and the
owner knows how the model expects its input (mean/std per channel, image size). The
views here are ordinary :class:`LabeledView` objects with an all-False trigger mask, so
everything downstream (importances, metrics, the search) is the same code as for
Potion's own runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from potion.datasets.base import ArraySource, ImageSource
from potion.datasets.parquet import LAYOUT, read_split
from potion.datasets.views import LabeledView
from potion.errors import PotionError


class ResizedSource(ImageSource):
    """``source`` resized (bilinear, antialiased) to ``size`` × ``size`` on load."""

    def __init__(self, source: ImageSource, size: int):
        self.source = source
        self.size = int(size)
        self.labels = source.labels
        self.classes = source.classes
        self.streamed = source.streamed
        self.decode_workers = source.decode_workers
        self.image_shape = (source.image_shape[0], self.size, self.size)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        x = self.source.load(indices)
        if tuple(x.shape[2:]) == (self.size, self.size):
            return x
        y = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return y.round_().clamp_(0, 255).to(torch.uint8)


def check_transform(channels: int, mean: Sequence[float], std: Sequence[float], image_size: int | None) -> None:
    for name, vals in (("--mean", mean), ("--std", std)):
        if len(vals) != channels:
            raise PotionError(
                f"{name} has {len(vals)} value(s) but the images have {channels} channel(s); give one per channel"
            )
    if any(not s > 0 for s in std):
        raise PotionError(f"--std values must be positive, got {list(std)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise PotionError(f"--image-size must be a positive integer, got {image_size!r}")


def resized(source: ImageSource, image_size: int | None) -> ImageSource:
    return source if image_size is None else ResizedSource(source, image_size)


def stored_view(source: ImageSource, mean: Sequence[float], std: Sequence[float],
                image_size: int | None = None) -> LabeledView:
    """Every sample of ``source`` with its stored label, nothing pasted on."""
    check_transform(source.image_shape[0], mean, std, image_size)
    src = resized(source, image_size)
    n = len(src)
    return LabeledView(src, np.arange(n), src.labels, np.zeros(n, bool), np.full(n, -1, np.int8), None, mean, std)


def read_triggered_test(path: str | Path, classes: list[str], image_column: str = "image",
                        label_column: str = "label") -> ImageSource:
    """The owner's triggered test images (true labels) from one Parquet file."""
    path = Path(path)
    layout = LAYOUT.format(train_file=path.name, test_file=path.name, image_column=image_column,
                           label_column=label_column).replace(f"<root>/{path.name} and <root>/{path.name}", str(path))
    images, labels, _ = read_split(path, image_column, label_column, None, 0, layout, "limit")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise PotionError(f"--triggered-test {path}: labels range over {labels.min()}..{labels.max()} but the dataset "
                          f"has {len(classes)} classes")
    return ArraySource(images, labels, classes)


def check_triggered_shape(path: str | Path, triggered: ImageSource, test: ImageSource, image_size: int | None) -> None:
    """The triggered test images must reach the model at the shape the test images do,
    that is after ``--image-size`` resized both (a stored size of their own is fine then)."""
    seen, want = resized(triggered, image_size).image_shape, resized(test, image_size).image_shape
    if seen == want:
        return
    if image_size is None:
        raise PotionError(f"--triggered-test {path} holds {seen} (C, H, W) images but the dataset's test images, "
                          f"which the model sees, are {want}; store them at that size or pass --image-size "
                          f"{want[1]} to resize them")
    raise PotionError(f"--triggered-test {path} holds {triggered.image_shape} (C, H, W) images, which reach the model "
                      f"as {seen} after --image-size {image_size}, but the test images reach it as {want}; "
                      "give triggered images with the dataset's channels")
