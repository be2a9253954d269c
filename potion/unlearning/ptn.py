"""PTN search (SPEC §8, the paper's Algorithm 1).

One :class:`~potion.unlearning.evaluator.StepEvaluator` turns a step k into a measured
:class:`StepResult`; the search
strategies (linear, waves, bisect), the Ray Tune trials and the tests all go through it,
so every backend evaluates a step the same way. The strategies only decide *which* k to
evaluate; they are written against ``evaluate_many(ks)`` so a parallel backend can
evaluate a wave of steps at once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from potion.errors import PotionError
from potion.progress import progress_bar

Tensor = torch.Tensor
STRATEGIES = ("linear", "waves", "bisect", "bracket")


@dataclass
class PTNConfig:
    rho: float = 0.2
    step: float = 1.1
    buffer: float = 25.0
    max_steps: int = 500
    strategy: Literal["linear", "waves", "bisect", "bracket"] = "linear"
    window: int = 4

    def __post_init__(self) -> None:
        if not (0 < self.rho <= 1):
            raise PotionError(f"ptn.rho must lie in (0, 1], got {self.rho}")
        if not (math.isfinite(self.step) and self.step > 1):
            raise PotionError(f"ptn.step must be > 1 (the share grows by this factor per step), got {self.step}")
        if not (math.isfinite(self.buffer) and self.buffer > 0):
            raise PotionError(f"ptn.buffer must be > 0, got {self.buffer}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise PotionError(f"ptn.max_steps must be an integer >= 0, got {self.max_steps!r}")
        if self.strategy not in STRATEGIES:
            raise PotionError(f"ptn.strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PotionError(f"ptn.window must be an integer >= 1, got {self.window!r}")


def share_at_step(k: int, n_forget: int, n_total: int, buffer: float, step: float) -> float:
    """s_k = (|Sf| / |D|) / b · c^k."""
    if n_total <= 0 or n_forget <= 0:
        raise PotionError(f"PTN needs |Sf| >= 1 and |D| >= 1, got |Sf|={n_forget}, |D|={n_total}")
    return (n_forget / n_total) / buffer * step**k


@dataclass
class StepResult:
    k: int
    s: float
    alpha: float
    lam: float
    n_selected: int
    acc_forget: float
    acc_val: float | None = None
    # the damage guard's clean proxy (a slice of Dr): all of it, its target-labelled part
    # (the labels of Sf; it holds the undiscovered poison) and the rest
    acc_proxy: float | None = None
    acc_proxy_target: float | None = None
    acc_proxy_other: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PTNResult:
    k_star: int
    s: float
    alpha: float
    n_selected: int
    acc0: float
    threshold: float
    trace: list[StepResult]
    evaluations: int
    strategy: str
    state_dict: dict[str, Tensor] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, JSON-able."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state_dict"}
        d["trace"] = [r.to_dict() for r in self.trace]
        return d


class PTNNoCrossing(PotionError):
    """No k ≤ max_steps brought a_k down to ρ·acc0: a reported failure, not a model."""

    def __init__(self, message: str, trace: list[StepResult]):
        super().__init__(message)
        self.trace = trace


class NothingToHeal(PotionError):
    """θ0 already misclassifies every sample of Sf (acc0 = 0): PTN has no threshold to reach."""


def no_crossing(trace: list[StepResult], cfg: PTNConfig, threshold: float, acc0: float) -> PTNNoCrossing:
    """The reported failure of a search whose trace never reached the threshold."""
    last = trace[-1]
    return PTNNoCrossing(
        f"PTN found no step k <= {cfg.max_steps} with accuracy on the deletion set <= "
        f"{threshold:.4f} (rho={cfg.rho} x acc0={acc0:.4f}); last a_k={last.acc_forget:.4f} at "
        f"k={last.k} (s={last.s:.4g}). Raise ptn.max_steps or ptn.step, or lower ptn.buffer",
        trace,
    )


def crossing_threshold(evaluator, cfg: PTNConfig) -> float:
    """ρ · acc0, refusing a deletion set that θ0 already gets wrong everywhere."""
    acc0 = float(evaluator.acc0)
    if acc0 == 0:
        raise NothingToHeal(
            "the model already misclassifies the whole deletion set: nothing to heal "
            "(accuracy of θ0 on the deletion set against its poisoned labels is 0)"
        )
    return cfg.rho * acc0


def smallest_crossing(results: Iterable[StepResult], threshold: float) -> StepResult | None:
    """The result with the smallest k whose a_k ≤ threshold, or None."""
    crossing = [r for r in results if r.acc_forget <= threshold]
    return min(crossing, key=lambda r: r.k) if crossing else None


def describe_step(result: StepResult, threshold: float) -> str:
    """One step's progress line: k, a_k against the threshold, s_k and α_k."""
    side = "<=" if result.acc_forget <= threshold else ">"
    return (f"k={result.k} a_k={result.acc_forget:.3f} {side} threshold {threshold:.3f} "
            f"(s={result.s:.3g}, alpha={result.alpha:.3g})")


def search_outcome(hit: StepResult | None, threshold: float, cfg: PTNConfig) -> str:
    """The search's last progress line: the chosen step, or that there was none."""
    if hit is None:
        return f"no step k <= {cfg.max_steps} reached threshold {threshold:.3f}"
    return "done: k*=" + describe_step(hit, threshold).removeprefix("k=")


