"""``potion_plus``: the damage guard's heal (``xlf_ptn_guard``) with more of the poison found,
a guarded NegGrad+ step, and, as switches off by default, more dampening rounds and a guarded
repair (beyond the paper; docs/method.md).

1. Grow Sf with the target-labelled retain images that θ0 places with the found poison: by
   its penultimate features (:mod:`potion.unlearning.expansion`) or in the block where the
   found poison stands apart most (:mod:`potion.unlearning.block_scan`); I_f is then
   measured on the grown set.
2. NegGrad+ (:mod:`potion.unlearning.neggrad`) on the grown Sf, from θ0, with a share of Sf
   held out of its updates and, beside each clean batch, clean images with the trigger
   estimated from Sf pasted on (:mod:`potion.unlearning.transplant`). Its latest check whose
   held-out rows cross the stop line within δ of proxy damage is kept
   (:mod:`potion.unlearning.neggrad_guard`), and the heal ends there, with no importance pass.
   Otherwise the heal goes on as without it:
3. Round 1 is the guard's search on the grown Sf (by default the only one: further rounds and
   the repair healed no more, benchmarks/results/heal_more.md). Each further round recomputes I_f at the
   last round's θ and searches again within what is left of δ (I_r stays θ0's: recomputing
   it is the cost of a whole retain pass). A round the guard refuses ends them.
4. After each round, a repair (:mod:`potion.unlearning.repair`) of the guard's step and of the
   paper's deeper k* on clean retain images; a candidate counts only when its damage on the
   proxy, measured against θ0, stays within δ.

The switches are :class:`~potion.unlearning.plus_config.PlusConfig`; all off runs the guard's
own code path and returns its model exactly.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from potion.errors import PotionError
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.expansion import ExpansionRule, fit_expansion
from potion.unlearning.guard import guard_search, proxy_damage
from potion.unlearning.neggrad_guard import NO_REPAIR, RepairSet, guarded_neggrad
from potion.unlearning.importances import compute_importances
from potion.unlearning.block_scan import BlockRule, block_features, scan_blocks
from potion.unlearning.methods import (
    METHODS,
    HealContext,
    HealResult,
    _both_importances,
    _importances,
    retain_sample_record,
)
from potion.unlearning.proxy_split import penultimate_features
from potion.unlearning.ptn import NothingToHeal, PTNNoCrossing, StepResult
from potion.unlearning.repair import guarded_repair
from potion.unlearning.rows import Batches, kept_rows
from potion.unlearning.transplant import clean_stats

Tensor = torch.Tensor


@dataclass(frozen=True)
class PoisonRules:
    """What the expansion fitted at θ0: the penultimate-feature rule and the block rule
    (:mod:`potion.unlearning.block_scan`); an image is poison-like when either flags it."""

    features: ExpansionRule | None
    block: BlockRule | None = None

    def flag(self, model: torch.nn.Module, batches: Sequence, device: str | torch.device = "cpu") -> Tensor:
        """Bool mask over the rows of ``batches`` (the model at θ0, in eval mode)."""
        n = sum(len(y) for _, y in batches)
        mask = torch.zeros(n, dtype=torch.bool)
        if not n:
            return mask
        if self.features is not None:
            mask |= self.features.flag(penultimate_features(model, (x.to(device) for x, _ in batches)).cpu())
        if self.block is not None:
            mask |= self.block.flag(block_features(model, (x.to(device) for x, _ in batches)))
        return mask


def grow_mask(model: torch.nn.Module, forget_batches: Sequence, suspect_batches: Sequence, precision: float,
              device: str | torch.device = "cpu", null_batches: Sequence | None = None,
              block_precision: float = 0.95) -> tuple[PoisonRules | None, Tensor]:
    """The expansion rules fitted at the model's weights (θ0) and their mask over the suspects.

    Only the found samples θ0 itself sends to their poisoned label anchor the rules: those
    are the ones the backdoor acts on. On a model without the backdoor there are none, and
    nothing is found (the feature rule alone flagged 13 clean images on a clean toy MLP).
    ``null_batches`` (retain images under the other labels) turn on the block rule.
    """
    model.eval()
    with torch.no_grad():
        acted = [(x[model(x.to(device)).argmax(1).cpu() == y.cpu()], y) for x, y in forget_batches]
    acted = [(x, y) for x, y in acted if len(x)]
    n_cand = sum(len(y) for _, y in suspect_batches)
    if not acted or not n_cand:
        return None, torch.zeros(n_cand, dtype=torch.bool)
    cand = penultimate_features(model, (x.to(device) for x, _ in suspect_batches)).cpu()
    anchor = penultimate_features(model, (x.to(device) for x, _ in acted)).cpu()
    rules = PoisonRules(fit_expansion(anchor, cand, precision))
    mask = rules.features.flag(cand)
    if null_batches and any(len(y) for _, y in null_batches):
        feats = lambda bs: block_features(model, (x.to(device) for x, _ in bs if len(x)))
        cand_blocks = feats(suspect_batches)
        block, _ = scan_blocks(cand_blocks, feats(acted), feats(null_batches), block_precision)
        if block is not None:
            rules = PoisonRules(rules.features, block)
            mask |= block.flag(cand_blocks)
    return rules, mask


def _other_labels(batches: Sequence, targets: Tensor) -> Batches:
    """The rows of ``batches`` whose label is not one of ``targets``, per batch; batches left
    empty are dropped."""
    out = []
    for x, y in batches:
        t = ~torch.isin(y.cpu(), targets)
        if t.any():
            out.append((x[t.to(x.device)], y[t.to(y.device)]))
    return out


def _flagged(ctx: HealContext, rules: PoisonRules | None, x: Tensor, y: Tensor, targets: Tensor) -> Tensor:
    """Which rows of one batch are target-labelled and poison-like to the rules (the model at θ0)."""
    flag = torch.zeros(len(y), dtype=torch.bool)
    is_t = torch.isin(y.cpu(), targets)
    if rules is not None and is_t.any():
        flag[is_t] = rules.flag(ctx.model, [(x[is_t.to(x.device)], y[is_t.to(y.device)])], ctx.device)
    return flag


def _targets(ctx: HealContext) -> Tensor:
    """The labels of Sf: the poison's target labels."""
    return torch.unique(torch.cat([y.reshape(-1).cpu() for _, y in ctx.forget_batches]))


