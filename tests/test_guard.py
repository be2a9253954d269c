"""The damage guard (xlf_ptn_guard): the pure selection on hand-built curves, the poison
correction, the same choice from the Ray searcher's window, and a real tiny model."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from potion.errors import PotionError
from potion.heal.sets import draw_proxy
from potion.unlearning.batch_size import auto_batch_size, resolve_batch_size
from potion.unlearning.guard import (
    GuardConfig,
    estimate_poison_share,
    guard_choose,
    guard_search,
    proxy_damage,
)
from potion.unlearning.importances import compute_importances
from potion.unlearning.proxy_split import penultimate_features, poison_like
from toy_backdoor import backdoored_mlp
from potion.unlearning.methods import HealContext, heal
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.proxy import ProxyBase
from potion.unlearning.ptn import PTNConfig, StepResult, ptn_search

# A proxy of 1000 samples, 100 of them target-labelled, all right at θ0.
BASE = ProxyBase(acc=1.0, acc_target=1.0, acc_other=1.0, n=1000, n_target=100)


def curve(a, other, target=None):
    """Steps from a_k and the proxy's accuracy on its non-target / target parts."""
    target = target or [1.0] * len(a)
    return [StepResult(k=k, s=0.01 * k, alpha=1.0, lam=1.0, n_selected=k, acc_forget=a[k],
                       acc_proxy=0.9 * other[k] + 0.1 * target[k], acc_proxy_target=target[k],
                       acc_proxy_other=other[k]) for k in range(len(a))]


def choose(steps, **cfg):
    """The guard on a hand-built curve: the paper's scan on Sf up to its k* (no proxy), then
    each step's proxy on request. Returns the decision and the probed ks."""
    k_paper = next((r.k for r in steps if r.acc_forget <= 0.2), None)
    scan = [dataclasses.replace(r, acc_proxy=None, acc_proxy_target=None, acc_proxy_other=None)
            for r in (steps if k_paper is None else steps[:k_paper + 1])]
    probes = []

    def measure(k):
        probes.append(k)
        return steps[k]

    d, measured = guard_choose(scan, k_paper, measure, threshold=0.2, acc0=1.0, base=BASE,
                               cfg=GuardConfig(**cfg), max_steps=len(steps) - 1)
    assert list(measured) == probes == d.probes and len(set(probes)) == len(probes)  # each step once
    return d


def test_crossing_inside_delta_returns_the_papers_k_star_with_one_proxy_measurement():
    a = [1.0, 1.0, 0.8, 0.5, 0.15, 0.1, 0.0]
    other = [1.0, 1.0, 0.999, 0.998, 0.995, 0.95, 0.9]
    d = choose(curve(a, other), max_damage=1.0)
    assert d.status == "k_star" and d.choice.k == d.k_paper == 4 and d.probes == [4]
    assert d.damage[4] == pytest.approx(-100 * 0.9 * 0.005)


def test_stepping_ahead_only_within_delta_and_to_lower_a_k():
    a = [1.0, 0.5, 0.15, 0.18, 0.05, 0.0, 0.0]
    other = [1.0, 1.0, 0.999, 0.999, 0.996, 0.95, 0.9]
    d = choose(curve(a, other), max_damage=1.0, ahead=3)
    # k = 5 heals fully but breaks δ (−4.5 points); k = 4 is the lowest a_k within δ
    assert d.status == "ahead" and d.choice.k == 4 and d.k_paper == 2 and d.probes == [2, 3, 4, 5]
    assert choose(curve(a, other), max_damage=1.0, ahead=0).choice.k == 2


def test_k_star_breaking_delta_falls_back_to_the_best_step_within_it():
    a = [1.0, 0.9, 0.6, 0.4, 0.1, 0.0]
    other = [1.0, 1.0, 0.998, 0.995, 0.9, 0.8]  # damage −0.18, −0.45 at k = 2, 3; −9 at k* = 4
    d = choose(curve(a, other), max_damage=1.0)
    assert d.k_paper == 4 and d.status == "partial" and d.choice.k == 3
    assert "breaks δ=1" in d.reason and "partial" in d.reason
    assert choose(curve(a, other), max_damage=0.3).choice.k == 2


def test_a_curve_that_never_crosses():
    a = [1.0] * 3 + [0.9] * 30
    other = [1.0] * 3 + [0.95] * 30  # every step that lowers a_k breaks δ
    d = choose(curve(a, other), max_damage=1.0)
    assert d.k_paper is None and d.choice is None and d.status == "none"
    assert "no step k <= 32 reaches" in d.reason and len(d.probes) <= 6 + 4
    # nothing over δ: the best partial heal of the whole scan
    d2 = choose(curve([1.0, 0.9, 0.7, 0.8], [1.0] * 4))
    assert d2.status == "partial" and d2.choice.k == 2



