"""The damage guard of ``xlf_ptn_guard``: PTN that never returns a θ the clean proxy calls
damaged by more than δ.

Beyond the paper (SPEC §8 reads only the deletion set Sf). Every evaluated step also
measures accuracy on a clean *proxy*: a seeded slice of the retain set Dr (never the test
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

The selection is a pure function of the scanned steps (:func:`guard_scan`), so the local loop
(:func:`guard_search`) and the Ray Tune searcher call the same code and make the same choice:
the scan is always a contiguous prefix k = 0..H, and H itself is decided from the prefix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from potion.errors import PotionError
from potion.unlearning.ptn import (
    PTNConfig,
    PTNNoCrossing,
    PTNResult,
    ProxyBase,
    StepResult,
    crossing_threshold,
    no_crossing,
)

Tensor = torch.Tensor


@dataclass
class GuardConfig:
    # δ in percentage points of (poison-corrected) proxy accuracy; see benchmarks/results/guard.md
    max_damage: float = 1.0
    # how many steps past the paper's k* the guard may look for a step that heals more
    ahead: int = 0
    # stop the scan after this many consecutive steps over δ (further dampening only adds damage)
    patience: int = 10
    heal_min: float = 0.5
    # the û discount's upper bound; 0 turns it off (see the module docstring)
    poison_cap: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_damage) and self.max_damage >= 0):
            raise PotionError(f"guard.max_damage (δ, points of proxy accuracy) must be >= 0, got {self.max_damage}")
        for name in ("ahead", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "ahead" else 1):
                raise PotionError(f"guard.{name} must be an integer >= {0 if name == 'ahead' else 1}, got {v!r}")
        if not (0 < self.heal_min <= 1):
            raise PotionError(f"guard.heal_min must lie in (0, 1], got {self.heal_min}")
        if not (0 <= self.poison_cap <= 1):
            raise PotionError(f"guard.poison_cap must lie in [0, 1], got {self.poison_cap}")


@dataclass
class GuardDecision:
    done: bool
    horizon: int  # the last k of the prefix the decision uses
    choice: StepResult | None
    k_paper: int | None  # the paper's k* (first crossing) within the prefix
    reason: str
    status: str  # "k_star", "ahead", "partial", "none", "more"
    poison_share: float  # û
    damage: dict[int, float] = field(default_factory=dict)  # estimated proxy damage per k (points, ≤ 0 is loss)

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "k_choice": None if self.choice is None else self.choice.k,
                "k_paper": self.k_paper, "reason": self.reason, "status": self.status,
                "poison_share": self.poison_share, "damage": {str(k): v for k, v in self.damage.items()}}


class GuardNoSafeStep(PTNNoCrossing):
    """No step heals within δ: a reported failure (with the curve), never a model."""

    def __init__(self, message: str, trace: list[StepResult], decision: GuardDecision):
        super().__init__(message, trace)
        self.decision = decision


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
        raise PotionError(f"step k={r.k} has no proxy accuracy; the guard needs a proxy at every step")
    if base.n_target == 0 or base.acc_target is None or r.acc_proxy_target is None:
        return 100.0 * (r.acc_proxy - base.acc)
    w_t = base.n_target / base.n
    other = 0.0 if base.acc_other is None else base.acc_other - (r.acc_proxy_other or 0.0)
    target = max(0.0, base.acc_target - r.acc_proxy_target - poison_share * healed_fraction(r.acc_forget, acc0))
    return -100.0 * ((1 - w_t) * other + w_t * target)


def _prefix(trace: Sequence[StepResult]) -> list[StepResult]:
    by_k = {r.k: r for r in trace}
    out = []
    while len(out) in by_k:
        out.append(by_k[len(out)])
    return out


def guard_scan(trace: Sequence[StepResult], *, threshold: float, acc0: float, base: ProxyBase,
               cfg: GuardConfig, max_steps: int) -> GuardDecision:
    """Decide from the contiguous prefix k = 0, 1, … of ``trace`` (any other steps are ignored).

    The scan is done at the first prefix end H where: H = k* + ahead (k* the first crossing
    of ρ·acc0); or ``patience`` consecutive steps have broken δ; or H = max_steps. Then the
    choice on 0..H is: among crossing steps k* ≤ k ≤ k* + ahead within δ, the lowest a_k
    (ties: smallest k); else among steps below k* (all of 0..H without a crossing) within
    δ that lower a_k at all, the lowest a_k (ties: least damage, then smallest k) — a
    partial heal; else none.
    """
    steps = _prefix(trace)
    horizon = None
    k_paper = None
    over = 0
    u_min = math.inf  # running min of drop_t / F_k: û of the prefix seen so far
    for r in steps:
        if k_paper is None and r.acc_forget <= threshold:
            k_paper = r.k
        # û from the steps seen so far: the stopping rule then depends on the prefix only
        ratio = poison_ratio(r, base, acc0, cfg)
        u_min = u_min if ratio is None else min(u_min, ratio)
        u = 0.0 if math.isinf(u_min) else min(cfg.poison_cap, u_min)
        over = over + 1 if proxy_damage(r, base, acc0, u) < -cfg.max_damage else 0
        if (k_paper is not None and r.k >= k_paper + cfg.ahead) or over >= cfg.patience or r.k >= max_steps:
            horizon = r.k
            break
    if horizon is None:
        return GuardDecision(False, len(steps) - 1, None, k_paper, "scan not finished", "more", 0.0)
    steps = steps[: horizon + 1]
    u = estimate_poison_share(steps, base, acc0, cfg)
    dmg = {r.k: proxy_damage(r, base, acc0, u) for r in steps}
    ok = {k: d >= -cfg.max_damage for k, d in dmg.items()}
    delta = cfg.max_damage

    if k_paper is not None:
        window = [r for r in steps if k_paper <= r.k <= k_paper + cfg.ahead and r.acc_forget <= threshold and ok[r.k]]
        if window:
            best = min(window, key=lambda r: (r.acc_forget, r.k))
            if best.k == k_paper:
                reason = (f"the paper's k*={k_paper} keeps the proxy within δ={delta:g} points "
                          f"(proxy damage {dmg[k_paper]:+.2f})")
                status = "k_star"
            else:
                reason = (f"stepped past the paper's k*={k_paper} to k={best.k}: a_k {best.acc_forget:.4f} "
                          f"< {steps[k_paper].acc_forget:.4f} with proxy damage {dmg[best.k]:+.2f} within δ={delta:g}")
                status = "ahead"
            return GuardDecision(True, horizon, best, k_paper, reason, status, u, dmg)
    below = [r for r in steps if (k_paper is None or r.k < k_paper) and ok[r.k] and r.acc_forget < acc0]
    if k_paper is not None:
        why = f"the paper's k*={k_paper} breaks δ={delta:g} (proxy damage {dmg[k_paper]:+.2f})"
    elif horizon >= max_steps:
        why = f"no step k <= {max_steps} reaches ρ·acc0={threshold:.4f}"
    else:
        why = (f"the proxy broke δ={delta:g} at {cfg.patience} consecutive steps up to k={horizon} "
               f"before any step reached ρ·acc0={threshold:.4f}")
    if below:
        best = min(below, key=lambda r: (r.acc_forget, -dmg[r.k], r.k))
        reason = (f"{why}; best step within δ: k={best.k} (a_k {best.acc_forget:.4f} against ρ·acc0 "
                  f"{threshold:.4f}, proxy damage {dmg[best.k]:+.2f}): a partial heal")
        return GuardDecision(True, horizon, best, k_paper, reason, "partial", u, dmg)
    return GuardDecision(True, horizon, None, k_paper,
                         f"{why}; no step lowers the accuracy on the deletion set within δ", "none", u, dmg)


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
    # Every evaluated step stays in the record (a parallel backend may have run a few past
    # the horizon); the decision used only k = 0..horizon.
    trace = sorted(trace, key=lambda r: r.k)
    info = {**decision.to_dict(), "max_damage": gcfg.max_damage, "ahead": gcfg.ahead, "patience": gcfg.patience,
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
            "the paper's k* anyway", trace, decision)
    state = evaluator.healed_state(choice.k)
    model = getattr(evaluator, "model", None)
    if isinstance(model, nn.Module):
        model.load_state_dict(state)
    return GuardResult(k_star=choice.k, s=choice.s, alpha=choice.alpha, n_selected=choice.n_selected, acc0=acc0,
                       threshold=threshold, trace=trace, evaluations=len(trace), strategy=strategy,
                       state_dict=state, guard=info)


def guard_search(evaluator: Any, config: PTNConfig | None = None, guard: GuardConfig | None = None,
                 allow_damage: bool = False) -> GuardResult:
    """Linear scan k = 0, 1, … until :func:`guard_scan` is done; returns its choice.

    ``evaluator`` must measure the proxy (``proxy_base``, and ``acc_proxy*`` in its steps).
    """
    cfg = config or getattr(evaluator, "config", None) or PTNConfig()
    gcfg = guard or GuardConfig()
    threshold = crossing_threshold(evaluator, cfg)
    acc0 = float(evaluator.acc0)
    base = evaluator.proxy_base
    trace: list[StepResult] = []
    for k in range(cfg.max_steps + 1):
        trace.append(evaluator.evaluate(k))
        decision = guard_scan(trace, threshold=threshold, acc0=acc0, base=base, cfg=gcfg, max_steps=cfg.max_steps)
        if decision.done:
            break
    return guard_result(evaluator, cfg, gcfg, trace, decision, "guard-linear", allow_damage)
