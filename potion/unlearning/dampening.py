"""Selective dampening (SPEC §6) and the share-of-parameters → α map (SPEC §7).

All functions are pure: inputs are never modified, the edit always starts from θ0.
Comparisons and β are computed in float64 so that α taken from a float64 percentile of
the ratios selects exactly the elements whose ratio lies above it.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from potion.errors import PotionError

Tensor = torch.Tensor


def _check_keys(imp_f: Mapping[str, Tensor], imp_r: Mapping[str, Tensor]) -> None:
    if imp_f.keys() != imp_r.keys():
        only_f = sorted(set(imp_f) - set(imp_r))
        only_r = sorted(set(imp_r) - set(imp_f))
        raise PotionError(
            "forget and retain importances cover different parameters "
            f"(only in forget: {only_f[:3]}, only in retain: {only_r[:3]}); "
            "compute both with the same model"
        )
    for name in imp_f:
        if imp_f[name].shape != imp_r[name].shape:
            raise PotionError(
                f"importance shapes differ for '{name}': forget {tuple(imp_f[name].shape)} vs "
                f"retain {tuple(imp_r[name].shape)}; compute both with the same model"
            )


def dampen(
    params: Mapping[str, Tensor],
    imp_f: Mapping[str, Tensor],
    imp_r: Mapping[str, Tensor],
    alpha: float,
    lam: float = 1.0,
) -> tuple[dict[str, Tensor], int]:
    """θ' = θ0·β where I_f > α·I_r, θ0 elsewhere, with β = min(λ·I_r/I_f, 1).

    ``params`` may be a whole state_dict: entries without an importance (batch-norm
    running statistics, counters) are copied unchanged. Returns the new state (fresh
    tensors, same dtypes and devices as ``params``) and the number of selected elements.

    Edge cases follow from the rule itself: I_f = 0 is never selected (0 > α·I_r is
    false for I_r ≥ 0), I_r = 0 < I_f is selected with β = 0, and 0/0 is never selected.
    α = 0 is allowed (it selects every element with I_f > I_r·0, i.e. I_f > 0) because a
    percentile of a degenerate ratio distribution can be exactly 0.
    """
    alpha, lam = float(alpha), float(lam)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise PotionError(f"dampening alpha must be a finite number >= 0, got {alpha}")
    if not (math.isfinite(lam) and lam > 0):
        raise PotionError(f"dampening lambda must be a finite number > 0, got {lam}")
    _check_keys(imp_f, imp_r)
    missing = sorted(set(imp_f) - set(params))
    if missing:
        raise PotionError(
            f"importances name parameters the model state lacks (e.g. '{missing[0]}'); "
            "the importances were computed for a different model"
        )

    out: dict[str, Tensor] = {}
    n_selected: Tensor | int = 0
    with torch.no_grad():
        for name, theta in params.items():
            if name not in imp_f:
                out[name] = theta.detach().clone()
                continue
            if theta.shape != imp_f[name].shape:
                raise PotionError(
                    f"parameter '{name}' has shape {tuple(theta.shape)} but its importance has "
                    f"{tuple(imp_f[name].shape)}; the importances were computed for a different model"
                )
            f = imp_f[name].to(theta.device, torch.float64)
            r = imp_r[name].to(theta.device, torch.float64)
            selected = f > alpha * r
            # Where f = 0 the quotient is inf/NaN, but those elements are never selected.
            beta = torch.clamp(lam * r / f, max=1.0)
            out[name] = torch.where(selected, theta.detach().double() * beta, theta.detach().double()).to(theta.dtype)
            n_selected = n_selected + selected.sum()
    return out, int(n_selected)


def importance_ratios(imp_f: Mapping[str, Tensor], imp_r: Mapping[str, Tensor]) -> np.ndarray:
    """R = I_f / I_r over every parameter element, NaN and ±inf removed (float64).

    0/0 is NaN and x/0 is inf, so both leave R: those elements are decided by the edge
    cases of :func:`dampen`, not by α.
    """
    _check_keys(imp_f, imp_r)
    parts = []
    for name in imp_f:
        ratio = imp_f[name].detach().double().reshape(-1) / imp_r[name].detach().double().reshape(-1)
        parts.append(ratio[torch.isfinite(ratio)].cpu())
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(parts).numpy()


def percentile_for_share(s: float) -> float:
    """q(s) = 100 − ln(1 + 100·s), clipped to [0, 100] (SPEC §7)."""
    s = float(s)
    if not (math.isfinite(s) and s >= 0):
        raise PotionError(f"the share of parameters s must be a finite number >= 0, got {s}")
    return float(min(100.0, max(0.0, 100.0 - math.log1p(100.0 * s))))


def _no_ratios() -> PotionError:
    return PotionError(
        "no finite importance ratios I_f/I_r: every parameter has I_r = 0 or I_f = I_r = 0; "
        "check that the retain and forget data reach the model's parameters"
    )


def alpha_from_share(ratios: np.ndarray, s: float) -> float:
    """α(s) = percentile(R, q(s)) with numpy's default linear interpolation."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.size == 0:
        raise _no_ratios()
    return float(np.percentile(ratios, percentile_for_share(s)))


class RatioQuantiles:
    """Percentiles of one ratio array, sorted once, answered in O(1).

    PTN asks for α at many shares s of the same R; sorting 10^7 ratios per step would
    dominate the search. Results are bit-identical to ``np.percentile(R, q)`` (linear):
    the index and interpolation below repeat numpy's own arithmetic.
    """

    def __init__(self, ratios: np.ndarray):
        ratios = np.asarray(ratios, dtype=np.float64).reshape(-1)
        if ratios.size == 0:
            raise _no_ratios()
        if not np.isfinite(ratios).all():
            raise PotionError("ratios must be finite; build them with importance_ratios()")
        self.sorted = np.sort(ratios)

    def __len__(self) -> int:
        return int(self.sorted.size)

    def percentile(self, q: float) -> float:
        q = float(q)
        if not (0.0 <= q <= 100.0):
            raise PotionError(f"percentile q must lie in [0, 100], got {q}")
        n = self.sorted.size
        virtual = (n - 1) * np.true_divide(q, 100)
        if virtual >= n - 1:
            return float(self.sorted[-1])
        lo = int(np.floor(virtual))
        gamma = virtual - np.floor(virtual)
        a, b = self.sorted[lo], self.sorted[lo + 1]
        diff = b - a
        # numpy's _lerp: interpolate from the nearer end for accuracy.
        return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)

    def alpha(self, s: float) -> float:
        return self.percentile(percentile_for_share(s))
