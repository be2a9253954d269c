"""Unlearning methods behind one entry point, ``heal(name, ctx)`` (SPEC §9).

A method sees the world only through :class:`HealContext`: the model and θ0, batch
sources for Dr and Sf, and optional callables through which the pipeline plugs in what
this package must not know about (the importance cache or a Ray-sharded pass, a Ray
search backend, retraining with the run's recipe, and — for the ``ssd_grid`` baseline
only — a score that reads ground truth).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from potion.errors import PotionError
from potion.registry import Registry
from potion.unlearning.dampening import dampen
from potion.unlearning.guard import GuardConfig, guard_search
from potion.unlearning.importances import compute_importances, importance_sums
from potion.unlearning.plus_config import PlusConfig
from potion.unlearning.sampling import RetainSample, SampledImportances, sampled_pass
from potion.unlearning.task_vector import TaskVectorConfig
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.finetune import FinetuneConfig
from potion.unlearning.ptn import PTNConfig, PTNResult, ptn_search

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
Which = Literal["forget", "retain"]
# (estimator, p, batches_fn, which) -> importances. A sampled retain pass is asked for with the
# keywords ``sample`` (a RetainSample) and ``reference`` (I_f, which the auto rule ranks against).
ImportanceFn = Callable[..., Mapping[str, Tensor]]

# Goel et al.'s SSD tuning grid (SPEC §9): α values and λ as multiples of α.
SSD_GRID_ALPHAS: tuple[float, ...] = (0.1, 1.0, 10.0, 50.0, 100.0, 500.0, 1e3, 1e4, 1e5, 1e6)
SSD_GRID_LAMBDA_FACTORS: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 10.0)
# λ outside this range is skipped. The rule is defined for every λ > 0, so by default
# nothing is skipped; narrow it to shorten the grid.
SSD_GRID_LAMBDA_RANGE: tuple[float, float] = (0.0, float("inf"))

TIMING_KEYS = ("importance_forget_s", "importance_retain_s", "search_s", "total_s")


@dataclass
class HealContext:
    model: nn.Module
    state0: Mapping[str, Tensor]
    retain_batches: Callable[[], Iterable]  # a fresh pass over Dr per call
    forget_batches: Sequence  # Sf as (x, y) batches with the poisoned labels
    n_forget: int
    n_total: int
    ptn: PTNConfig = field(default_factory=PTNConfig)
    device: str = "cpu"
    progress: bool = False
    # (estimator, p, batches_fn, which) -> importances; None = compute here, no cache.
    importances: ImportanceFn | None = None
    val_batches: Sequence | Callable[[], Iterable] | None = None
    retrain: Callable[[], StateDict] | None = None  # eu: retrain on Dr with θ0's recipe
    grid_score: Callable[[StateDict], float] | None = None  # ssd_grid only: reads ground truth
    ssd_alpha: float = 10.0
    ssd_lambda: float = 1.0
    search: Callable[[StepEvaluator, PTNConfig], PTNResult] | None = None  # e.g. the Ray backend
    retain_total: int | None = None  # number of Dr batches, for the progress bar
    # I_r from a sample of Dr (potion.unlearning.sampling); full = the paper's exact pass.
    retain_sample: RetainSample = field(default_factory=RetainSample.full)
    # Batches of Dr restricted to the given positions (in that order, cut every
    # retain_batch_size): what a sampled pass reads when no ``importances`` plug-in is given.
    retain_batches_at: Callable[[Any], Iterable] | None = None
    n_retain: int | None = None
    retain_batch_size: int | None = None
    fast_eval: bool = False  # CUDA: channels-last + half-precision autocast in the search's checks
    # xlf_ptn_guard: the clean proxy (a slice of Dr, never Sf or the test split), δ and
    # whether a step past δ may be returned (its search on Sf is ``search``, as above)
    proxy_batches: Sequence | None = None
    guard: GuardConfig = field(default_factory=GuardConfig)
    allow_damage: bool = False
    # potion_plus: its switches, the target-labelled retain images (x, y batches) it may grow
    # Sf with, and clean retain images (never the proxy) for NegGrad+ and its repair: a fresh
    # pass per call, in the same order every time
    plus: PlusConfig = field(default_factory=PlusConfig)
    suspect_batches: Sequence | None = None
    repair_batches: Callable[[], Iterable] | None = None
    # the baselines task_vector and finetune (potion.unlearning.baselines)
    task_vector: TaskVectorConfig = field(default_factory=TaskVectorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class HealResult:
    method: str
    state_dict: StateDict
    info: dict[str, Any]
    timings: dict[str, float]


METHODS: Registry[Callable[[HealContext], HealResult]] = Registry("unlearning method")


def _sampled_retain(ctx: HealContext, estimator: str, reference: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if ctx.retain_batches_at is None or not ctx.n_retain or not ctx.retain_batch_size:
        raise PotionError(
            "a sampled retain pass needs retain_batches_at, n_retain and retain_batch_size in the HealContext; "
            "give them or use RetainSample.full()"
        )

    def sum_range(positions):
        return importance_sums(ctx.model, ctx.retain_batches_at(positions), estimator, device=ctx.device)

    imp, record = sampled_pass(sum_range, ctx.n_retain, ctx.retain_batch_size, ctx.retain_sample, reference)
    return SampledImportances(imp, record)


def _importances(ctx: HealContext, estimator: str, which: Which,
                 reference: Mapping[str, Tensor] | None = None) -> tuple[Mapping[str, Tensor], float]:
    batches_fn: Callable[[], Iterable] = (lambda: ctx.forget_batches) if which == "forget" else ctx.retain_batches
    # θ0's importances (the cache keys them by θ0), whatever an earlier step left in the
    # model: potion_plus runs NegGrad+ before it falls back to dampening
    ctx.model.load_state_dict(ctx.state0)
    t0 = time.perf_counter()
    sampled = which == "retain" and not ctx.retain_sample.is_full
    if ctx.importances is not None and sampled:
        imp = ctx.importances(estimator, None, batches_fn, which, sample=ctx.retain_sample, reference=reference)
    elif ctx.importances is not None:
        imp = ctx.importances(estimator, None, batches_fn, which)
    elif sampled:
        imp = _sampled_retain(ctx, estimator, reference)
    else:
        total = len(ctx.forget_batches) if which == "forget" else ctx.retain_total
        imp = compute_importances(
            ctx.model, batches_fn(), estimator, device=ctx.device, progress=ctx.progress, total=total,
            desc=importance_label(estimator, which),
        )
    return imp, time.perf_counter() - t0


def importance_label(estimator: str, which: Which) -> str:
    """The progress-bar label of one importance pass: which set, which estimator."""
    return f"importances on {'deletion set Sf' if which == 'forget' else 'retain set Dr'} ({estimator})"


def retain_sample_record(ctx: HealContext, imp_r: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the retain importances were computed on, for the report."""
    record = getattr(imp_r, "record", None)
    if record is not None:
        return dict(record)
    if ctx.retain_sample.is_full:
        return {"mode": "full", "value": 1.0, "label": "full", "n_retain": ctx.n_retain, "n_used": ctx.n_retain,
                "share_used": 1.0}
    return {"mode": ctx.retain_sample.mode, "value": ctx.retain_sample.value, "label": ctx.retain_sample.label()}


