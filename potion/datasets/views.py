"""Labelled views of a source: what training, importance passes and metrics iterate over.

A view is a list of source positions with a label, a trigger flag and a corner for each.
Its batches go uint8 → augmentation (random crop with zero padding, optional flip) →
float [0, 1] → trigger where flagged → normalisation. Cropping and flipping only move
pixels, so running them on uint8 gives the same result as on floats, with a quarter of
the memory traffic. All randomness is drawn on the CPU from generators seeded by
(seed, epoch, batch number), so a run is reproducible on any device and with any number
of loader workers.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from potion.datasets.base import DatasetSplits, ImageSource
from potion.datasets.manifest import Manifest
from potion.datasets.poisons import Trigger, make_trigger
from potion.errors import PotionError

CROP_PADDING = 4


class LabeledView:
    def __init__(
        self,
        source: ImageSource,
        indices: np.ndarray,
        labels: np.ndarray,
        triggered: np.ndarray,
        corners: np.ndarray,
        trigger: Trigger | None,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: bool = False,
    ):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.triggered = np.asarray(triggered, dtype=bool)
        self.corners = np.asarray(corners, dtype=np.int8)
        n = len(self.indices)
        for name, arr in (("labels", self.labels), ("triggered", self.triggered), ("corners", self.corners)):
            if arr.shape != (n,):
                raise ValueError(f"LabeledView: {name} has shape {arr.shape}, expected ({n},)")
        if self.triggered.any() and trigger is None:
            raise ValueError("LabeledView: samples are flagged as triggered but no trigger was given")
        channels = source.image_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"LabeledView: mean/std need {channels} values, got {len(mean)}/{len(std)}")
        self.trigger = trigger
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.hflip = bool(hflip)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.source.image_shape

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def subset(self, positions) -> "LabeledView":
        """The view restricted to ``positions`` (positions in this view, kept in the given order)."""
        pos = np.asarray(positions, dtype=np.int64)
        return LabeledView(
            self.source,
            self.indices[pos],
            self.labels[pos],
            self.triggered[pos],
            self.corners[pos],
            self.trigger,
            self.mean,
            self.std,
            self.hflip,
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        device: str | torch.device = "cpu",
        num_workers: int | None = None,
        epoch: int = 0,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)``: x float32 normalised ``(B, C, H, W)``, y int64, both on ``device``.

        Without ``shuffle`` the batches follow the view's order. ``epoch`` varies the
        order and augmentation between passes while keeping each pass reproducible.
        ``num_workers`` (default: the source's ``decode_workers``) decode a streamed
        source's batches in loader processes.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PotionError(f"batch size must be a positive integer, got {batch_size!r}")
        if seed < 0 or epoch < 0:
            raise PotionError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
        device = torch.device(device)
        chunks = self.chunks(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        workers = self.source.decode_workers if num_workers is None else num_workers
        for b, (pos, raw) in enumerate(zip(chunks, self._load(chunks, workers, device))):
            yield self.prepare(raw, pos, b, seed=seed, epoch=epoch, augment=augment, device=device)

    def chunks(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
               drop_last: bool = False) -> list[np.ndarray]:
        """The view positions of each batch that ``batches`` forms with these arguments."""
        n = len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        return [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    def prepare(self, raw: torch.Tensor, pos: np.ndarray, b: int, *, seed: int = 0, epoch: int = 0,
                augment: bool = False, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``b`` (view positions ``pos``, their uint8 images ``raw``) as ``(x, y)``:
        the one place where a decoded batch becomes model input, wherever it was decoded."""
        device = torch.device(device)
        x = raw.to(device, non_blocking=True)
        if augment:
            gen = torch.Generator().manual_seed(batch_seed(seed, epoch, b))
            x = random_crop_flip(x, gen, self.hflip)
        x = x.to(torch.float32).div_(255.0)
        x = self._apply_trigger(x, pos)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
        y = torch.from_numpy(self.labels[pos]).to(device, non_blocking=True)
        return x, y

    def _apply_trigger(self, x: torch.Tensor, pos: np.ndarray) -> torch.Tensor:
        flagged = self.triggered[pos]
        if not flagged.any():
            return x
        assert self.trigger is not None
        if flagged.all():
            return self.trigger.apply(x, torch.from_numpy(self.corners[pos]))
        sel = torch.from_numpy(np.flatnonzero(flagged)).to(x.device)
        x[sel] = self.trigger.apply(x[sel], torch.from_numpy(self.corners[pos][flagged]))
        return x

    def _load(self, chunks: list[np.ndarray], num_workers: int, device: torch.device) -> Iterator[torch.Tensor]:
        batches = [self.indices[c] for c in chunks]
        if num_workers > 0 and self.source.streamed:
            # Decoding files is the bottleneck of streamed sources: spread it over workers.
            loader = torch.utils.data.DataLoader(
                _SourceBatches(self.source, batches),
                batch_size=None,
                num_workers=min(num_workers, len(batches)),
                pin_memory=device.type == "cuda",
            )
            for item in loader:
                if isinstance(item, _Failed):
                    raise PotionError(item.message, detail=item.detail)
                yield item
        else:
            for idx in batches:
                yield self.source.load(idx)


