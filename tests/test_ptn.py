"""PTN search (SPEC §8): strategies on scripted a_k, and the real step evaluator."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potion.errors import PotionError
from potion.unlearning.dampening import alpha_from_share, dampen, importance_ratios
from potion.unlearning.importances import compute_importances
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.ptn import (
    NothingToHeal,
    PTNConfig,
    PTNNoCrossing,
    StepResult,
    ptn_search,
    share_at_step,
    smallest_crossing,
)
from toy_backdoor import backdoored_mlp



class ScriptedEvaluator:
    """a_k read from a list: lets the strategies be checked against brute force."""

    def __init__(self, a, acc0=1.0, config=None):
        self.a, self.acc0, self.config = list(a), acc0, config
        self.calls: list[int] = []

    def evaluate(self, k):
        self.calls.append(k)
        return StepResult(k=k, s=0.1 * k, alpha=1.0 / (k + 1), lam=1.0, n_selected=k, acc_forget=self.a[k])

    def healed_state(self, k):
        return {"k": torch.tensor(k)}


def brute_force(a, threshold):
    return next((k for k, v in enumerate(a) if v <= threshold), None)


def run(a, strategy, window=4, max_steps=None, acc0=1.0):
    cfg = PTNConfig(strategy=strategy, window=window, max_steps=len(a) - 1 if max_steps is None else max_steps)
    ev = ScriptedEvaluator(a, acc0)
    return ptn_search(ev, cfg), ev


def test_share_at_step_hand_computed():
    assert share_at_step(0, 10, 1000, 25, 1.1) == pytest.approx(0.01 / 25)
    assert share_at_step(2, 10, 1000, 25, 1.1) == pytest.approx(0.01 / 25 * 1.21)
    with pytest.raises(PotionError, match="Sf"):
        share_at_step(0, 0, 1000, 25, 1.1)


@pytest.mark.parametrize("seed", range(25))
def test_strategies_agree_on_monotone_traces(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    a = np.sort(rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0], n))[::-1]
    a[-1] = min(a[-1], 0.1)  # guarantee a crossing somewhere
    want = brute_force(a, 0.2)
    for strategy in ("linear", "waves", "bisect", "bracket"):
        for window in (1, 3, 8):
            res, ev = run(a, strategy, window)
            assert res.k_star == want, (strategy, window)
            assert [r.k for r in res.trace] == sorted(set(ev.calls)) == sorted(ev.calls)  # each k once
            assert res.evaluations == len(ev.calls)
            assert res.state_dict["k"].item() == want
            assert res.n_selected == want and res.alpha == pytest.approx(1 / (want + 1))
            assert res.strategy == strategy


@pytest.mark.parametrize("seed", range(25))
def test_waves_equal_linear_on_any_trace(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 60))
    a = rng.choice([0.1, 0.25, 0.5, 0.9], n)  # non-monotone
    a[-1] = 0.1
    want = brute_force(a, 0.2)
    lin, ev_lin = run(a, "linear")
    assert lin.k_star == want and ev_lin.calls == list(range(want + 1))
    for window in (1, 2, 5, 16):
        res, ev = run(a, "waves", window)
        assert res.k_star == want
        # Whole waves only: the last one evaluated is the one holding k*.
        assert ev.calls == list(range(min(n, (want // window + 1) * window)))


def test_bisect_is_cheaper_on_long_monotone_trace():
    a = [1.0] * 300 + [0.0] * 201
    res, ev = run(a, "bisect")
    assert res.k_star == 300
    assert res.evaluations < 25
    assert ev.calls[:4] == [0, 1, 3, 7]


def test_bracket_takes_the_first_crossing_after_a_plateau_that_bisect_jumps():
    # The shape measured on MNIST with a sampled I_r: a_k falls, hovers just above ρ·acc0
    # from k = 70 to 126 with one dip at 80, and only drops for good at 127.
    a = [1.0] * 64 + [0.5] * 6 + [0.27] * 10 + [0.15] + [0.3] * 46 + [0.1] * 10
    assert brute_force(a, 0.2) == 80
    bis, _ = run(a, "bisect")
    br, ev = run(a, "bracket")
    assert bis.k_star == 127  # bisection lands past the plateau: twice the selection
    assert br.k_star == 80 and ev.calls[:8] == [0, 1, 3, 7, 15, 31, 63, 127] and ev.calls[8:] == list(range(64, 81))
    assert br.evaluations < 81 / 2


def test_crossing_at_zero_and_at_max_steps():
    for strategy in ("linear", "waves", "bisect", "bracket"):
        assert run([0.1, 0.1], strategy)[0].k_star == 0
        assert run([1.0] * 10 + [0.2], strategy)[0].k_star == 10  # a_k = ρ·acc0 counts as crossed



def test_the_threshold_is_rho_times_acc0():
    """θ0 gets half the deletion set right: the search stops at a_k <= 0.2·0.5 = 0.1, not at 0.2."""
    for strategy in ("linear", "waves", "bisect", "bracket"):
        res, _ = run([0.5, 0.3, 0.15, 0.1, 0.05], strategy, acc0=0.5)
        assert (res.k_star, res.threshold) == (3, pytest.approx(0.1))

def test_no_crossing_reports_trace_and_last_value():
    a = [1.0, 0.9, 0.8, 0.7, 0.6, 0.55]
    for strategy in ("linear", "waves", "bisect", "bracket"):
        with pytest.raises(PTNNoCrossing, match=r"last a_k=0\.5500 at k=5") as e:
            run(a, strategy, window=4)
        assert isinstance(e.value, PotionError)
        assert e.value.trace[-1].k == 5 and [r.k for r in e.value.trace] == sorted(r.k for r in e.value.trace)
    # max_steps bounds the search even when the script goes on.
    with pytest.raises(PTNNoCrossing, match="k <= 3"):
        run(a + [0.0], "linear", max_steps=3)


def test_acc0_zero_is_an_error():
    with pytest.raises(NothingToHeal, match="already misclassifies the whole deletion set") as e:
        run([0.0, 0.0], "linear", acc0=0.0)
    assert isinstance(e.value, PotionError)


def test_smallest_crossing():
    rs = [StepResult(k, 0, 0, 1, 0, a) for k, a in [(5, 0.1), (2, 0.3), (3, 0.2), (9, 0.0)]]
    assert smallest_crossing(rs, 0.2).k == 3
    assert smallest_crossing(rs, 0.05).k == 9
    assert smallest_crossing(rs, -0.01) is None
    assert smallest_crossing([], 1.0) is None


def test_config_validation():
    for bad in ({"rho": 0}, {"rho": 1.5}, {"step": 1.0}, {"buffer": 0}, {"max_steps": -1},
                {"strategy": "random"}, {"window": 0}):
        with pytest.raises(PotionError):
            PTNConfig(**bad)


# -- the real evaluator ----------------------------------------------------------------
def toy_problem():
    model, x, y, poison, _ = backdoored_mlp(seed=0)
    n = len(x)
    forget = poison[:8]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    return model.eval(), (x[forget], y[forget]), (x[keep], y[keep])


@pytest.fixture(scope="module")
def toy():
    model, (xf, yf), (xr, yr) = toy_problem()
    fb = [(xf[:5], yf[:5]), (xf[5:], yf[5:])]
    rb = [(xr[i : i + 64], yr[i : i + 64]) for i in range(0, len(xr), 64)]
    imp_f = compute_importances(model, fb, "xlf")
    imp_r = compute_importances(model, rb, "xlf")
    return model, fb, rb, imp_f, imp_r


def accuracy(model, state, batches):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def test_step_evaluator_matches_its_definition(toy):
    model, fb, rb, imp_f, imp_r = toy
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PTNConfig(buffer=5.0, step=1.5)
    model.train()
    ev = StepEvaluator(model, model.state_dict(), imp_f, imp_r, fb, 8, 400, cfg, val_batches=lambda: iter(rb))
    ratios = importance_ratios(imp_f, imp_r)
    for k in (0, 3, 7):
        model.train()
        s = (8 / 400) / 5.0 * 1.5**k
        assert ev.share(k) == pytest.approx(s)
        assert ev.alpha(k) == alpha_from_share(ratios, ev.share(k))
        want, n_sel = dampen(theta0, imp_f, imp_r, ev.alpha(k), 1.0)
        got = ev.healed_state(k)
        assert all(torch.equal(got[n], want[n]) for n in want)
        r = ev.evaluate(k)
        assert all(m.training for m in model.modules())  # evaluation restores the modes
        assert (r.k, r.s, r.alpha, r.lam, r.n_selected) == (k, ev.share(k), ev.alpha(k), 1.0, n_sel)
        assert r.acc_forget == accuracy(model, want, fb)
        assert r.acc_val == accuracy(model, want, rb)
        assert set(r.to_dict()) == {"k", "s", "alpha", "lam", "n_selected", "acc_forget", "acc_val", "acc_proxy",
                                    "acc_proxy_target", "acc_proxy_other"}
        assert r.acc_proxy is None  # no proxy given: the paper's search measures none
        # θ0 is private: the model's own state_dict() (which it aliased) was overwritten by θ_k.
        assert all(torch.equal(ev.state0[n], theta0[n]) for n in theta0)
    # A one-shot generator of validation batches must serve every step, not just the first.
    ev_gen = StepEvaluator(model, theta0, imp_f, imp_r, fb, 8, 400, cfg, val_batches=(b for b in rb))
    assert [ev_gen.evaluate(k).acc_val for k in (0, 7)] == [ev.evaluate(k).acc_val for k in (0, 7)]
    assert ev.acc0 == accuracy(model, theta0, fb) == 1.0
    assert ev.threshold == pytest.approx(0.2)
    model.load_state_dict(theta0)
    model.eval()


def test_ptn_search_on_real_model_heals_forget_set(toy):
    model, fb, rb, imp_f, imp_r = toy
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for strategy in ("linear", "waves", "bisect"):
        ev = StepEvaluator(model, theta0, imp_f, imp_r, fb, 8, 400, PTNConfig(strategy=strategy, max_steps=300))
        res = ptn_search(ev)
        results[strategy] = res
        assert res.acc0 == 1.0 and res.threshold == pytest.approx(0.2)
        assert accuracy(model, res.state_dict, fb) <= res.threshold
        if res.k_star > 0:
            prev = {r.k: r for r in res.trace}.get(res.k_star - 1)
            assert prev is None or prev.acc_forget > res.threshold
        assert all(math.isfinite(r.alpha) for r in res.trace)
        assert set(res.to_dict()) >= {"k_star", "s", "alpha", "n_selected", "trace", "evaluations", "strategy"}
    assert results["waves"].k_star == results["linear"].k_star
    lin = results["linear"]
    assert [r.k for r in lin.trace] == list(range(lin.k_star + 1))
    model.load_state_dict(theta0)


def test_step_evaluator_rejects_empty_forget_set(toy):
    model, fb, rb, imp_f, imp_r = toy
    with pytest.raises(PotionError, match="deletion set is empty"):
        StepEvaluator(model, model.state_dict(), imp_f, imp_r, [], 8, 400)
