"""Stages of ``potion.heal.run`` checked on their own, each against an answer computed another way:
the importance cache keyed by the batch size the heal uses, and ssd_grid's score (SPEC §9)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from potion.datasets.base import ArraySource
from potion.datasets.stored import stored_view
from potion.heal.inputs import RunSource
from potion.heal.run import _grid_scorer, heal_context, select_sets
from potion.runs.configs import HealJob
from potion.unlearning.methods import _importances


def test_a_heal_with_another_batch_size_does_not_reuse_the_cached_retain_importances(small_digits_run, tmp_path):
    """XLF sums G(b) over batches of B images, so I_r depends on B: the cache key must carry
    the B the heal passes in, or a second heal from the same cache reads the first's I_r."""
    inputs = RunSource(small_digits_run).load()
    state0 = {k: v.detach().clone() for k, v in inputs.model.state_dict().items()}

    def retain_importances(batch_size: int, cache_dir: str) -> dict[str, torch.Tensor]:
        job = HealJob(method="xlf_ptn", importance_batch_size=batch_size, cache_dir=cache_dir)
        sets = select_sets(inputs, job, None, 5, None, "cpu")
        assert len(sets.deletion) == 5 and sorted([*sets.deletion, *sets.retain]) == list(range(inputs.n_train))
        ctx = heal_context(inputs, sets.job, sets, state0, "cpu", False, {})
        imp, _ = _importances(ctx, "xlf", "retain")
        return {k: v.clone() for k, v in imp.items()}

    cache = str(tmp_path / "cache")
    first = retain_importances(64, cache)
    second = retain_importances(128, cache)  # same model, data and deletion set: only B differs
    fresh = retain_importances(128, "none")
    assert any(not torch.equal(first[k], fresh[k]) for k in fresh), "B must change I_r for this test to mean anything"
    assert all(torch.equal(second[k], fresh[k]) for k in fresh)
    assert all(torch.equal(retain_importances(64, cache)[k], first[k]) for k in first)  # and B=64 still hits


class ConstantLogits(nn.Module):
    """Predicts the class ``winner`` for every image (its bias is the only parameter)."""

    def __init__(self, winner: int = 0, num_classes: int = 4):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[winner] = 1.0

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


def _view(n: int, label: int):
    images = torch.zeros((n, 1, 4, 4), dtype=torch.uint8)
    return stored_view(ArraySource(images, np.full(n, label, np.int64), [str(c) for c in range(4)]), (0.0,), (1.0,))


def test_ssd_grid_score_weights_the_change_in_ra_and_in_clean_accuracy_equally():
    """Clean test images are all class 1, triggered ones all class 2 (their true class); θ0
    predicts 1 everywhere: clean accuracy 1, ra 0. A model predicting 2 gains one full point of
    ra and loses one of clean accuracy, so an equally weighted mean of the changes is 0."""
    inputs = SimpleNamespace(clean_test=_view(50, 1), triggered_test=_view(40, 2), model=ConstantLogits(1).eval(),
                             spec=SimpleNamespace(build=ConstantLogits))
    score = _grid_scorer(inputs, seed=0, bs=16, device="cpu")
    assert score(ConstantLogits(1).state_dict()) == 0.0  # θ0 itself: no change
    assert score(ConstantLogits(2).state_dict()) == pytest.approx(0.0)  # +1 ra, −1 clean
    assert score(ConstantLogits(0).state_dict()) == pytest.approx(-0.5)  # −1 clean, ra unchanged
    inputs.triggered_test = _view(40, 1)  # now θ0 also has ra 1 ...
    inputs.clean_test = _view(50, 3)  # ... and clean accuracy 0
    assert _grid_scorer(inputs, seed=0, bs=16, device="cpu")(ConstantLogits(3).state_dict()) == pytest.approx(0.0)