def _both_importances(ctx: HealContext, estimator: str) -> tuple[Mapping, Mapping, dict[str, float]]:
    imp_f, t_f = _importances(ctx, estimator, "forget")
    # I_f first: a sampled retain pass ranks its running estimate against it.
    imp_r, t_r = _importances(ctx, estimator, "retain", reference=imp_f)
    return imp_f, imp_r, {"importance_forget_s": t_f, "importance_retain_s": t_r}


def _clone(state: Mapping[str, Tensor]) -> StateDict:
    return {n: t.detach().clone() for n, t in state.items()}


@METHODS.register("none")
def _none(ctx: HealContext) -> HealResult:
    """θ0 itself: the reference every other method is compared with."""
    return HealResult("none", _clone(ctx.state0), {}, {})


@METHODS.register("ssd")
def _ssd(ctx: HealContext) -> HealResult:
    """SSD with fisher importances and fixed (α, λ) (defaults 10, 1)."""
    imp_f, imp_r, timings = _both_importances(ctx, "fisher")
    state, n_sel = dampen(ctx.state0, imp_f, imp_r, ctx.ssd_alpha, ctx.ssd_lambda)
    info = {"estimator": "fisher", "alpha": float(ctx.ssd_alpha), "lam": float(ctx.ssd_lambda), "n_selected": n_sel,
            "retain_sample": retain_sample_record(ctx, imp_r)}
    return HealResult("ssd", state, info, timings)


@METHODS.register("ssd_grid")
def _ssd_grid(ctx: HealContext) -> HealResult:
    """SSD tuned over Goel et al.'s (α, λ) grid — BENCHMARK ONLY.

    It picks the pair with the best ``ctx.grid_score(state_dict)``, a callback that
    measures ra and clean accuracy on held-out data, i.e. it reads ground truth a model
    owner would not have. Use it as a reference point, never to heal a real model.
    """
    if ctx.grid_score is None:
        raise PotionError(
            "method 'ssd_grid' needs a grid_score callback (it tunes on ground truth and is a "
            "benchmark baseline only); use ssd_ptn or xlf_ptn to heal a model"
        )
    imp_f, imp_r, timings = _both_importances(ctx, "fisher")
    t0 = time.perf_counter()
    grid: list[dict[str, Any]] = []
    best: tuple[float, StateDict, dict[str, Any]] | None = None
    lo, hi = SSD_GRID_LAMBDA_RANGE
    for alpha in SSD_GRID_ALPHAS:
        for factor in SSD_GRID_LAMBDA_FACTORS:
            lam = factor * alpha
            if not (lo < lam <= hi):
                continue
            state, n_sel = dampen(ctx.state0, imp_f, imp_r, alpha, lam)
            score = float(ctx.grid_score(state))
            point = {"alpha": alpha, "lam": lam, "n_selected": n_sel, "score": score}
            grid.append(point)
            if best is None or score > best[0]:  # ties keep the earlier (gentler) pair
                best = (score, state, point)
            del state
    timings["search_s"] = time.perf_counter() - t0
    assert best is not None
    _, state, point = best
    info = {
        "estimator": "fisher",
        **point,
        "grid": grid,
        "uses_ground_truth": True,
        "retain_sample": retain_sample_record(ctx, imp_r),
        "note": "benchmark only: (alpha, lambda) chosen with a score that reads ground truth (SPEC §9)",
    }
    return HealResult("ssd_grid", state, info, timings)