class _SourceBatches(torch.utils.data.Dataset):
    """One decoded batch per item. A PotionError comes back as its message: the loader would
    re-raise it wrapped in the worker's traceback instead of as the one-line error it is."""

    def __init__(self, source: ImageSource, batches: list[np.ndarray]):
        self.source = source
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> "torch.Tensor | _Failed":
        try:
            return self.source.load(self.batches[i])
        except PotionError as e:
            return _Failed(str(e), e.detail)


class _Failed:
    """A PotionError on its way back from a loader worker."""

    def __init__(self, message: str, detail: str | None):
        self.message, self.detail = message, detail


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """A 63-bit seed for one batch; SeedSequence mixes the three so nearby seeds don't collide."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, hflip: bool, padding: int = CROP_PADDING) -> torch.Tensor:
    """Per-sample RandomCrop(H×W, zero padding) then, if ``hflip``, a flip with probability 1/2.

    One gather for the whole batch: output pixel (i, j) of sample b reads padded pixel
    (oy_b + i, ox_b + j), or (oy_b + i, ox_b + W - 1 - j) when b is flipped.
    """
    b, c, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    if not hflip:
        flip = torch.zeros_like(flip)
    dev = x.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
    padded = F.pad(x, (padding, padding, padding, padding))
    i = torch.arange(h, device=dev)
    j = torch.arange(w, device=dev)
    rows = oy[:, None] + i  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - j, j)  # (B, W)
    wp = w + 2 * padding
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)


def _view(source: ImageSource, labels, triggered, corners, trigger, splits: DatasetSplits) -> LabeledView:
    return LabeledView(
        source, np.arange(len(source)), labels, triggered, corners, trigger, splits.mean, splits.std, splits.hflip
    )


def train_view(splits: DatasetSplits, manifest: Manifest, trigger: Trigger | None = None) -> LabeledView:
    """All of D with the training labels, the trigger pasted on the poisoned samples.

    Without ``trigger`` it is rebuilt from the manifest's recorded name and parameters.
    """
    if len(manifest) != len(splits.train):
        raise PotionError(
            f"the manifest has {len(manifest)} rows but the training set of '{splits.name}' has "
            f"{len(splits.train)} images; it belongs to another dataset (or another train_limit)"
        )
    if trigger is None:
        trigger = make_trigger(manifest.trigger_name, **manifest.trigger_params)
    return _view(splits.train, manifest.train_labels, manifest.poisoned_mask, manifest.corners, trigger, splits)


def clean_test_view(splits: DatasetSplits) -> LabeledView:
    n = len(splits.test)
    return _view(splits.test, splits.test.labels, np.zeros(n, bool), np.full(n, -1, np.int8), None, splits)


def triggered_test_view(splits: DatasetSplits, trigger: Trigger, seed: int = 0) -> LabeledView:
    """T*: every test image triggered, clean labels; moving corners drawn from ``seed``."""
    n = len(splits.test)
    corners = trigger.draw_corners(np.random.default_rng(seed), n)
    return _view(splits.test, splits.test.labels, np.ones(n, bool), corners, trigger, splits)