def _expansion(ctx: HealContext) -> tuple[PoisonRules | None, Tensor | None, dict[str, Any]]:
    """The rules fitted on θ0 and their mask over the suspects (None without suspects). The
    block rule's null: the proxy's images under the other labels."""
    cfg = ctx.plus
    if not ctx.suspect_batches or not (cfg.expand or cfg.clean_steps):
        return None, None, {"candidates": 0, "found": 0}
    ctx.model.load_state_dict(ctx.state0)
    null = None
    if cfg.expand_blocks and ctx.proxy_batches:
        null = _other_labels(ctx.proxy_batches, _targets(ctx))
    rules, mask = grow_mask(ctx.model, ctx.forget_batches, ctx.suspect_batches, cfg.expand_precision, ctx.device,
                            null_batches=null, block_precision=cfg.expand_blocks_precision)
    found = torch.nonzero(mask).flatten().tolist()
    block = rules.block if rules is not None else None
    record = {"candidates": len(mask), "found": len(found), "found_positions": found,
              "block": None if block is None else {"layer": block.layer, "gap": round(block.gap, 3),
                                                   "threshold": round(block.threshold, 4)}}
    return rules, mask, record


def _repair_set(ctx: HealContext, rules: PoisonRules | None, targets: Tensor) -> RepairSet:
    """The repair's clean images as a fresh pass per call, in the same order, one batch in memory
    at a time (ILSVRC's 12,800 would be 7.7 GB as tensors): target-labelled ones the rules call
    poison-like at θ0 are left out, found in one first pass."""
    if ctx.repair_batches is None:
        return NO_REPAIR
    ctx.model.load_state_dict(ctx.state0)
    ctx.model.eval()
    drops, labels = [], []

    def first_pass():
        for x, y in ctx.repair_batches():
            drop = _flagged(ctx, rules, x, y, targets)
            drops.append(drop)
            labels.append(y.cpu())
            yield x[(~drop).to(x.device)]

    stats = clean_stats(first_pass())

    def passes():
        for (x, y), drop, seen in zip(ctx.repair_batches(), drops, labels):
            if not torch.equal(y.cpu(), seen):  # the flags would land on other images
                raise PotionError("potion_plus: the clean retain images came in another order than in the first "
                                  "pass; their source must give the same order on every pass")
            keep = ~drop
            if keep.any():
                yield x[keep.to(x.device)].to(ctx.device), y[keep.to(y.device)].to(ctx.device)

    dropped = int(sum(int(d.sum()) for d in drops))
    kept = sum(len(d) for d in drops) - dropped
    in_target = sum(int((torch.isin(lbl, targets) & ~d).sum()) for lbl, d in zip(labels, drops))
    return RepairSet(passes, kept, dropped, stats, in_target / kept if kept else 0.0)


