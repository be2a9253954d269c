"""Backdoor triggers (SPEC §3): badnet, sine (SIG) and moving.

Triggers act on float images in [0, 1], after augmentation and before normalisation, so
the pattern sits at the same pixels whatever crop or flip the sample received.
Corner codes: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; -1 = no corner.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import torch

from potion.errors import PotionError
from potion.registry import Registry

NO_CORNER, TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = -1, 0, 1, 2, 3


class Trigger:
    """A trigger with JSON-able parameters (recorded in the manifest)."""

    name: str = ""

    def __init__(self, **params):
        self.params = params

    def draw_corners(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Corner code per sample; triggers without a corner draw nothing from ``rng``."""
        return np.full(n, NO_CORNER, dtype=np.int8)

    def apply(self, x: torch.Tensor, corners: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def _check_size(size: object, what: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise PotionError(f"trigger '{what}': size must be a positive integer, got {size!r}")
    return size


def paste_patches(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Set a ``size``×``size`` patch to 1.0 in every channel at each sample's corner."""
    _, _, h, w = x.shape
    if size > min(h, w):
        raise PotionError(f"trigger patch of size {size} does not fit on {h}×{w} images; choose a smaller size")
    corners = torch.as_tensor(corners, dtype=torch.long, device=x.device)
    if ((corners < 0) | (corners > 3)).any():
        raise ValueError(f"corner codes must be 0..3, got {corners.unique().tolist()}")
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    top, left = rows < size, cols < size
    bottom, right = rows >= h - size, cols >= w - size
    # (4, H, W) masks indexed by corner code.
    masks = torch.stack(
        [top[:, None] & left, top[:, None] & right, bottom[:, None] & left, bottom[:, None] & right]
    )
    mask = masks[corners].unsqueeze(1)  # (B, 1, H, W)
    return torch.where(mask, torch.ones((), dtype=x.dtype, device=x.device), x)


class BadNet(Trigger):
    """White ``size``×``size`` patch in the bottom-right corner."""

    name = "badnet"

    def __init__(self, size: int = 3):
        super().__init__(size=_check_size(size, "badnet"))

    def draw_corners(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, BOTTOM_RIGHT, dtype=np.int8)

    def apply(self, x: torch.Tensor, corners=None) -> torch.Tensor:
        fixed = torch.full((x.shape[0],), BOTTOM_RIGHT, dtype=torch.long, device=x.device)
        return paste_patches(x, fixed, self.params["size"])


class Moving(Trigger):
    """The badnet patch in a corner drawn per sample (and recorded, so it never changes)."""

    name = "moving"

    def __init__(self, size: int = 3):
        super().__init__(size=_check_size(size, "moving"))

    def draw_corners(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, 4, size=n).astype(np.int8)

    def apply(self, x: torch.Tensor, corners=None) -> torch.Tensor:
        if corners is None:
            raise ValueError("the moving trigger needs a corner per sample")
        return paste_patches(x, corners, self.params["size"])


class Sine(Trigger):
    """x' = clip(x + delta * sin(2π j f / W), 0, 1) on every channel, j the column."""

    name = "sine"

    def __init__(self, freq: float = 6, delta: float = 0.08):
        for key, v in (("freq", freq), ("delta", delta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise PotionError(f"trigger 'sine': {key} must be a finite number, got {v!r}")
        if not 0 < delta <= 1:
            raise PotionError(f"trigger 'sine': delta must lie in (0, 1], got {delta!r}")
        super().__init__(freq=freq, delta=delta)

    def pattern(self, width: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        j = torch.arange(width, dtype=torch.float64)
        p = self.params["delta"] * torch.sin(2 * math.pi * j * self.params["freq"] / width)
        return p.to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, corners=None) -> torch.Tensor:
        return (x + self.pattern(x.shape[-1], x.dtype, x.device)).clamp_(0.0, 1.0)


TRIGGERS: Registry[Callable[..., Trigger]] = Registry("trigger")
TRIGGERS.register("badnet")(BadNet)
TRIGGERS.register("sine")(Sine)
TRIGGERS.register("moving")(Moving)


def make_trigger(name: str, **params) -> Trigger:
    """Build a trigger by name; an unknown parameter is a PotionError listing the valid ones."""
    cls = TRIGGERS.get(name)
    valid = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise PotionError(f"trigger '{name}' has no parameter '{unknown[0]}'; valid: {', '.join(valid) or '(none)'}")
    return cls(**params)