def test_allow_damage_after_a_partial_decision_returns_the_papers_k_star():
    """The decision is "partial" (k* = 4 breaks δ, k = 3 heals partly within it): the guard
    returns k = 3, and with --allow-damage the paper's k* = 4, its weights and record."""
    from potion.unlearning.guard import guard_result

    steps = curve([1.0, 0.9, 0.6, 0.4, 0.1, 0.0], [1.0, 1.0, 0.998, 0.995, 0.9, 0.8])
    d = choose(steps, max_damage=1.0)
    assert (d.status, d.choice.k, d.k_paper) == ("partial", 3, 4)
    evaluator = SimpleNamespace(acc0=1.0, proxy_base=BASE, healed_state=lambda k: {"w": torch.tensor(float(k))})

    def result(allow):
        return guard_result(evaluator, PTNConfig(), GuardConfig(max_damage=1.0), steps, d, "guard-linear", allow)

    guarded, allowed = result(False), result(True)
    assert guarded.k_star == 3 and guarded.guard["status"] == "partial" and guarded.state_dict["w"] == 3
    assert allowed.k_star == 4 and allowed.alpha == steps[4].alpha and allowed.state_dict["w"] == 4
    assert allowed.guard["status"] == "damage_allowed" and "k*=4" in allowed.guard["reason"]

def brute_force(steps, k_paper, max_damage):
    """The lowest a_k (ties: larger k) below k* within δ, from every step's damage."""
    ok = [r for r in steps[:k_paper] if proxy_damage(r, BASE, 1.0, 0.0) >= -max_damage and r.acc_forget < 1.0]
    return min(ok, key=lambda r: (r.acc_forget, -r.k)) if ok else None


@pytest.mark.parametrize("seed", range(20))
def test_bisection_finds_the_exhaustive_choice_with_log_k_probes_and_never_passes_delta(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    a = np.clip(1.0 - np.cumsum(rng.uniform(0, 3.0 / n, n)) + rng.normal(0, 0.02, n), 0, 1)
    a[-1] = 0.0
    other = 1.0 - np.cumsum(rng.uniform(0, 0.05 / n, n))  # damage grows with k
    steps = curve(list(a), list(other))
    delta = float(rng.choice([0.3, 1.0, 2.0]))
    d = choose(steps, max_damage=delta)
    truth = brute_force(steps, d.k_paper, delta)
    if d.status == "k_star":
        assert d.probes == [d.k_paper]
    else:
        assert (d.choice and d.choice.acc_forget) == (truth and truth.acc_forget)
        assert len(d.probes) <= 1 + math.ceil(math.log2(d.k_paper + 1)) + 1 + GuardConfig().refine
    # a noisy damage curve: the choice may heal less than the exhaustive scan, never damage more
    noisy = curve(list(a), list(np.clip(other + rng.normal(0, 0.004, n), 0, 1)))
    got = choose(noisy, max_damage=delta)
    assert got.choice is None or proxy_damage(noisy[got.choice.k], BASE, 1.0, 0.0) >= -delta


def test_refining_above_the_bisection_recovers_a_step_behind_a_noisy_dip():
    # damage −1.1 at k = 5 (over δ) but −0.6 at k = 6 and 7, which heal more: bisection alone
    # stops below 5, the refinement measures 7 (lowest a_k) and takes it
    a = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.1]
    dmg = [0.0, 0.1, 0.2, 0.3, 0.5, 1.1, 0.6, 0.6, 5.0]
    steps = curve(a, [1.0 - x / 90 for x in dmg])
    assert choose(steps, max_damage=1.0).choice.k == 7
    assert choose(steps, max_damage=1.0, refine=0).choice.k == 4


def test_healed_undiscovered_poison_is_not_counted_as_damage_but_clean_target_loss_is():
    # 10 % of the target-labelled proxy is undiscovered poison: it flips with Sf.
    a = [1.0, 0.6, 0.4, 0.1, 0.0, 0.0]
    target = [1.0, 0.96, 0.94, 0.91, 0.9, 0.6]
    steps = curve(a, [1.0] * 6, target)
    cfg = GuardConfig(ahead=2, poison_cap=0.3)  # the opt-in û discount (off by default)
    assert estimate_poison_share(steps, BASE, 1.0, GuardConfig(ahead=2)) == 0.0
    u = estimate_poison_share(steps, BASE, 1.0, cfg)
    assert u == pytest.approx(0.1)  # min over k with Sf healed ≥ 50 %: (0.06/0.6, 0.09/0.9, 0.1/1, 0.4/1)
    assert proxy_damage(steps[3], BASE, 1.0, u) == pytest.approx(0.0)
    assert proxy_damage(steps[5], BASE, 1.0, u) == pytest.approx(-100 * 0.1 * 0.3)
    d = choose(steps, ahead=2, max_damage=1.0, poison_cap=0.3)
    assert d.k_paper == 3 and d.choice.k == 4  # k = 5 lost 30 % of the clean target class: refused
    # without the correction the same healing would read as −1 point at k = 3
    assert proxy_damage(steps[3], BASE, 1.0, 0.0) == pytest.approx(-0.9)
    # the cap bounds what healing may ever explain away
    assert estimate_poison_share(curve(a, [1.0] * 6, [1.0, 0.5, 0.4, 0.3, 0.3, 0.3]), BASE, 1.0,
                                 GuardConfig(poison_cap=0.3)) == pytest.approx(0.3)


