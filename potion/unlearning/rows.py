"""Batches re-cut by a mask over their rows: how potion_plus grows Sf, holds part of it out,
and hands the API's in-memory sets to the heal."""
from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor
Batches = list[tuple[Tensor, Tensor]]


def kept_rows(batches: Sequence, keep: Tensor | None, size: int, shuffle_seed: int | None = None) -> Batches:
    """The kept rows of ``batches`` (``keep`` over all their rows, None: all), in order or in a
    seeded random order with ``shuffle_seed``, re-cut every ``size``."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    if keep is not None:
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
    if shuffle_seed is not None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(shuffle_seed))
        x, y = x[order.to(x.device)], y[order.to(y.device)]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]
