"""Retain importances I_r from a seeded sample of Dr, and the ``auto`` stopping rule.

The retain pass is the cost of the method (SPEC §5: one forward and backward pass over
the training set), yet PTN only uses I_r through the *ranking* of the ratios I_f / I_r:
α(s) is a percentile of those ratios, so the elements that step k dampens are the top
q(s) share of them. ``auto`` therefore streams batches of a seeded permutation of Dr and
stops once that ranking has settled: at checkpoints of the running mean it compares the
sets of elements that would be selected at several selected shares with the sets at the
previous checkpoint, and stops when every overlap reaches ``AutoConfig.overlap``. The
constants of :class:`AutoConfig` are a first choice, not yet tuned: the one MNIST cell in
``benchmarks/results/heal_speed.md`` stopped at 46 % of Dr and still lost 4.5 points of
healing against the full pass. On small data the floors (16 batches, 5 % of Dr) make
``auto`` read all of Dr, which is the fall-back to the full sample.

Everything here is independent of where the batches are computed: the single-process
pass and the Ray-sharded pass both hand :func:`sampled_pass` a ``sum_range(positions)``
that returns Σ_b G(b) over the batches cut from ``positions`` (every B in order), so the
sample, the batches and the stopping decision are the same on both.

``--retain-sample 1.0`` (``RetainSample.full()``) never comes here: it is today's exact
pass in Dr's own order.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from potion.errors import PotionError

Tensor = torch.Tensor
SumRange = Callable[[np.ndarray], "tuple[Mapping[str, Tensor], int]"]

AUTO_RULE_VERSION = "auto-v1"


@dataclass(frozen=True)
class AutoConfig:
    """The constants of the ``auto`` rule (first choices; see benchmarks/results/heal_speed.md)."""

    # The selected shares watched: PTN's selection at step k is the top ln(1 + 100·s_k)/100
    # of the ratios, which at the crossings measured lies between ~0.3 % and ~5 % of the
    # parameter elements.
    levels: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
    # Minimum overlap of each watched set between two consecutive checkpoints.
    overlap: float = 0.90
    # Never stop before this many batches (fewer leave the ranking to a handful of gradients)...
    min_batches: int = 16
    # ...nor before this share of Dr.
    min_share: float = 0.05
    # Checkpoints grow geometrically so that checking costs O(log K) rankings.
    growth: float = 1.5

    def label(self) -> str:
        return (f"{AUTO_RULE_VERSION}(levels={','.join(f'{x:g}' for x in self.levels)};overlap={self.overlap:g};"
                f"min={self.min_batches},{self.min_share:g};growth={self.growth:g})")


@dataclass(frozen=True)
class RetainSample:
    """Which part of Dr the retain importances are computed on.

    ``mode``: ``full`` (all of Dr in its order: the paper's pass), ``share`` (a share in
    (0, 1) of Dr), ``count`` (that many samples) or ``auto`` (stream until converged).
    """

    mode: str = "auto"
    value: float | None = None
    seed: int = 0
    auto: AutoConfig = AutoConfig()

    @staticmethod
    def full() -> "RetainSample":
        return RetainSample("full", 1.0, 0)

    @property
    def is_full(self) -> bool:
        return self.mode == "full"

    def label(self) -> str:
        """A short text naming the sample, used in the cache key and the report."""
        if self.mode == "full":
            return "full"
        if self.mode == "auto":
            return f"{self.auto.label()};seed={self.seed}"
        return f"{self.mode}={self.value:g};seed={self.seed}"


def parse_retain_sample(value: Any, seed: int = 0) -> RetainSample:
    """``auto``, a share in (0, 1] (1 or 1.0 = the full pass) or a whole count >= 1."""
    if isinstance(value, RetainSample):
        return value
    text = str(value).strip().lower()
    hint = "use a share in (0, 1] (1.0 = the full pass), a sample count such as 5000, or auto"
    if text == "auto":
        return RetainSample("auto", None, int(seed))
    if text in ("full", "1", "1.0"):
        return RetainSample.full()
    if re.fullmatch(r"[0-9]+", text):
        n = int(text)
        if n < 1:
            raise PotionError(f"--retain-sample {value}: a count must be >= 1; {hint}")
        return RetainSample("count", float(n), int(seed))
    try:
        x = float(text)
    except ValueError:
        raise PotionError(f"--retain-sample {value!r} is not understood; {hint}") from None
    if not (0 < x <= 1) or not math.isfinite(x):
        raise PotionError(f"--retain-sample {value}: a share must lie in (0, 1]; {hint}")
    return RetainSample.full() if x == 1 else RetainSample("share", x, int(seed))


def sample_order(n: int, seed: int) -> np.ndarray:
    """The seeded permutation of Dr's positions that every sampled pass reads in order."""
    return np.random.default_rng([int(seed), 0x5A3]).permutation(int(n))


def checkpoints(n: int, batch_size: int, auto: AutoConfig = AutoConfig()) -> list[int]:
    """Batch counts at which ``auto`` checks its rule (the last one is every batch of Dr)."""
    total = math.ceil(n / batch_size)
    first = max(auto.min_batches, math.ceil(auto.min_share * n / batch_size))
    out, c = [], first
    while c < total:
        out.append(c)
        c = max(c + 1, math.ceil(c * auto.growth))
    out.append(total)
    return out