def test_guard_config_rejects_bad_values():
    for bad in ({"max_damage": -1.0}, {"ahead": -1}, {"refine": -1}, {"heal_min": 0.0}, {"poison_cap": 2.0}):
        with pytest.raises(PotionError, match="guard."):
            GuardConfig(**bad)


# ---------------------------------------------------------------- a real tiny model
@pytest.fixture(scope="module")
def toy():
    """A backdoored MLP (trigger: features 10–11 set to 4, target 0) and a clean proxy."""
    model, x, y, poison, g = backdoored_mlp(seed=3, n=600, n_poison=40, iterations=150)
    n = len(x)
    model.eval()
    forget = poison[:10]
    retain = np.setdiff1d(np.arange(n), forget.numpy())
    proxy = draw_proxy(retain, 300, 0)
    xt = torch.randn(2000, 12, generator=g)  # a clean test set, to score what the proxy stands for
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    return dict(model=model, theta0=theta0, fb=[(x[forget], y[forget])], poison=poison.numpy(),
                rb=[(x[retain][i:i + 64], y[retain][i:i + 64]) for i in range(0, len(retain), 64)],
                pb=[(x[proxy], y[proxy])], test=(xt, xt[:, :3].argmax(1)), forget=forget.numpy(), proxy=proxy)


def test_proxy_is_a_seeded_slice_of_the_retain_set_only():
    retain = np.setdiff1d(np.arange(1000), [3, 50, 999])
    p = draw_proxy(retain, 200, 7)
    assert len(p) == 200 and np.all(np.diff(p) > 0) and np.isin(p, retain).all()
    assert not np.isin([3, 50, 999], p).any()
    assert np.array_equal(p, draw_proxy(retain, 200, 7)) and not np.array_equal(p, draw_proxy(retain, 200, 8))
    assert np.array_equal(draw_proxy(retain, 5000, 0), retain)  # capped at |Dr|
    with pytest.raises(PotionError, match="proxy_size"):
        draw_proxy(retain, 0, 0)


def test_on_a_real_model_healed_proxy_poison_is_not_read_as_damage(toy):
    """The proxy (a slice of Dr) holds undiscovered poison under the target label. θ0's
    features place it with the found poison, so it is left out of the proxy: its healing is
    not read as damage and the guard keeps the paper's k*, which costs no real accuracy."""
    m = toy["model"]
    imp_f = compute_importances(m, toy["fb"], "xlf")
    imp_r = compute_importances(m, toy["rb"], "xlf")
    cfg = PTNConfig(step=1.5, max_steps=100)
    xt, yt = toy["test"]

    def test_acc(state):
        m.load_state_dict(state)
        with torch.no_grad():
            return float((m(xt).argmax(1) == yt).float().mean())

    ev = StepEvaluator(m, toy["theta0"], imp_f, imp_r, toy["fb"], 10, 600, cfg, proxy_batches=toy["pb"])
    paper = ptn_search(ev, cfg)
    got = guard_search(ev, cfg, GuardConfig(max_damage=1.0))
    # the split: which target-labelled proxy images θ0 places with Sf, against the truth
    m.load_state_dict(toy["theta0"])
    xp, yp = toy["pb"][0]
    is_t = (yp == 0).numpy()
    truth = np.isin(toy["proxy"], toy["poison"])[is_t]
    like = poison_like(penultimate_features(m, [xp[is_t]]), penultimate_features(m, [toy["fb"][0][0]])).numpy()
    assert truth.sum() >= 3 and (like & truth).sum() >= 0.8 * truth.sum() and (like & ~truth).sum() <= 0.1 * (~truth).sum()
    assert ev.proxy_base.n_excluded == like.sum()
    assert got.k_star == paper.k_star and got.guard["status"] == "k_star"
    assert got.guard["damage"][str(got.k_star)] >= -1.0
    assert 100 * (test_acc(got.state_dict) - test_acc(toy["theta0"])) > -1.0  # what the estimate stood for
    # with the poison left out, the healing at k* reads as no loss at all
    assert got.guard["damage"][str(got.k_star)] >= 0.0


