"""Image sources, the train/test pair a dataset loader returns, and the dataset registry.

A source hands out uint8 ``(B, C, H, W)`` batches by index. Keeping images as uint8 until
the last moment makes a CIFAR-sized training set 12 MB instead of 600 MB, and lets the
views run augmentation (pure pixel moves) before the float conversion.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from potion.errors import PotionError
from potion.registry import Registry


class ImageSource(ABC):
    """Labelled images of one shape, addressable by position.

    ``streamed`` says whether ``load`` decodes files (slow, worth a DataLoader with
    workers) or slices memory (fast, workers would only add copying); ``decode_workers``
    is how many loader processes a streamed source's batches use by default.
    """

    classes: list[str]
    labels: np.ndarray
    image_shape: tuple[int, int, int]
    streamed: bool = False
    decode_workers: int = 0

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abstractmethod
    def load(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 ``(len(indices), C, H, W)`` in the order of ``indices``."""


class ArraySource(ImageSource):
    """All images in memory as one uint8 NCHW tensor."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, classes: list[str]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
        check_labels(labels, classes, "ArraySource")
        self.images = images.contiguous()
        self.labels = labels
        self.classes = list(classes)
        self.image_shape = tuple(int(s) for s in images.shape[1:])  # type: ignore[assignment]

    def load(self, indices: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.images.index_select(0, idx)


def default_workers() -> int:
    """Loader processes that decode a streamed source: half the cores (the other half runs the
    model), 1 to 4."""
    import os

    return max(1, min(4, (os.cpu_count() or 2) // 2))


def check_labels(labels: np.ndarray, classes: list[str], where: str) -> None:
    """Every label must name one of the classes; otherwise the model head is too small."""
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise PotionError(
            f"{where}: labels range over {labels.min()}..{labels.max()} but there are "
            f"{len(classes)} class names; every label must lie in 0..{len(classes) - 1}"
        )


@dataclass
class DatasetSplits:
    """A training set D, a test set T and how to normalise and augment them."""

    name: str
    train: ImageSource
    test: ImageSource
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW images, in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and it never materialises a
    float copy of the whole training set.
    """
    return stats_from_histograms(channel_histograms(images))


def channel_histograms(images: torch.Tensor) -> torch.Tensor:
    """``(C, 256)`` int64 pixel counts of uint8 NCHW images; batches' histograms add up."""
    return torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])


def stats_from_histograms(hists: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std in [0, 1] units from ``channel_histograms``."""
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64)
    for c in range(hists.shape[0]):
        hist = hists[c].to(torch.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * values**2).sum() / n - mean**2
        means.append(float(mean / 255.0))
        stds.append(float(var.clamp_min(0).sqrt() / 255.0))
    return tuple(means), tuple(stds)


def absent(path: Path, kind: str = "folder") -> str:
    """How to say that ``path`` is not the ``kind`` ("folder" or "file") we wanted."""
    if not path.exists():
        return f"{kind} {path} does not exist"
    return f"{path} is not a {kind}"


def seeded_subset(n: int, limit: int | None, seed: int, what: str) -> np.ndarray:
    """Sorted positions of a seeded random draw of ``limit`` of ``n`` rows (all if None).

    A random draw, not the first rows: some exports (CIFAR-10 JPEG) are sorted by class.
    """
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1):
        raise PotionError(f"{what} must be a positive integer or null, got {limit!r}")
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)


DATASETS: Registry[Callable[..., DatasetSplits]] = Registry("dataset")


def load_dataset(name: str, **kwargs) -> DatasetSplits:
    """Build the named dataset; unknown parameters are a PotionError listing the valid ones."""
    import potion.datasets  # noqa: F401  (registers every source)

    fn = DATASETS.get(name)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise PotionError(
            f"dataset '{name}' has no parameter '{unknown[0]}'; valid: {', '.join(params)}"
        )
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise PotionError(f"dataset '{name}' needs the parameter '{missing[0]}'")
    return fn(**kwargs)
