"""Growing the deletion set Sf before healing: which target-labelled retain images look like
the poison the owner found (beyond the paper).

Backdoored models map triggered images of every class to one region of their penultimate
feature space; the found poison Sf marks that region without ground truth. The rule works
on unit-length features of θ0:

1. Two centres: the poison's (Sf, plus what the rule has flagged so far) and the clean
   target class's (the candidates not flagged). A candidate is *nearer the poison* when its
   cosine to the poison centre beats its cosine to the clean centre; the two centres are
   re-estimated until the flagged set stops changing (a 2-means anchored on Sf).
2. Precision: on the axis between the two centres, each side is fitted with a normal by
   its median and MAD (the clean candidates; Sf and the flagged ones), weighted by the
   share flagged. A candidate is kept only when its posterior odds of being poison reach
   ``precision`` and it lies no more than ``POISON_Z`` robust standard deviations below the
   poison's median. Both cuts come from the data. The second is there because the clean
   class's upper tail is far heavier than a normal: on the toy MLP the "nearer" rule alone
   kept clean images at 73 % precision, the posterior alone at 75 % on one seed.

Safe when there is nothing to find: unless the two groups lie ``MIN_SEPARATION`` combined
robust σ apart, nothing is flagged (and :func:`potion.unlearning.plus.grow_mask` anchors the
rule only on found samples that θ0 sends to their poisoned label). Measured against the poison manifests:
benchmarks/results/heal_more.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor
# robust standard deviations of the poison's projections below their median that a grown-in image may lie
POISON_Z = 3.0
# the two groups must lie this many combined robust σ apart on their axis, else nothing is
# flagged: measured on the toy MLP, backdoored models 5.3–11.5, clean ones 1.7–2.3
MIN_SEPARATION = 4.0


@dataclass(frozen=True)
class ExpansionRule:
    """A fitted rule: the two centres and the normals fitted on the axis between them."""

    poison_centre: Tensor
    clean_centre: Tensor
    clean_fit: tuple[float, float]  # (median, σ) of the clean candidates' projections
    poison_fit: tuple[float, float]  # the same of Sf and the flagged candidates
    prior: float  # share of the candidates flagged by the 2-means
    precision: float

    def flag(self, features: Tensor) -> Tensor:
        """Bool mask over ``features`` (rows: penultimate features of θ0): poison-like."""
        if features.numel() == 0 or self.prior <= 0:
            return torch.zeros(len(features), dtype=torch.bool)
        f = nn.functional.normalize(features.float(), dim=1)
        nearer = f @ self.poison_centre > f @ self.clean_centre
        x = (f @ (self.poison_centre - self.clean_centre)).double()
        (mc, sc), (mp, sp) = self.clean_fit, self.poison_fit
        # log posterior odds of poison against clean under the two normals
        log_odds = (math.log(self.prior / (1 - self.prior)) + math.log(sc / sp)
                    - 0.5 * ((x - mp) / sp) ** 2 + 0.5 * ((x - mc) / sc) ** 2)
        # the clean class's upper tail is heavier than a normal: also no further below the
        # poison's median than its own spread allows
        inside = x >= mp - POISON_Z * sp
        return nearer & inside & (log_odds >= math.log(self.precision / (1 - self.precision)))


def fit_expansion(forget_features: Tensor, candidate_features: Tensor, precision: float = 0.9,
                  max_iter: int = 20) -> ExpansionRule:
    """The rule for these candidates (target-labelled retain images) given Sf's features."""
    unit = nn.functional.normalize
    fs = unit(forget_features.float(), dim=1)
    fc = unit(candidate_features.float(), dim=1)
    flagged = torch.zeros(len(fc), dtype=torch.bool)
    for _ in range(max_iter):
        poison = unit(torch.cat([fs, fc[flagged]]).mean(0), dim=0)
        clean = unit(fc[~flagged].mean(0), dim=0) if (~flagged).any() else -poison
        now = fc @ poison > fc @ clean
        if torch.equal(now, flagged):
            break
        flagged = now
    axis = poison - clean
    prior = min(float(flagged.float().mean()), 0.5) if len(fc) else 0.0
    clean_fit = robust_normal(fc[~flagged] @ axis if (~flagged).any() else torch.zeros(1))
    poison_fit = robust_normal(torch.cat([fs, fc[flagged]]) @ axis)
    # a handful of poison samples (one-shot) say little about the poison's spread: the clean one's, then
    floor = clean_fit[1] if len(fs) + int(flagged.sum()) < 5 else 1e-3
    poison_fit = (poison_fit[0], max(poison_fit[1], floor))
    if (poison_fit[0] - clean_fit[0]) / math.hypot(clean_fit[1], poison_fit[1]) < MIN_SEPARATION:
        prior = 0.0  # no poison cluster apart from the clean class: nothing to grow Sf with
    return ExpansionRule(poison, clean, clean_fit, poison_fit, prior, precision)


def robust_normal(values: Tensor, floor: float = 1e-3) -> tuple[float, float]:
    """(median, σ from the MAD) of ``values``; σ at least ``floor``."""
    med = values.median()
    return float(med), max(float((values - med).abs().median()) * 1.4826, floor)


def expand_mask(forget_features: Tensor, candidate_features: Tensor, precision: float = 0.9) -> Tensor:
    """Bool mask over the candidates: the ones to add to Sf."""
    if candidate_features.numel() == 0 or forget_features.numel() == 0:
        return torch.zeros(len(candidate_features), dtype=torch.bool)
    return fit_expansion(forget_features, candidate_features, precision).flag(candidate_features)
