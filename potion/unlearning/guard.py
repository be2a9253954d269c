"""The damage guard of ``xlf_ptn_guard``: PTN that never returns a θ the clean proxy calls
damaged by more than δ.

Beyond the paper (SPEC §8 reads only the deletion set Sf). The steps the guard scores are
also measured on a clean *proxy*: a seeded slice of the retain set Dr (never the test
split, never Sf). Dr still holds the poison the owner did not find, under the target label;
once healed it would read as "damage" on the target class. The evaluator therefore leaves
out the target-labelled proxy images that θ0's features place with the found poison
(:mod:`potion.unlearning.proxy_split`), and the damage is the accuracy drop on the rest,
weighted as the proxy is: samples whose label is not a target label (the labels of Sf) and
the clean-looking target-labelled ones.

An earlier estimator is kept behind ``poison_cap`` (0 = off, the default): it discounted the
target-labelled drop by û · F_k, with F_k = 1 − a_k / acc0 and û the smallest
drop_t(k) / F_k over steps with F_k ≥ ``heal_min``. Measured on cifar10-cpu it hid up to
3.4 points of real damage where damage and healing start at the same step (badnet, 100 %
discovery: proxy −0.74, test −4.12), which is why it is off (benchmarks/results/guard.md).

The guard first runs the paper's own search on Sf alone (locally or as Ray Tune trials),
then measures the proxy at the few steps :func:`guard_choose` asks for (k*, then a bisection
below it), on the driver: one choice for every backend, from the same pure function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from potion.errors import PotionError
from potion.unlearning.proxy import ProxyBase
from potion.unlearning.ptn import (
    PTNConfig,
    PTNNoCrossing,
    PTNResult,
    StepResult,
    crossing_threshold,
    no_crossing,
    ptn_search,
)

Tensor = torch.Tensor


@dataclass
class GuardConfig:
    # δ in percentage points of (poison-corrected) proxy accuracy; see benchmarks/results/guard.md
    max_damage: float = 1.0
    # how many steps past the paper's k* the guard may look for a step that heals more
    ahead: int = 0
    heal_min: float = 0.5
    # after the bisection below k*, up to this many steps between it and k* with a lower a_k
    # are measured too: near δ the proxy's damage is noisy, not monotone (guard.md)
    refine: int = 4
    # the û discount's upper bound; 0 turns it off (see the module docstring)
    poison_cap: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_damage) and self.max_damage >= 0):
            raise PotionError(f"guard.max_damage (δ, points of proxy accuracy) must be >= 0, got {self.max_damage}")
        for name in ("ahead", "refine"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PotionError(f"guard.{name} must be an integer >= 0, got {v!r}")
        if not (0 < self.heal_min <= 1):
            raise PotionError(f"guard.heal_min must lie in (0, 1], got {self.heal_min}")
        if not (0 <= self.poison_cap <= 1):
            raise PotionError(f"guard.poison_cap must lie in [0, 1], got {self.poison_cap}")


@dataclass
class GuardDecision:
    horizon: int  # the last k of the paper's search (its k*, or the last step it scanned)
    choice: StepResult | None
    k_paper: int | None  # the paper's k* (first crossing)
    reason: str
    status: str  # "k_star", "ahead", "partial", "none"
    poison_share: float  # û
    damage: dict[int, float] = field(default_factory=dict)  # estimated proxy damage per measured k (≤ 0 is loss)
    probes: list[int] = field(default_factory=list)  # the steps measured with the proxy, in order

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "k_choice": None if self.choice is None else self.choice.k,
                "k_paper": self.k_paper, "reason": self.reason, "status": self.status,
                "poison_share": self.poison_share, "damage": {str(k): v for k, v in self.damage.items()},
                "probes": list(self.probes)}


class GuardNoSafeStep(PTNNoCrossing):
    """No step heals within δ: a reported failure (with the curve), never a model."""

    def __init__(self, message: str, trace: list[StepResult], decision: GuardDecision,
                 info: dict[str, Any] | None = None):
        super().__init__(message, trace)
        self.decision = decision
        self.info = info if info is not None else decision.to_dict()  # what the report records


# ---------------------------------------------------------------- the pure part
def healed_fraction(a_k: float, acc0: float) -> float:
    return min(1.0, max(0.0, 1.0 - a_k / acc0)) if acc0 > 0 else 0.0


def poison_ratio(r: StepResult, base: ProxyBase, acc0: float, cfg: GuardConfig) -> float | None:
    """Target-class drop per unit of Sf healing at one well-healed step (else None)."""
    f = healed_fraction(r.acc_forget, acc0)
    if base.acc_target is None or r.acc_proxy_target is None or f < cfg.heal_min:
        return None
    return max(0.0, base.acc_target - r.acc_proxy_target) / f


def estimate_poison_share(steps: Sequence[StepResult], base: ProxyBase, acc0: float, cfg: GuardConfig) -> float:
    """û: the smallest target-class drop per unit of Sf healing over well-healed steps,
    capped at ``poison_cap``; 0 before any step has healed Sf by ``heal_min``."""
    ratios = [x for x in (poison_ratio(r, base, acc0, cfg) for r in steps) if x is not None]
    return min(cfg.poison_cap, min(ratios)) if ratios else 0.0


def proxy_damage(r: StepResult, base: ProxyBase, acc0: float, poison_share: float) -> float:
    """Estimated damage of step k in points of proxy accuracy (negative = loss)."""
    if r.acc_proxy is None:
        raise PotionError(f"step k={r.k} has no proxy accuracy; the guard measures the proxy at every step it scores")
    if base.n_target == 0 or base.acc_target is None or r.acc_proxy_target is None:
        return 100.0 * (r.acc_proxy - base.acc)
    w_t = base.n_target / base.n
    other = 0.0 if base.acc_other is None else base.acc_other - (r.acc_proxy_other or 0.0)
    target = max(0.0, base.acc_target - r.acc_proxy_target - poison_share * healed_fraction(r.acc_forget, acc0))
    return -100.0 * ((1 - w_t) * other + w_t * target)


def guard_choose(scan: Sequence[StepResult], k_paper: int | None, measure: Callable[[int], StepResult], *,
                 threshold: float, acc0: float, base: ProxyBase, cfg: GuardConfig,
                 max_steps: int) -> tuple[GuardDecision, dict[int, StepResult]]:
    """The guard's choice from the paper's search on Sf plus a few proxy measurements.

    ``scan``: steps measured on Sf alone (the paper's search; k* = ``k_paper``, None when no
    step up to max_steps crossed). ``measure(k)``: step k measured with the proxy. Returns
    the decision and the steps it measured, in order.

    - k* (and up to ``ahead`` steps past it) within δ: among the crossing ones, the lowest
      a_k (ties: smallest k).
    - Otherwise a partial heal below k*: bisect (−1, k*) for the last step within δ, reading
      the proxy damage as growing with k (each added step only dampens more parameters),
      then take the lowest a_k of the scan up to it once it is measured within δ; if it is
      not, the lowest a_k among the measured steps within δ. Then up to ``refine`` steps
      above the bisection's bound with a still lower a_k are measured, lowest a_k first;
      the first within δ wins. Ties go to the larger k: it dampens a superset of the
      parameters (α falls with k), so it heals at least as much. Every step returned was
      measured within δ whatever the curve, so the bound holds exactly; only *how much* a
      partial heal heals leans on the damage growing with k.
    - Nothing within δ that lowers a_k: none.

    At most log2(k*) + 2 + ``refine`` proxy measurements instead of one per step: the proxy
    is 2,000 images against |Sf|'s tens to hundreds, so measuring it at every step cost as
    much as the whole retain pass (benchmarks/results/heal_speed.md).
    """
    a = {r.k: r.acc_forget for r in scan}
    measured: dict[int, StepResult] = {}
    dmg: dict[int, float] = {}

    def at(k: int) -> StepResult:
        if k not in measured:
            measured[k] = measure(k)
            a[k] = measured[k].acc_forget
        return measured[k]

    window = [] if k_paper is None else [at(k) for k in range(k_paper, min(k_paper + cfg.ahead, max_steps) + 1)]
    u = estimate_poison_share(window, base, acc0, cfg)

    def ok(k: int) -> bool:
        if k not in dmg:
            dmg[k] = proxy_damage(at(k), base, acc0, u)
        return dmg[k] >= -cfg.max_damage

    def decision(choice: int | None, reason: str, status: str) -> tuple[GuardDecision, dict[int, StepResult]]:
        horizon = max(a) if k_paper is None else k_paper
        d = GuardDecision(horizon, None if choice is None else measured[choice], k_paper, reason, status, u, dict(dmg),
                          list(measured))
        return d, measured

    delta = cfg.max_damage
    if k_paper is not None:
        good = [r.k for r in window if r.acc_forget <= threshold and ok(r.k)]
        if good:
            best = min(good, key=lambda k: (a[k], k))
            if best == k_paper:
                return decision(best, f"the paper's k*={k_paper} keeps the proxy within δ={delta:g} points "
                                      f"(proxy damage {dmg[k_paper]:+.2f})", "k_star")
            return decision(best, f"stepped past the paper's k*={k_paper} to k={best}: a_k {a[best]:.4f} < "
                                  f"{a[k_paper]:.4f} with proxy damage {dmg[best]:+.2f} within δ={delta:g}", "ahead")
        why = f"the paper's k*={k_paper} breaks δ={delta:g} (proxy damage {dmg[k_paper]:+.2f})"
        lo, hi = -1, k_paper
    else:
        last = max(a)
        why = f"no step k <= {last} reaches ρ·acc0={threshold:.4f}"
        lo, hi = (last, last + 1) if ok(last) else (-1, last)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    below = [k for k in a if k <= lo and a[k] < acc0]
    best = min(below, key=lambda k: (a[k], -k)) if below else None
    if best is None or not ok(best):  # the damage did not grow with k there: measured steps only
        cands = [k for k in dmg if dmg[k] >= -delta and a[k] < acc0 and (k_paper is None or k < k_paper)]
        best = min(cands, key=lambda k: (a[k], -k)) if cands else None
    top = k_paper if k_paper is not None else max(a) + 1
    above = sorted((k for k in a if hi <= k < top and k not in dmg and a[k] < acc0), key=lambda k: (a[k], -k))
    for k in above[:cfg.refine]:
        if best is not None and a[k] >= a[best]:
            break
        if ok(k):
            best = k
            break
    if best is None:
        return decision(None, f"{why}; no step lowers the accuracy on the deletion set within δ", "none")
    return decision(best, f"{why}; best step within δ: k={best} (a_k {a[best]:.4f} against ρ·acc0 "
                          f"{threshold:.4f}, proxy damage {dmg[best]:+.2f}): a partial heal", "partial")


# ---------------------------------------------------------------- the local loop
@dataclass
class GuardResult(PTNResult):
    """A PTN result whose step the guard chose; ``k_star`` is the chosen step."""

    guard: dict[str, Any] = field(default_factory=dict)


def guard_result(evaluator: Any, cfg: PTNConfig, gcfg: GuardConfig, trace: list[StepResult],
                 decision: GuardDecision, strategy: str, allow_damage: bool = False) -> GuardResult:
    """The weights and record of a finished scan; raises when nothing may be returned."""
    acc0 = float(evaluator.acc0)
    threshold = cfg.rho * acc0
    # Every evaluated step stays in the record: the search's on Sf alone (a parallel backend
    # may run a few past k*) and the proxy's probes.
    trace = sorted(trace, key=lambda r: r.k)
    info = {**decision.to_dict(), "max_damage": gcfg.max_damage, "ahead": gcfg.ahead,
            "proxy0": evaluator.proxy_base.to_dict(), "allow_damage": allow_damage}
    choice = decision.choice
    if allow_damage and decision.status in ("partial", "none") and decision.k_paper is not None:
        choice = next(r for r in trace if r.k == decision.k_paper)
        info["reason"] = decision.reason + f"; --allow-damage: returning the paper's k*={decision.k_paper}"
        info["status"] = "damage_allowed"
    if choice is None:
        if allow_damage:  # nothing crossed either: the paper's own reported failure
            raise no_crossing(trace, cfg, threshold, acc0)
        raise GuardNoSafeStep(
            f"the damage guard found no step that heals within δ={gcfg.max_damage:g} points of proxy accuracy: "
            f"{decision.reason}. The model was NOT changed. Raise --max-damage, or pass --allow-damage to take "
            "the paper's k* anyway", trace, decision, info)
    state = evaluator.healed_state(choice.k)
    model = getattr(evaluator, "model", None)
    if isinstance(model, nn.Module):
        model.load_state_dict(state)
    return GuardResult(k_star=choice.k, s=choice.s, alpha=choice.alpha, n_selected=choice.n_selected, acc0=acc0,
                       threshold=threshold, trace=trace, evaluations=len(trace), strategy=strategy,
                       state_dict=state, guard=info)


def guard_search(evaluator: Any, config: PTNConfig | None = None, guard: GuardConfig | None = None,
                 allow_damage: bool = False, search: Callable[..., PTNResult] | None = None,
                 progress: bool = False) -> GuardResult:
    """The paper's search on Sf alone, then :func:`guard_choose` with the proxy at the steps it asks for.

    ``search(evaluator, config)`` is the paper's search (default :func:`ptn_search`; the Ray
    backend passes its Tune search); it runs while the evaluator leaves the proxy out, and
    the proxy steps are measured by ``evaluator`` itself. ``evaluator`` must carry the proxy.
    """
    cfg = config or getattr(evaluator, "config", None) or PTNConfig()
    gcfg = guard or GuardConfig()
    threshold = crossing_threshold(evaluator, cfg)
    base = evaluator.proxy_base  # split at θ0 before the search
    if base is None:
        raise PotionError("the damage guard needs a clean proxy: build the StepEvaluator with proxy_batches "
                          "(a slice of the retain set)")
    with evaluator.forget_only():
        try:
            paper = (search or (lambda ev, c: ptn_search(ev, c, progress=progress)))(evaluator, cfg)
            scan, k_paper = paper.trace, paper.k_star
        except PTNNoCrossing as e:
            scan, k_paper = e.trace, None
    decision, measured = guard_choose(scan, k_paper, evaluator.evaluate, threshold=threshold,
                                      acc0=float(evaluator.acc0), base=base, cfg=gcfg, max_steps=cfg.max_steps)
    trace = list({**{r.k: r for r in scan}, **measured}.values())
    return guard_result(evaluator, cfg, gcfg, trace, decision, f"guard-{cfg.strategy}", allow_damage)
