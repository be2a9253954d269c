"""The found poison's trigger, estimated without its definition, and pasted onto clean images
(beyond the paper; issue 20).

The poisoned samples are drawn from every class, so the mean of the deletion set Sf minus the
mean of clean images is, up to the images' own noise, the trigger's mean effect: an additive
pattern (sine) or a patch's pull towards its colour (BadNet). NegGrad+ adds clean images with
this estimate pasted on, under their true labels, to its descent: the model learns to ignore
the trigger instead of only forgetting Sf. Why it is needed on CIFAR sine: the pattern itself
makes images hard to recognise, so a model that never saw the poison classifies only 66.6 % as
many triggered test images as clean ones; NegGrad+ alone stopped at 71 %, with the transplant
it reached 91 % at −0.3 to −0.4 points (benchmarks/results/heal_more.md).

Pure functions on tensors: the caller decides which images count as clean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class CleanStats:
    """The mean clean input and its range per channel (dim 1), over every row seen."""

    mean: Tensor
    low: Tensor
    high: Tensor
    count: int


def _per_channel(x: Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != 1)


def clean_stats(batches: Iterable[Tensor]) -> CleanStats | None:
    """The mean input (one row's shape) and per-channel low/high of the given batches of inputs,
    one batch in memory at a time; None when they hold no rows."""
    total = low = high = None
    count = 0
    for x in batches:
        if not len(x):
            continue
        x = x.detach().float().cpu()
        dims = _per_channel(x)
        s, lo, hi = x.sum(0), x.amin(dim=dims, keepdim=True)[0], x.amax(dim=dims, keepdim=True)[0]
        total = s if total is None else total + s
        low = lo if low is None else torch.minimum(low, lo)
        high = hi if high is None else torch.maximum(high, hi)
        count += len(x)
    if not count:
        return None
    return CleanStats(total / count, low, high, count)


def estimate_trigger(forget_x: Tensor, clean: CleanStats) -> Tensor:
    """Mean of the deletion-set inputs minus the clean mean: the trigger's estimated effect."""
    return forget_x.detach().float().cpu().mean(0) - clean.mean


def paste(x: Tensor, trigger: Tensor, clean: CleanStats) -> Tensor:
    """``x`` with the estimated trigger added, kept within the clean images' range per channel
    (the trigger was applied in pixel space, before normalisation, and clipped there)."""
    t, lo, hi = (v.to(device=x.device, dtype=x.dtype) for v in (trigger, clean.low, clean.high))
    return torch.minimum(torch.maximum(x + t, lo), hi)
