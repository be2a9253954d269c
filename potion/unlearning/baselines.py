"""Two newer baselines on the heal path, registered in ``METHODS`` (beyond the paper):

- ``task_vector``: CUTS-style task-vector negation (potion.unlearning.task_vector), the scale
  chosen by Sf's accuracy against PTN's threshold ρ · acc0;
- ``finetune``: a short SGD run on the retain set Dr = D − Sf alone (potion.unlearning.finetune),
  so that a repair's own share of a heal is visible.

Neither reads ground truth: they see Sf (with its poisoned labels) and Dr, as every method.
"""
from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import numpy as np

from potion.unlearning.finetune import rebatch, sgd_steps
from potion.unlearning.methods import METHODS, HealContext, HealResult
from potion.unlearning.ptn import PTNNoCrossing, crossing_threshold
from potion.unlearning.task_vector import accuracy_on, choose_scale, negated, task_vector


@METHODS.register("task_vector")
def _task_vector(ctx: HealContext) -> HealResult:
    """θ0 − λ·τ with τ from fine-tuning on Sf; λ the smallest scale that brings Sf to ρ · acc0."""
    cfg, model, forget = ctx.task_vector, ctx.model, ctx.forget_batches
    t0 = time.perf_counter()
    model.load_state_dict(ctx.state0)
    acc0 = accuracy_on(model, forget, ctx.device)
    threshold = crossing_threshold(SimpleNamespace(acc0=acc0), ctx.ptn)  # NothingToHeal when acc0 = 0
    tau = task_vector(model, ctx.state0, forget, cfg, ctx.device)
    t_tune = time.perf_counter() - t0

    def acc_at(lam: float) -> float:
        model.load_state_dict(negated(ctx.state0, tau, lam))
        return accuracy_on(model, forget, ctx.device)

    lam, scales = choose_scale(acc_at, threshold, cfg)
    timings = {"finetune_s": t_tune, "search_s": time.perf_counter() - t0 - t_tune}
    if lam is None:
        last = scales[-1]
        raise PTNNoCrossing(
            f"task_vector found no scale lambda <= {cfg.max_scale} with accuracy on the deletion set <= "
            f"{threshold:.4f} (rho={ctx.ptn.rho} x acc0={acc0:.4f}); last {last.acc_forget:.4f} at "
            f"lambda={last.lam:g}. Raise task_vector.max_scale or task_vector.steps", [])
    norm = float(sum(float((t.float() ** 2).sum()) for t in tau.values()) ** 0.5)
    info = {"lam": lam, "acc0": acc0, "threshold": threshold, "tau_norm": norm,
            "scales": [s.to_dict() for s in scales], "task_vector": dataclasses.asdict(cfg)}
    return HealResult("task_vector", negated(ctx.state0, tau, lam), info, timings)


@METHODS.register("finetune")
def _finetune(ctx: HealContext) -> HealResult:
    """``finetune.steps`` SGD steps on Dr, read in a seeded random order (Dr is often stored
    sorted by label, and single-class batches would teach one class at a time)."""
    cfg = ctx.finetune
    rng = np.random.default_rng(cfg.seed)
    if ctx.retain_batches_at is not None and ctx.n_retain:
        def batches():
            return rebatch(ctx.retain_batches_at(rng.permutation(ctx.n_retain)), cfg.batch_size)
    else:  # an in-memory Dr (potion.heal_model): its batches in a random order
        stored = list(ctx.retain_batches())

        def batches():
            return rebatch((stored[i] for i in rng.permutation(len(stored))), cfg.batch_size)
    t0 = time.perf_counter()
    state, losses = sgd_steps(ctx.model, ctx.state0, batches, cfg.steps, cfg.lr, cfg.momentum, cfg.weight_decay,
                              train_mode=True, device=ctx.device)
    info = {"finetune": dataclasses.asdict(cfg), "loss_first": losses[0], "loss_last": losses[-1]}
    return HealResult("finetune", state, info, {"finetune_s": time.perf_counter() - t0})