def _pick(options: list[tuple[str, dict, StepResult, float]], threshold: float, delta: float, tolerance: float):
    """Within δ (damage against θ0): the least damaging one that crosses ρ·acc0, else the least
    damaging one within ``tolerance`` of the lowest a_k (a repair may raise a_k that much; the
    damage it wins back is δ left for the next round)."""
    ok = [o for o in options if o[3] >= -delta]
    crossing = [o for o in ok if o[2].acc_forget <= threshold]
    if crossing:
        return max(crossing, key=lambda o: o[3])
    if not ok:
        return None
    low = min(o[2].acc_forget for o in ok)
    return max((o for o in ok if o[2].acc_forget <= low + tolerance), key=lambda o: (o[3], -o[2].acc_forget))


@METHODS.register("potion_plus")
def _potion_plus(ctx: HealContext) -> HealResult:
    """XLF + PTN + the damage guard, with Sf grown and a guarded NegGrad+ step first."""
    if ctx.proxy_batches is None:
        raise PotionError("method 'potion_plus' needs a clean proxy (proxy_batches: a slice of the retain set)")
    cfg = ctx.plus
    t0 = time.perf_counter()
    rule, mask, expansion = _expansion(ctx)
    forget, n_forget = ctx.forget_batches, ctx.n_forget
    targets = _targets(ctx)
    if cfg.expand and mask is not None and mask.any():
        size = max(len(y) for _, y in ctx.forget_batches)
        grown = torch.cat([torch.ones(n_forget, dtype=torch.bool), mask])
        forget = kept_rows(list(ctx.forget_batches) + list(ctx.suspect_batches), grown, size)
        n_forget += int(mask.sum())
    t_rep = time.perf_counter()
    repair = _repair_set(ctx, rule, targets) if cfg.clean_steps else NO_REPAIR
    stages = {"expansion_s": t_rep - t0, "repair_pass_s": time.perf_counter() - t_rep}
    plus_info = {**dataclasses.asdict(cfg), "expansion": expansion, "n_forget_grown": n_forget,
                 "repair_dropped": repair.dropped, "repair_images": repair.kept}
    if cfg.neggrad_steps and repair.kept and n_forget >= cfg.neggrad_min_forget:
        t_ng = time.perf_counter()
        state, plus_info["neggrad"] = guarded_neggrad(ctx, forget, n_forget, repair)
        if state is not None:
            info = {"estimator": None, "step": "neggrad", "acc0": plus_info["neggrad"]["acc0"],
                    "threshold": plus_info["neggrad"]["threshold"], "plus": plus_info}
            return HealResult("potion_plus", state, info, {**stages, "neggrad_s": time.perf_counter() - t_ng})
    if cfg.expand and mask is not None and mask.any():
        # the grown set is new to the importance cache: measured here (Sf is small)
        ctx.model.load_state_dict(ctx.state0)
        imp_f = compute_importances(ctx.model, forget, "xlf", device=ctx.device)
        timings = {"importance_forget_s": time.perf_counter() - t0}
        imp_r, timings["importance_retain_s"] = _importances(ctx, "xlf", "retain", reference=imp_f)
    else:
        imp_f, imp_r, timings = _both_importances(ctx, "xlf")
    t_search = time.perf_counter()
    delta = ctx.guard.max_damage
    state, first, ev0, rounds = ctx.state0, None, None, []
    for r in range(cfg.rounds):
        if r:
            ctx.model.load_state_dict(state)
            imp_f = compute_importances(ctx.model, forget, "xlf", device=ctx.device)
        ev = StepEvaluator(ctx.model, state, imp_f, imp_r, forget, n_forget, ctx.n_total, ctx.ptn,
                           val_batches=ctx.val_batches, device=ctx.device, fast=ctx.fast_eval,
                           proxy_batches=ctx.proxy_batches)
        budget = delta if ev0 is None else delta + rounds[-1]["damage"]
        try:
            res = guard_search(ev, ctx.ptn, dataclasses.replace(ctx.guard, max_damage=max(budget, 0.0)),
                               ctx.allow_damage and r == 0, search=ctx.search, progress=ctx.progress)
        except (PTNNoCrossing, NothingToHeal):  # the guard's refusal too: a later round keeps the last
            if r == 0:
                raise
            break
        if ev0 is None:
            ev0, first = ev, res
        if cfg.rounds == 1 and not cfg.repair_steps:  # the guard's step as it chose it
            state = res.state_dict
            break
        chosen = _round(ctx, ev0, ev, res, list(repair.passes()) if cfg.repair_steps and repair.kept else [], delta)
        if chosen is None:
            break
        state = chosen[1]
        rounds.append({"round": r + 1, "k": res.k_star, "status": res.guard.get("status"), "picked": chosen[0],
                       "acc_forget": chosen[2].acc_forget, "damage": chosen[3], **chosen[4]})
        if delta + chosen[3] <= 0:  # δ spent
            break
    timings["search_s"] = time.perf_counter() - t_search
    info = {"estimator": "xlf", "step": "dampening", "lam": 1.0, "ptn": dataclasses.asdict(ctx.ptn),
            "retain_sample": retain_sample_record(ctx, imp_r), **first.to_dict(),
            "plus": {**plus_info, "rounds": rounds}}
    return HealResult("potion_plus", {n: t.detach().clone() for n, t in state.items()}, info, timings)