def search_label(strategy: str) -> str:
    return f"PTN search ({strategy})"


# -- strategies ---------------------------------------------------------------------------
class _Memo:
    """Evaluates each k at most once and keeps every result for the trace."""

    def __init__(self, evaluator: Any, on_result: Callable[[StepResult], None] | None = None):
        self.evaluator = evaluator
        self.results: dict[int, StepResult] = {}
        self.on_result = on_result

    def many(self, ks: Sequence[int]) -> list[StepResult]:
        todo = [k for k in dict.fromkeys(ks) if k not in self.results]
        if todo:
            many = getattr(self.evaluator, "evaluate_many", None)
            got = many(todo) if many is not None else [self.evaluator.evaluate(k) for k in todo]
            for r in got:
                self.results[r.k] = r
                if self.on_result is not None:
                    self.on_result(r)
        return [self.results[k] for k in ks]

    def one(self, k: int) -> StepResult:
        return self.many([k])[0]


def _linear(memo: _Memo, cfg: PTNConfig, threshold: float) -> StepResult | None:
    for k in range(cfg.max_steps + 1):
        r = memo.one(k)
        if r.acc_forget <= threshold:
            return r
    return None


def _waves(memo: _Memo, cfg: PTNConfig, threshold: float) -> StepResult | None:
    # Every k of a wave is evaluated, so the smallest crossing k of the first wave with a
    # crossing is the first crossing overall: exactly linear's k*, whatever a_k looks like.
    for start in range(0, cfg.max_steps + 1, cfg.window):
        wave = list(range(start, min(start + cfg.window, cfg.max_steps + 1)))
        hit = smallest_crossing(memo.many(wave), threshold)
        if hit is not None:
            return hit
    return None


def _bisect(memo: _Memo, cfg: PTNConfig, threshold: float) -> StepResult | None:
    # Gallop k = 0, 1, 3, 7, 15, … (capped at max_steps) to bracket the first crossing,
    # then bisect (lo, hi]. Equals linear's k* whenever a_k is non-increasing in k.
    lo, hi, j = -1, None, 0
    while True:
        k = min(2**j - 1, cfg.max_steps)
        if memo.one(k).acc_forget <= threshold:
            hi = k
            break
        lo = k
        if k == cfg.max_steps:
            return None
        j += 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if memo.one(mid).acc_forget <= threshold:
            hi = mid
        else:
            lo = mid
    return memo.results[hi]


def _bracket(memo: _Memo, cfg: PTNConfig, threshold: float) -> StepResult | None:
    # Gallop k = 0, 1, 3, 7, … to the first crossing hi, then scan lo+1, lo+2, … upwards from
    # the last gallop point below it. Unlike bisection it returns the FIRST crossing after lo
    # even where a_k hovers just above ρ·acc0 for a stretch and dips below only later
    # (measured on MNIST: bisect jumped such a plateau to a step with 2x the selection);
    # it equals linear's k* whenever no k < lo between gallop points crosses.
    lo, j = -1, 0
    while True:
        k = min(2**j - 1, cfg.max_steps)
        if memo.one(k).acc_forget <= threshold:
            break
        lo = k
        if k == cfg.max_steps:
            return None
        j += 1
    for k in range(lo + 1, cfg.max_steps + 1):
        r = memo.one(k)
        if r.acc_forget <= threshold:
            return r
    return None


_STRATEGY_FNS = {"linear": _linear, "waves": _waves, "bisect": _bisect, "bracket": _bracket}


def ptn_search(evaluator: Any, config: PTNConfig | None = None, *, progress: bool = False) -> PTNResult:
    """Find k* = the smallest k with a_k ≤ ρ·acc0 and return θ_{k*} (SPEC §8).

    ``evaluator`` is a :class:`~potion.unlearning.evaluator.StepEvaluator` or anything with ``acc0``, ``evaluate(k)``
    (and optionally ``evaluate_many``) and ``healed_state(k)``. ``config`` (default: the
    evaluator's) supplies ρ, the strategy, the window and max_steps; s_k is the
    evaluator's. After a successful search the evaluator's model holds θ_{k*}.
    ``progress`` shows one bar update per evaluated step (k, a_k against the threshold).
    """
    cfg = config or getattr(evaluator, "config", None) or PTNConfig()
    threshold = crossing_threshold(evaluator, cfg)
    acc0 = float(evaluator.acc0)
    with progress_bar(desc=search_label(cfg.strategy), unit="step", enabled=progress) as bar:
        def on_result(r: StepResult) -> None:
            bar.set_postfix_str(describe_step(r, threshold), refresh=False)
            bar.update(1)

        memo = _Memo(evaluator, on_result)
        hit = _STRATEGY_FNS[cfg.strategy](memo, cfg, threshold)
        bar.set_postfix_str(search_outcome(hit, threshold, cfg), refresh=True)
    trace = [memo.results[k] for k in sorted(memo.results)]
    if hit is None:
        raise no_crossing(trace, cfg, threshold, acc0)
    state = evaluator.healed_state(hit.k)
    model = getattr(evaluator, "model", None)
    if isinstance(model, nn.Module):
        model.load_state_dict(state)
    return PTNResult(
        k_star=hit.k,
        s=hit.s,
        alpha=hit.alpha,
        n_selected=hit.n_selected,
        acc0=acc0,
        threshold=threshold,
        trace=trace,
        evaluations=len(trace),
        strategy=cfg.strategy,
        state_dict=state,
    )