def _ranking_scores(reference: Mapping[str, Tensor] | None, imp_r: Mapping[str, Tensor]) -> Tensor:
    """I_f / I_r flattened, with the never-selected cases (I_f = 0, NaN) at -inf."""
    parts = []
    for name, r in imp_r.items():
        r = r.reshape(-1).double()
        f = reference[name].reshape(-1).double() if reference is not None else torch.ones_like(r)
        ratio = f / r  # I_r = 0 < I_f gives +inf: selected first, as dampen does
        ratio = torch.where((f > 0) & ~torch.isnan(ratio), ratio, torch.tensor(-math.inf, dtype=torch.float64))
        parts.append(ratio)
    return torch.cat(parts)


def top_sets(scores: Tensor, levels: tuple[float, ...]) -> list[Tensor]:
    """Indices of the top ``level`` share of ``scores`` for every level (at least one each)."""
    n = scores.numel()
    kmax = max(1, math.ceil(max(levels) * n))
    order = torch.topk(scores, min(kmax, n), sorted=True).indices
    return [order[: max(1, math.ceil(lv * n))] for lv in levels]


def overlaps(prev: list[Tensor], cur: list[Tensor], n: int) -> list[float]:
    """|A ∩ B| / |A| for each pair of equally sized index sets."""
    out = []
    for a, b in zip(prev, cur):
        mark = torch.zeros(n, dtype=torch.bool)
        mark[a] = True
        out.append(float(mark[b].sum()) / max(1, len(a)))
    return out


class AutoRule:
    """The ``auto`` stopping rule, fed the running mean of I_r at each checkpoint."""

    def __init__(self, reference: Mapping[str, Tensor] | None, auto: AutoConfig = AutoConfig()):
        self.reference = reference
        self.auto = auto
        self._prev: list[Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def converged(self, mean_r: Mapping[str, Tensor], n_batches: int) -> bool:
        scores = _ranking_scores(self.reference, mean_r)
        cur = top_sets(scores, self.auto.levels)
        ok = False
        entry: dict[str, Any] = {"batches": int(n_batches)}
        if self._prev is not None:
            ov = overlaps(self._prev, cur, scores.numel())
            entry["overlap_min"] = round(min(ov), 4)
            ok = min(ov) >= self.auto.overlap
        self.history.append(entry)
        self._prev = cur
        return ok


def _add(acc: dict[str, Tensor] | None, sums: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if acc is None:
        return {n: s.detach().to("cpu", torch.float32).clone() for n, s in sums.items()}
    for n, s in sums.items():
        acc[n] += s.to("cpu", torch.float32)
    return acc


def sampled_pass(
    sum_range: SumRange,
    n_retain: int,
    batch_size: int,
    sample: RetainSample,
    reference: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """I_r = (1/K) Σ_b G(b) over the batches of the sample, and the record of the sample.

    ``sum_range(positions)`` returns (Σ_b G(b), K) over the batches cut every
    ``batch_size`` from ``positions`` (positions in Dr, in the given order). ``reference``
    is I_f, used by ``auto`` to rank the ratios that PTN reads.
    """
    if sample.is_full:
        raise PotionError("the full retain pass is not sampled; call the plain importance pass")
    if n_retain < 1:
        raise PotionError("no retain samples to compute importances on: the retain set is empty")
    if batch_size < 1:
        raise PotionError(f"the importance batch size must be at least 1, got {batch_size}")
    order = sample_order(n_retain, sample.seed)
    record: dict[str, Any] = {"mode": sample.mode, "value": sample.value, "seed": sample.seed,
                              "label": sample.label(), "n_retain": int(n_retain), "batch_size": int(batch_size)}
    if sample.mode in ("share", "count"):
        m = math.ceil(sample.value * n_retain) if sample.mode == "share" else int(sample.value)
        m = min(max(m, 1), n_retain)
        sums, k = sum_range(order[:m])
        record.update(n_used=int(m), batches=int(k), share_used=m / n_retain)
        return {n: s.detach().to("cpu", torch.float32).div(k) for n, s in sums.items()}, record

    rule = AutoRule(reference, sample.auto)
    acc, k_total, done, converged = None, 0, 0, False
    for c in checkpoints(n_retain, batch_size, sample.auto):
        pos = order[done * batch_size: c * batch_size]
        sums, k = sum_range(pos)
        acc = _add(acc, sums)
        k_total += k
        done = c
        mean = {n: s / k_total for n, s in acc.items()}
        if rule.converged(mean, k_total):
            converged = True
            break
    n_used = min(done * batch_size, n_retain)
    record.update(n_used=int(n_used), batches=int(k_total), share_used=n_used / n_retain,
                  converged=converged, checks=rule.history)
    assert acc is not None
    return {n: s.div_(k_total) for n, s in acc.items()}, record


class SampledImportances(dict):
    """Importances that remember the sample they were computed on (``.record``)."""

    def __init__(self, tensors: Mapping[str, Tensor], record: dict[str, Any] | None):
        super().__init__(tensors)
        self.record = record