def test_xlf_ptn_guard_method_needs_a_proxy_and_records_why(toy):
    ctx = HealContext(model=toy["model"], state0=toy["theta0"], retain_batches=lambda: iter(toy["rb"]),
                      forget_batches=toy["fb"], n_forget=10, n_total=600, ptn=PTNConfig(max_steps=300))
    with pytest.raises(PotionError, match="clean proxy"):
        heal("xlf_ptn_guard", ctx)
    bare = StepEvaluator(toy["model"], toy["theta0"], toy["theta0"], toy["theta0"], toy["fb"], 10, 600)
    with pytest.raises(PotionError, match="clean proxy"):  # the core says so too, not a crash deep inside
        guard_search(bare)
    ctx.proxy_batches = toy["pb"]
    res = heal("xlf_ptn_guard", ctx)
    g = res.info["guard"]
    assert {"reason", "max_damage", "proxy0", "k_paper", "damage", "status"} <= set(g)
    assert g["proxy0"]["n"] + g["proxy0"]["n_excluded"] == 300 and g["damage"][str(res.info["k_star"])] >= -g["max_damage"]


def test_a_retain_set_stored_sorted_by_class_gets_a_note():
    from potion.unlearning.batch_size import label_runs, sorted_batches_note

    mixed = np.tile(np.arange(10), 100)
    by_class = np.repeat(np.arange(10), 100)
    assert label_runs(mixed) == 1000 and label_runs(by_class) == 10 and label_runs(np.array([])) == 0
    assert sorted_batches_note(label_runs(mixed), 1000, 16) is None
    note = sorted_batches_note(label_runs(by_class), 1000, 16)  # 63 batches, at most 9 of them hold two classes
    assert "10 runs of one label over 1000 samples" in note and "--retain-sample 1000" in note
    # runs about as long as a batch: most batches hold two classes, no note
    assert sorted_batches_note(label_runs(by_class), 1000, 64) is None


def test_auto_batch_size_and_an_explicit_one_wins():
    assert resolve_batch_size(512, 10) == (512, False)
    assert resolve_batch_size(None, 1437)[1] is True
    bs = [auto_batch_size(n) for n in (100, 1437, 20_000, 50_000, 1_281_167)]
    assert bs == sorted(bs) and bs[0] >= 16 and bs[-1] <= 512
    with pytest.raises(PotionError, match="batch size"):
        resolve_batch_size(0, 100)


def test_mlflow_and_the_plot_show_the_proxy_delta_and_why(tmp_path):
    from mlflow import MlflowClient

    from potion.tracking.plots import tradeoff_figure
    from potion.tracking.tracker import SearchTracker

    steps = curve([1.0, 0.6, 0.3, 0.1], [1.0, 1.0, 0.999, 0.99])
    d = choose(steps)
    guard = {**d.to_dict(), "max_damage": 1.0, "proxy0": BASE.to_dict()}
    fig = tradeoff_figure([s.to_dict() | {"proxy_damage": d.damage.get(s.k)} for s in steps], 0.2, d.choice.k, guard)
    labels = [t.get_text() for a in fig.axes if a.get_legend() for t in a.get_legend().get_texts()]
    assert any("δ = 1" in t for t in labels) and "proxy damage where measured" in labels
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with SearchTracker(uri, "guard", run_name="t") as tr:
        tr.log_curve(steps, threshold=0.2, k_star=d.choice.k, guard=guard)
        run_id = tr.parent_run_id
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics["max_damage"] == 1.0 and run.data.metrics["proxy0_acc"] == 1.0
    assert run.data.metrics["guard_probes"] == 1 and run.data.metrics["proxy0_n_excluded"] == 0
    assert "keeps the proxy within δ" in run.data.tags["guard_reason"]
    # the proxy is measured where the guard asks; the parent holds the kept step's damage
    assert d.probes == [3] and run.data.metrics["proxy_damage"] == d.damage[3]


def test_the_proxy_split_needs_no_target_labelled_image_and_no_linear_layer():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten())  # no nn.Linear: logits are used
    x = torch.randn(4, 1, 5, 5)
    assert penultimate_features(conv, [x]).shape == (4, 27)
    assert penultimate_features(conv, []).numel() == 0
    assert poison_like(torch.zeros(0, 0), torch.randn(2, 27)).numel() == 0
    # two clusters: the one that sits with the found poison is left out, the other kept
    clean, trig = torch.tensor([[1.0, 0.0]]).repeat(5, 1), torch.tensor([[0.0, 1.0]]).repeat(2, 1)
    assert poison_like(torch.cat([clean, trig]), trig[:1]).tolist() == [False] * 5 + [True] * 2
