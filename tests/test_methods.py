"""Methods end to end on a tiny backdoored model (SPEC §9)."""
from __future__ import annotations

import pytest
import torch

from potion.errors import PotionError
from potion.unlearning.dampening import dampen
from potion.unlearning.importances import compute_importances
from potion.unlearning.methods import (
    METHODS,
    SSD_GRID_ALPHAS,
    SSD_GRID_LAMBDA_FACTORS,
    TIMING_KEYS,
    HealContext,
    heal,
)
from potion.unlearning.ptn import PTNConfig, ptn_search
from toy_backdoor import backdoored_mlp



@pytest.fixture(scope="module")
def toy():
    model, x, y, poison, _ = backdoored_mlp(seed=1)
    n = len(x)
    forget = poison[:8]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    xr, yr = x[keep], y[keep]
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    return model, theta0, [(x[forget], y[forget])], [(xr[i : i + 64], yr[i : i + 64]) for i in range(0, len(xr), 64)]


def context(toy, **kw) -> HealContext:
    model, theta0, fb, rb = toy
    model.load_state_dict(theta0)
    args = dict(model=model, state0=theta0, retain_batches=lambda: iter(rb), forget_batches=fb, n_forget=8,
                n_total=400, ptn=PTNConfig(max_steps=300))
    args.update(kw)
    return HealContext(**args)


def acc(model, state, batches):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def unchanged(theta0, snapshot):
    return all(torch.equal(theta0[n], snapshot[n]) for n in snapshot)


def test_registry():
    assert METHODS.names() == sorted(["none", "ssd", "ssd_grid", "ssd_ptn", "lf_ptn", "xlf_ptn", "xlf_ptn_guard", "eu",
                                     "task_vector", "finetune", "potion_plus"])
    with pytest.raises(PotionError, match="unknown unlearning method"):
        heal("retrain_everything", None)


def test_none_returns_theta0(toy):
    snap = {k: v.clone() for k, v in toy[1].items()}
    res = heal("none", context(toy))
    assert res.method == "none" and res.info["method"] == "none"
    assert all(torch.equal(res.state_dict[n], snap[n]) for n in snap)
    assert set(res.timings) >= set(TIMING_KEYS) and res.timings["importance_retain_s"] == 0.0


def test_ssd_is_fisher_dampening_at_fixed_alpha(toy):
    model, theta0, fb, rb = toy
    snap = {k: v.clone() for k, v in theta0.items()}
    res = heal("ssd", context(toy, ssd_alpha=0.1, ssd_lambda=0.5))
    healed_in_model = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(theta0)
    imp_f = compute_importances(model, fb, "fisher")
    imp_r = compute_importances(model, rb, "fisher")
    want, n_sel = dampen(theta0, imp_f, imp_r, 0.1, 0.5)
    assert all(torch.equal(res.state_dict[n], want[n]) for n in want)
    assert res.info["n_selected"] == n_sel > 0 and res.info["alpha"] == 0.1 and res.info["lam"] == 0.5
    assert res.timings["importance_forget_s"] > 0 and res.timings["importance_retain_s"] > 0
    assert res.timings["total_s"] >= res.timings["importance_retain_s"]
    assert unchanged(theta0, snap)
    # heal leaves θ' in the model
    assert all(torch.equal(healed_in_model[n], want[n]) for n in want)


def test_xlf_ptn_end_to_end(toy):
    model, theta0, fb, rb = toy
    snap = {k: v.clone() for k, v in theta0.items()}
    res = heal("xlf_ptn", context(toy, val_batches=rb))
    info = res.info
    assert info["method"] == "xlf_ptn" and info["estimator"] == "xlf"
    assert info["acc0"] == acc(model, theta0, fb) == 1.0
    assert acc(model, res.state_dict, fb) <= info["threshold"] == pytest.approx(0.2)
    assert info["k_star"] == info["trace"][-1]["k"] and len(info["trace"]) == info["k_star"] + 1
    assert all(t["acc_val"] is not None for t in info["trace"])
    assert info["lam"] == 1.0 and info["strategy"] == "linear" and info["ptn"]["max_steps"] == 300
    assert all(res.timings[k] > 0 for k in TIMING_KEYS)
    assert unchanged(theta0, snap)


def test_ptn_plugins_importances_and_search(toy):
    model, theta0, fb, rb = toy
    calls, searched = [], []

    def importances(estimator, p, batches_fn, which):
        calls.append((estimator, p, which))
        return compute_importances(model, batches_fn(), estimator, p=p)

    def search(evaluator, cfg):
        searched.append(cfg.strategy)
        return ptn_search(evaluator, cfg)

    res = heal("lf_ptn", context(toy, importances=importances, search=search, ptn=PTNConfig(strategy="bisect")))
    assert calls == [("lf", None, "forget"), ("lf", None, "retain")]
    assert searched == ["bisect"]
    plain = heal("lf_ptn", context(toy, ptn=PTNConfig(strategy="linear")))
    assert res.info["k_star"] == plain.info["k_star"]
    assert all(torch.equal(res.state_dict[n], plain.state_dict[n]) for n in plain.state_dict)


def test_ssd_grid_picks_best_score_and_says_it_reads_ground_truth(toy):
    with pytest.raises(PotionError, match="grid_score"):
        heal("ssd_grid", context(toy))
    scores = iter(range(1000))
    target = 17  # the 18th grid point gets the highest score
    seen = []

    def grid_score(state):
        i = next(scores)
        seen.append(state)
        return 100.0 if i == target else float(i % 7)

    res = heal("ssd_grid", context(toy, grid_score=grid_score))
    info = res.info
    assert len(info["grid"]) == len(SSD_GRID_ALPHAS) * len(SSD_GRID_LAMBDA_FACTORS) == len(seen)
    best = info["grid"][target]
    assert best["score"] == 100.0 and (info["alpha"], info["lam"]) == (best["alpha"], best["lam"])
    assert best["alpha"] == SSD_GRID_ALPHAS[target // 5] and best["lam"] == SSD_GRID_LAMBDA_FACTORS[target % 5] * best["alpha"]
    assert all(torch.equal(res.state_dict[n], seen[target][n]) for n in seen[target])
    assert info["uses_ground_truth"] is True and "benchmark only" in info["note"]
    assert "ground truth" in METHODS.get("ssd_grid").__doc__


def test_eu_uses_the_retrain_callback(toy):
    with pytest.raises(PotionError, match="retrain"):
        heal("eu", context(toy))
    fresh = {k: torch.zeros_like(v) for k, v in toy[1].items()}
    res = heal("eu", context(toy, retrain=lambda: fresh))
    assert all(torch.equal(res.state_dict[n], fresh[n]) for n in fresh)
    assert "retrain_s" in res.timings and set(res.timings) >= set(TIMING_KEYS)
