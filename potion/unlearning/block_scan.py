"""Growing Sf from the block where the found poison stands apart most (beyond the paper; issue 20).

The penultimate-feature rule (:mod:`potion.unlearning.expansion`) finds all of the MNIST
badnet poison but none of the CIFAR-10 sine poison: there θ0 separates the trigger most in a
middle block (ResNet-9's ``res2``: the unfound poison ranks above the clean target images
with AUC 0.997–0.999 by the score below, 0.90–0.99 at the penultimate layer, where the other
rule's 2-means splits nothing off; benchmarks/block_probe.py, results in
benchmarks/results/heal_more.md). This rule scans the model's blocks, at each one's output
pooled over space (or tokens):

1. The score of a candidate (a target-labelled retain image) is its cosine, centred on the
   candidates' mean, to the mean direction of the found poison Sf.
2. The null is the same score of retain images under the *other* labels. Poison is made
   from images of the other classes, then relabelled: those images share what sets the
   poison apart from the target class except the trigger, so their scores bound the clean
   candidates' from above. A block counts only where they do at the quartiles (all three
   above the candidates'); deeper blocks, where the trigger dominates, fail that test.
3. The threshold is the lowest score at which the estimated precision, (N(≥ t) −
   |candidates| · P_null(≥ t)) / N(≥ t), still reaches ``precision``.
4. The flagged group must stand apart and be a group: its lowest score lies at least
   ``MIN_GAP`` robust σ above the median of the other candidates, and it holds at least
   ``MIN_SHARE`` of them. Of the blocks that pass, the widest gap wins.

Measured in the heals of benchmarks/results/heal_more.md: CIFAR sine 91–98 % of the
unfound poison at precision 0.98–1.00 (``res2``); on MNIST badnet the first block (the patch
itself) stands apart by 16–68 σ. The gates were set on those models (see ``MIN_GAP``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from potion.unlearning.expansion import robust_normal

Tensor = torch.Tensor
# A block's flagged group counts when it stands apart by MIN_GAP robust σ (its lowest score
# above the median of the rest) and holds MIN_SHARE of the candidates. Measured on four
# benchmark models with clean target images as Sf (32 draws): gaps up to 2.48, but then 17–36
# images, at most 1.8 % of the candidates (a clean image's close neighbours); real poison:
# gaps 2.28–68 with 5.1–9.6 % (benchmarks/results/heal_more.md)
MIN_GAP = 2.25
MIN_SHARE = 0.03
# the precision estimate may dip below target among the first few flagged (one null image
# above them is already a large share); the scan goes on past such dips up to this count
_EARLY = 20


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks scanned: the model's children (through a wrapper that holds one model), a
    Sequential or ModuleList child opened one level (a ViT's ``blocks``), all but a final
    ``nn.Linear`` (the classifier: on the MNIST 60k model 20 clean images as Sf stood apart
    there by 2.41 σ)."""
    prefix = ""
    children = list(model.named_children())
    while len(children) == 1 and list(children[0][1].children()):
        prefix += children[0][0] + "."
        children = list(children[0][1].named_children())
    children = [(prefix + n, c) for n, c in children]
    if children and isinstance(children[-1][1], nn.Linear):
        children = children[:-1]
    out: list[tuple[str, nn.Module]] = []
    for name, child in children:
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            out += [(f"{name}.{i}", c) for i, c in enumerate(child)]
        else:
            out.append((name, child))
    return out


def block_features(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Every block's output for every image, pooled to one vector (mean over space or tokens)."""
    seen: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def keep(module, inputs, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, Tensor) or out.dim() < 2:
                return
            out = out.detach()
            out = out.mean(dim=(2, 3)) if out.dim() == 4 else out.mean(dim=1) if out.dim() == 3 else out
            seen.setdefault(name, []).append(out.flatten(1).float().cpu())
        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in blocks(model)]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v and v[0].shape[1] > 1}


@dataclass(frozen=True)
class BlockRule:
    """The fitted rule: a block, the candidates' centre and Sf's direction there, a threshold."""

    layer: str
    centre: Tensor
    direction: Tensor
    threshold: float
    gap: float

    @classmethod
    def towards(cls, layer: str, candidates: Tensor, anchor: Tensor) -> "BlockRule":
        """The unthresholded rule of a block: centred on the candidates, towards Sf's mean."""
        unit = nn.functional.normalize
        centre = candidates.mean(0)
        return cls(layer, centre, unit(unit(anchor - centre, dim=1).mean(0), dim=0), float("inf"), 0.0)

    def scores(self, features: Tensor) -> Tensor:
        return nn.functional.normalize(features.float() - self.centre, dim=1) @ self.direction

    def flag(self, features: dict[str, Tensor]) -> Tensor:
        """Bool mask over the images whose :func:`block_features` are given: poison-like."""
        f = features.get(self.layer)
        if f is None or not len(f):
            return torch.zeros(0 if f is None else len(f), dtype=torch.bool)
        return self.scores(f) >= self.threshold


def _threshold(cand: Tensor, null: Tensor, precision: float) -> float | None:
    """The lowest candidate score where the estimated precision still reaches ``precision``."""
    order = torch.sort(cand, descending=True).values
    nulls = torch.sort(null).values
    # null images at or above each candidate score, as a share of the null
    above = (len(nulls) - torch.searchsorted(nulls, order, right=False)).double() / len(nulls)
    n = torch.arange(1, len(order) + 1, dtype=torch.float64)
    ok = (n - len(order) * above) / n >= precision
    best = None
    for i in range(len(order)):
        if ok[i]:
            best = float(order[i])
        elif i + 1 > _EARLY:
            break
    return best


def _fit(cand: Tensor, anchor: Tensor, null: Tensor, precision: float, name: str) -> tuple[BlockRule | None, dict]:
    rule = BlockRule.towards(name, cand, anchor)
    sc, sn = rule.scores(cand), rule.scores(null)
    q = torch.tensor([0.25, 0.5, 0.75])
    record: dict[str, Any] = {"layer": name, "bounded": bool((torch.quantile(sn, q) > torch.quantile(sc, q)).all())}
    t = _threshold(sc, sn, precision) if record["bounded"] else None
    if t is None:
        return None, {**record, "flagged": 0}
    flagged = sc >= t
    rest = sc[~flagged]
    if not len(rest):
        return None, {**record, "flagged": int(flagged.sum())}
    med, spread = robust_normal(rest, floor=1e-6)
    gap = (float(sc[flagged].min()) - med) / spread
    record.update(flagged=int(flagged.sum()), gap=round(gap, 3))
    return dataclasses.replace(rule, threshold=t, gap=gap), record


def scan_blocks(candidates: dict[str, Tensor], anchor: dict[str, Tensor], null: dict[str, Tensor],
                precision: float = 0.95) -> tuple[BlockRule | None, list[dict]]:
    """The rule of the block where the flagged group stands apart most (None when no block
    passes), and what every block scored. Each argument maps block names to
    :func:`block_features` of the candidates, of Sf and of the null images."""
    best, records = None, []
    for name in candidates:
        if name not in anchor or name not in null or not len(anchor[name]) or len(null[name]) < 2:
            continue
        if len(candidates[name]) < 2:
            continue
        rule, record = _fit(candidates[name], anchor[name], null[name], precision, name)
        records.append(record)
        big = record["flagged"] >= max(2, MIN_SHARE * len(candidates[name]))
        if rule is not None and rule.gap >= MIN_GAP and big and (best is None or rule.gap > best.gap):
            best = rule
    return best, records
