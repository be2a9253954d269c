"""Selective dampening and α(s) against hand-computed values (SPEC §6–7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potion.errors import PotionError
from potion.unlearning.dampening import (
    RatioQuantiles,
    alpha_from_share,
    dampen,
    importance_ratios,
    percentile_for_share,
)



def example():
    # Elements: I_f=0<I_r | 0/0 | I_r=0<I_f | I_f = α·I_r (boundary) | clearly selected | not selected
    params = {
        "w": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        "bn.running_mean": torch.tensor([0.5, -0.5]),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    imp_f = {"w": torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 3.0])}
    imp_r = {"w": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 3.0])}
    return params, imp_f, imp_r


def test_dampen_hand_computed_with_edge_cases():
    params, imp_f, imp_r = example()
    out, n = dampen(params, imp_f, imp_r, alpha=2.0, lam=1.0)
    # el 2: I_r=0 → selected, β=0; el 4: 4 > 2·1 → β = min(1·1/4, 1) = 0.25
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0, 0.0, 4.0, 1.25, 6.0]))
    assert n == 2
    out, n = dampen(params, imp_f, imp_r, alpha=2.0, lam=8.0)  # β = min(8/4, 1) = 1: selected, unchanged
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0, 0.0, 4.0, 5.0, 6.0]))
    assert n == 2
    out, n = dampen(params, imp_f, imp_r, alpha=0.5, lam=0.5)
    # selected: el 2 (β 0), el 3 (2 > 0.5: β = 0.5·1/2 = 0.25), el 4 (β = 0.125), el 5 (β = 0.5)
    assert torch.allclose(out["w"], torch.tensor([1.0, 2.0, 0.0, 1.0, 0.625, 3.0]))
    assert n == 4
    out, n = dampen(params, imp_f, imp_r, alpha=0.0)  # every I_f > 0 selected; 0/0 and I_f = 0 never
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0, 0.0, 2.0, 1.25, 6.0]))
    assert n == 4


def test_dampen_copies_buffers_and_never_mutates():
    params, imp_f, imp_r = example()
    before = [{k: v.clone() for k, v in d.items()} for d in (params, imp_f, imp_r)]
    out, _ = dampen(params, imp_f, imp_r, alpha=2.0)
    for d, b in zip((params, imp_f, imp_r), before):
        assert all(torch.equal(d[k], b[k]) for k in b)
    assert torch.equal(out["bn.running_mean"], params["bn.running_mean"])
    assert out["bn.num_batches_tracked"].item() == 7 and out["bn.num_batches_tracked"].dtype == torch.int64
    assert all(out[k] is not params[k] for k in params)
    out["bn.running_mean"] += 1  # a fresh tensor: θ0 stays intact
    assert torch.equal(params["bn.running_mean"], before[0]["bn.running_mean"])


def test_dampen_keeps_dtype():
    params, imp_f, imp_r = example()
    half = {"w": params["w"].half()}
    out, _ = dampen(half, imp_f, imp_r, alpha=2.0)
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0, 0.0, 4.0, 1.25, 6.0], dtype=torch.float16))


def test_dampen_errors():
    params, imp_f, imp_r = example()
    for alpha in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PotionError, match="alpha"):
            dampen(params, imp_f, imp_r, alpha)
    with pytest.raises(PotionError, match="lambda"):
        dampen(params, imp_f, imp_r, 1.0, lam=0.0)
    with pytest.raises(PotionError, match="different parameters"):
        dampen(params, imp_f, {"v": imp_r["w"]}, 1.0)
    with pytest.raises(PotionError, match="shape"):
        dampen({"w": torch.zeros(5)}, imp_f, imp_r, 1.0)
    with pytest.raises(PotionError, match="lacks"):
        dampen({"x": torch.zeros(6)}, imp_f, imp_r, 1.0)


def test_importance_ratios_drop_nan_and_inf():
    _, imp_f, imp_r = example()
    imp_f["b"], imp_r["b"] = torch.tensor([[6.0, 1.0]]), torch.tensor([[2.0, 4.0]])
    r = importance_ratios(imp_f, imp_r)
    assert r.dtype == np.float64
    # w: 0/1, 0/0 (NaN), 1/0 (inf), 2/1, 4/1, 3/3; b: 3, 0.25
    assert sorted(r.tolist()) == [0.0, 0.25, 1.0, 2.0, 3.0, 4.0]


def test_percentile_for_share():
    assert percentile_for_share(0.0) == 100.0
    assert percentile_for_share(0.01) == pytest.approx(100 - math.log(2))
    assert percentile_for_share(0.5) == pytest.approx(100 - math.log(51))
    assert percentile_for_share(1e60) == 0.0  # clipped
    for bad in (-0.5, float("nan")):
        with pytest.raises(PotionError, match="share"):
            percentile_for_share(bad)


def test_alpha_from_share_hand_computed():
    ratios = np.array([4.0, 0.0, 2.0, 1.0])
    assert alpha_from_share(ratios, 0.0) == 4.0  # q = 100 → the largest ratio
    s = 0.01  # q = 100 − ln 2 ≈ 99.3069; index 3·q/100 = 2.97921 → 2 + 0.97921·(4 − 2)
    q = 100 - math.log(2)
    assert alpha_from_share(ratios, s) == pytest.approx(2 + (3 * q / 100 - 2) * 2, rel=1e-12)
    s_half = math.expm1(50) / 100  # q = 50 → midway between 1 and 2
    assert alpha_from_share(ratios, s_half) == pytest.approx(1.5, rel=1e-9)
    with pytest.raises(PotionError, match="no finite importance ratios"):
        alpha_from_share(np.array([]), 0.1)


@pytest.mark.parametrize("seed", range(6))
def test_ratio_quantiles_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    ratios = rng.lognormal(0, 3, n)
    if seed % 2:
        ratios[: n // 2] = rng.choice(ratios, n // 2)  # ties
        ratios[rng.random(n) < 0.1] = 0.0
    rq = RatioQuantiles(ratios)
    qs = np.concatenate([[0.0, 100.0, 50.0, 99.99999], rng.uniform(0, 100, 200), 100 - np.log1p(100 * rng.uniform(0, 1, 100))])
    for q in qs:
        assert rq.percentile(q) == np.percentile(ratios, q), q
    for s in (0.0, 1e-4, 0.003, 0.2, 5.0):
        assert rq.alpha(s) == alpha_from_share(ratios, s)


def test_ratio_quantiles_errors():
    with pytest.raises(PotionError, match="no finite importance ratios"):
        RatioQuantiles(np.array([]))
    with pytest.raises(PotionError, match="finite"):
        RatioQuantiles(np.array([1.0, np.inf]))
    with pytest.raises(PotionError, match="percentile"):
        RatioQuantiles(np.array([1.0])).percentile(101)