def _round(ctx: HealContext, ev0: StepEvaluator, ev: StepEvaluator, res, repair: Batches, delta: float):
    """This round's step, and its repairs, measured against θ0; the pick (see :func:`_pick`)."""
    cfg = ctx.plus
    base, acc0 = ev0.proxy_base, float(ev0.acc0)

    def measured(name: str, state: dict, extra: dict) -> tuple[str, dict, StepResult, float, dict]:
        r = ev0.evaluate_state(state, res.k_star)
        return name, state, r, proxy_damage(r, base, acc0, 0.0), extra

    options = [measured("guard", res.state_dict, {})]
    if cfg.repair_steps and repair:
        starts = [("guard+repair", res.k_star, res.state_dict)]
        k_paper = res.guard.get("k_paper")
        if k_paper is not None and k_paper != res.k_star:
            starts.append(("paper+repair", k_paper, ev.healed_state(k_paper)))
        for name, k, start in starts:
            ctx.model.load_state_dict(start)
            a_k = ev0.forget_accuracy()
            fixed, rec = guarded_repair(ctx.model, start, repair, lambda m: ev0.forget_accuracy(),
                                        a_k + cfg.repair_tolerance, steps=cfg.repair_steps, lr=cfg.repair_lr,
                                        check_every=cfg.repair_check, device=ctx.device)
            options.append(measured(name, fixed, {"repair": {"k": k, **rec.to_dict()}}))
    return _pick(options, ctx.ptn.rho * acc0, delta, cfg.repair_tolerance)