def _ptn_method(name: str, estimator: str) -> Callable[[HealContext], HealResult]:
    def run(ctx: HealContext) -> HealResult:
        imp_f, imp_r, timings = _both_importances(ctx, estimator)
        t0 = time.perf_counter()
        evaluator = StepEvaluator(
            ctx.model, ctx.state0, imp_f, imp_r, ctx.forget_batches, ctx.n_forget, ctx.n_total,
            ctx.ptn, val_batches=ctx.val_batches, device=ctx.device, fast=ctx.fast_eval,
        )
        if ctx.search is not None:
            res = ctx.search(evaluator, ctx.ptn)
        else:
            res = ptn_search(evaluator, ctx.ptn, progress=ctx.progress)
        timings["search_s"] = time.perf_counter() - t0
        info = {"estimator": estimator, "lam": 1.0, "ptn": dataclasses.asdict(ctx.ptn),
                "retain_sample": retain_sample_record(ctx, imp_r), **res.to_dict()}
        return HealResult(name, res.state_dict, info, timings)

    run.__doc__ = f"PTN search (SPEC §8) over SSD dampening with {estimator} importances."
    return run


@METHODS.register("xlf_ptn_guard")
def _xlf_ptn_guard(ctx: HealContext) -> HealResult:
    """XLF + PTN with the damage guard (beyond the paper): the step is chosen so that the
    clean proxy's damage stays within δ (potion.unlearning.guard)."""
    if ctx.proxy_batches is None:
        raise PotionError("method 'xlf_ptn_guard' needs a clean proxy (proxy_batches: a slice of the retain set)")
    imp_f, imp_r, timings = _both_importances(ctx, "xlf")
    t0 = time.perf_counter()
    evaluator = StepEvaluator(
        ctx.model, ctx.state0, imp_f, imp_r, ctx.forget_batches, ctx.n_forget, ctx.n_total,
        ctx.ptn, val_batches=ctx.val_batches, device=ctx.device, fast=ctx.fast_eval,
        proxy_batches=ctx.proxy_batches,
    )
    res = guard_search(evaluator, ctx.ptn, ctx.guard, ctx.allow_damage, search=ctx.search, progress=ctx.progress)
    timings["search_s"] = time.perf_counter() - t0
    info = {"estimator": "xlf", "lam": 1.0, "ptn": dataclasses.asdict(ctx.ptn),
            "retain_sample": retain_sample_record(ctx, imp_r), **res.to_dict()}
    return HealResult("xlf_ptn_guard", res.state_dict, info, timings)


METHODS.register("ssd_ptn")(_ptn_method("ssd_ptn", "fisher"))
METHODS.register("lf_ptn")(_ptn_method("lf_ptn", "lf"))
METHODS.register("xlf_ptn")(_ptn_method("xlf_ptn", "xlf"))


@METHODS.register("eu")
def _eu(ctx: HealContext) -> HealResult:
    """Exact unlearning: re-initialise and retrain on Dr with θ0's recipe (caller's callback)."""
    if ctx.retrain is None:
        raise PotionError("method 'eu' needs a retrain callback that retrains the model on the retain set")
    t0 = time.perf_counter()
    state = ctx.retrain()
    return HealResult("eu", dict(state), {}, {"retrain_s": time.perf_counter() - t0})


def heal(method_name: str, ctx: HealContext) -> HealResult:
    """Run one method from θ0; the returned state is also loaded into ``ctx.model``."""
    fn = METHODS.get(method_name)
    t0 = time.perf_counter()
    # A private θ0: the caller's state0 is often model.state_dict(), whose tensors alias
    # the weights that the search overwrites with every θ_k.
    # Sf is read twice (importances, then every PTN step): a generator would run dry.
    ctx = dataclasses.replace(ctx, state0=_clone(ctx.state0), forget_batches=list(ctx.forget_batches))
    ctx.model.load_state_dict(ctx.state0)  # importances must be measured at θ0
    result = fn(ctx)
    result.timings = {**{k: 0.0 for k in TIMING_KEYS}, **result.timings, "total_s": time.perf_counter() - t0}
    result.info = {"method": method_name, **result.info}
    ctx.model.load_state_dict(result.state_dict)
    return result
