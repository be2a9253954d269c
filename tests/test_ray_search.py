"""The Ray Tune PTN search: same k* and weights as the local search, early stop, MLflow.

The searcher's logic is checked first without Ray, by simulating trials that finish in
random order against brute-force linear answers; then a few real Tune runs on a tiny
poisoned ResNet-9 (local Ray with 2 CPUs, started once for the module).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from potion.errors import PotionError
from potion.distributed.search import make_ray_search, ray_ptn_search
from potion.distributed.searcher import PTNSearcher
from potion.distributed.trials import make_payload, payload_from_evaluator
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.ptn import PTNConfig, PTNNoCrossing, StepResult, ptn_search
from searcher_driver import acc_result, drive
from toy_backdoor import digits_resnet

FINISHED = PTNSearcher.FINISHED


# ---------------------------------------------------------------- no Ray: the searcher's logic
def linear_k_star(accs, threshold, max_steps):
    for k in range(min(len(accs), max_steps + 1)):
        if accs[k] <= threshold:
            return k
    return None


def simulate(searcher: PTNSearcher, accs, window: int, seed: int):
    return drive(searcher, acc_result(accs), window, seed)


@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_sliding_window_finds_linear_k_star_on_any_curve(window):
    rng = np.random.default_rng(window)
    for trial in range(60):
        n = int(rng.integers(1, 40))
        accs = list(rng.choice([0.1, 0.5, 0.9], size=n, p=[0.1, 0.3, 0.6]))
        max_steps = n - 1
        want = linear_k_star(accs, 0.2, max_steps)
        s = simulate(PTNSearcher(0.2, max_steps, window, "waves"), accs, window, seed=trial)
        hit = s.crossing()
        assert (hit.k if hit else None) == want, (accs, window)
        if want is not None:
            assert set(range(want + 1)) <= set(s.results)  # every k below k* was measured
            assert max(s.proposed) <= want + window - 1  # none beyond the window after k*
        else:
            assert sorted(s.results) == list(range(max_steps + 1))
        assert len(s.proposed) == len(set(s.proposed))  # no k twice


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_bisect_equals_linear_on_non_increasing_curves(window):
    rng = np.random.default_rng(100 + window)
    for trial in range(60):
        n = int(rng.integers(1, 300))
        accs = sorted(rng.uniform(0, 1, size=n), reverse=True)
        max_steps = n - 1
        want = linear_k_star(accs, 0.3, max_steps)
        s = simulate(PTNSearcher(0.3, max_steps, window, "bisect"), accs, window, seed=trial)
        hit = s.crossing()
        assert (hit.k if hit else None) == want
        if want is not None and want > 0:
            assert want - 1 in s.results  # the bracket is closed: k*-1 measured, not crossing
        assert len(s.proposed) == len(set(s.proposed))
        if n > 64:
            assert len(s.proposed) < n / 2  # it does search, not scan


class FakeEvaluator:
    """a_k from a list; enough of the evaluator interface for ptn_search."""

    def __init__(self, accs, config):
        self.accs, self.config, self.acc0 = accs, config, 1.0
        self.seen = []

    def evaluate(self, k):
        self.seen.append(k)
        return StepResult(k, 0.1, 1.0, 1.0, 1, self.accs[k])

    def healed_state(self, k):
        return {}


def test_bisect_window_one_probes_the_same_steps_as_the_local_bisect():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(2, 200))
        accs = sorted(rng.uniform(0, 1, size=n), reverse=True)
        cfg = PTNConfig(rho=0.3, max_steps=n - 1, strategy="bisect")
        ev = FakeEvaluator(accs, cfg)
        try:
            local = ptn_search(ev, cfg).k_star
        except PTNNoCrossing:
            local = None
        s = simulate(PTNSearcher(0.3, n - 1, 1, "bisect"), accs, 1, seed=0)
        assert s.proposed == ev.seen
        assert (s.crossing().k if s.crossing() else None) == local


def test_searcher_reruns_a_dead_trial_once_stops_on_an_error_and_checks_its_arguments():
    s = PTNSearcher(0.2, 10, 2, "waves")
    assert s.suggest("a") == {"k": 0}
    s.on_trial_complete("a", None, error=True)  # the worker died: k is a pure function, run it again
    assert not s.failed and s.suggest("b") == {"k": 0}
    s.on_trial_complete("b", None, error=True)  # died again: give up
    assert s.failed and s.suggest("c") == FINISHED
    s = PTNSearcher(0.2, 10, 2, "bisect")
    assert s.suggest("a") == {"k": 0}
    s.on_trial_complete("a", {"k": 0, "error": "ValueError: bad"})  # raised inside: never retried
    assert "ValueError: bad" in s.failed and s.suggest("b") == FINISHED
    with pytest.raises(PotionError, match="strategy"):
        PTNSearcher(0.2, 10, 2, "spiral")
    with pytest.raises(PotionError, match="window"):
        PTNSearcher(0.2, 10, 0, "waves")


def test_payload_is_numpy_and_rebuilds_the_same_evaluator(problem):
    p = problem
    payload = make_payload(model_name=p["name"], model_kwargs=p["kwargs"], state0=p["state0"], imp_f=p["imp_f"],
                           imp_r=p["imp_r"], forget_batches=p["forget"], n_forget=p["n_forget"],
                           n_total=p["n_total"], config=p["cfg"], val_batches=p["val"])
    arrays = list(payload.state0.values()) + list(payload.imp_f.values()) + list(payload.imp_r.values())
    arrays += [a for b in payload.forget_batches + payload.val_batches for a in b]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    from potion.distributed.trials import build_evaluator

    a, b = build_evaluator(payload), p["evaluator"]()
    assert a.acc0 == b.acc0
    for k in (0, 3, 9):
        assert a.evaluate(k) == b.evaluate(k)
        sa, sb = a.healed_state(k), b.healed_state(k)
        assert all(torch.equal(sa[n], sb[n]) for n in sb)


# ---------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    from potion.distributed import runtime as ray_runtime

    ray_runtime.connect(None, num_cpus=2)
    yield
    ray_runtime.shutdown_if_owned()


@pytest.fixture(scope="module")
def problem():
    """A ResNet-9 (width 1/8) trained 100 steps on digits with 100 BadNet samples;
    XLF importances on half of them (Sf) and the rest of D (Dr)."""
    from potion.models import create_model
    from potion.unlearning.importances import compute_importances

    model, kwargs, view, deletion, retain = digits_resnet(iterations=100)
    forget = list(view.subset(deletion).batches(32))
    val = list(view.subset(retain[:200]).batches(100))
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    imp_f = compute_importances(model, forget, "xlf")
    imp_r = compute_importances(model, view.subset(retain).batches(256), "xlf")
    cfg = PTNConfig(step=1.5, max_steps=60)

    def evaluator(config=cfg, with_val=True):
        return StepEvaluator(create_model("resnet9", **kwargs), state0, imp_f, imp_r, forget, len(deletion),
                             len(view), config, val_batches=val if with_val else None)

    return dict(name="resnet9", kwargs=kwargs, state0=state0, imp_f=imp_f, imp_r=imp_r, forget=forget, val=val,
                n_forget=len(deletion), n_total=len(view), cfg=cfg, evaluator=evaluator)


def test_ray_window_search_matches_local_linear_and_logs_children(ray_local, problem, tmp_path, capsys):
    from mlflow import MlflowClient

    from potion.tracking.tracker import SearchTracker

    cfg = problem["cfg"]
    local = ptn_search(problem["evaluator"](), cfg)
    assert 3 <= local.k_star < cfg.max_steps  # a search worth the name
    window = 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with SearchTracker(uri, "ray-search", run_name="t", params={"window": window}) as tracker:
        search = make_ray_search(model_name=problem["name"], model_kwargs=problem["kwargs"], window=window,
                                 storage_path=tmp_path / "ray_results", callbacks=[tracker.tune_callback()],
                                 progress=True)
        capsys.readouterr()
        t0 = time.perf_counter()
        got = search(problem["evaluator"](), PTNConfig(**{**cfg.__dict__, "strategy": "waves"}))
        elapsed = time.perf_counter() - t0
        parent = tracker.parent_run_id

    assert (got.k_star, got.alpha, got.s, got.n_selected) == (local.k_star, local.alpha, local.s, local.n_selected)
    assert got.acc0 == local.acc0 and got.threshold == local.threshold
    assert got.state_dict.keys() == local.state_dict.keys()
    assert all(torch.equal(got.state_dict[n], local.state_dict[n]) for n in local.state_dict)
    # the same evaluation function: every step both measured agrees exactly
    by_k = {r.k: r for r in got.trace}
    assert [by_k[r.k] for r in local.trace] == local.trace
    # early stop: nothing past the window after k*, far fewer trials than max_steps
    ks = sorted(by_k)
    assert ks[: local.k_star + 1] == list(range(local.k_star + 1))
    assert max(ks) <= local.k_star + window - 1
    assert got.evaluations == len(ks) <= local.k_star + window
    assert (tmp_path / "ray_results").is_dir()
    # progress: one bar update per finished step, with k and a_k against the threshold
    err = capsys.readouterr().err
    assert "\r" not in err and "PTN search (waves) on Ray, 2 in flight" in err
    assert f"{got.evaluations} step" in err and f"done: k*={got.k_star} " in err.splitlines()[-1]
    print(f"ray window search: k*={got.k_star}, {got.evaluations} trials, {elapsed:.1f}s")

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("ray-search").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 1 + got.evaluations and len(children) == got.evaluations
    from potion.tracking.steps import step_fields

    for r in children:
        step = by_k[int(r.data.metrics["k"])]
        assert r.data.metrics["acc_forget"] == step.acc_forget and r.data.metrics["alpha"] == step.alpha
        assert r.data.metrics["acc_val"] == step.acc_val and r.info.status == "FINISHED"
        assert r.info.run_name == f"k={step.k:03d}"
        assert set(r.data.metrics) <= set(step_fields())  # no Tune bookkeeping (timestamp, pid, done, ...)



def test_ray_window_takes_the_smallest_crossing_when_a_higher_one_finishes_first(ray_local, tmp_path):
    """The trial at the paper's k* waits for the one at k*+1 (which crosses too), so k*+1
    reports first: the search must still return k*, the smallest crossing."""
    from ray import tune

    from potion.models import parse_model_spec

    def spec(**kw):
        return parse_model_spec(f"{Path(__file__).parent / 'slow_step_net.py'}:SlowAtStep", {"scale": 40.0, **kw})

    n = 2000
    imp_f, imp_r = {"w": 1e6 * torch.arange(1, n + 1, dtype=torch.float32)}, {"w": torch.ones(n)}
    x = ((torch.arange(100) + 0.5) / 100).unsqueeze(1)
    forget = [(x, torch.zeros(100, dtype=torch.long))]
    cfg = PTNConfig(step=1.5, max_steps=30)

    def evaluator(s):
        model = s.build()
        return StepEvaluator(model, {"w": torch.ones(n)}, imp_f, imp_r, forget, 10, 100, cfg)

    local = ptn_search(evaluator(spec()), cfg)
    k_star = local.k_star
    assert 3 <= k_star < 10 and local.trace[k_star].acc_forget <= local.threshold
    marker = tmp_path / "k_star_plus_1_ran"
    after = evaluator(spec()).evaluate(k_star + 1)  # crosses too: the first crossing to finish
    assert after.acc_forget <= local.threshold
    slow = spec(slow_at=local.trace[k_star].n_selected, signal_at=after.n_selected, marker=str(marker))

    class Finished(tune.Callback):
        def __init__(self):
            self.ks: list[int] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.ks.append(int(result["k"]))

    order = Finished()
    search = make_ray_search(model_factory=slow.build, window=3, storage_path=tmp_path / "ray_results",
                             callbacks=[order])
    got = search(evaluator(slow), PTNConfig(**{**cfg.__dict__, "strategy": "waves"}))
    assert order.ks.index(k_star + 1) < order.ks.index(k_star), order.ks  # out of order, as set up
    assert got.k_star == k_star and got.alpha == local.alpha and got.n_selected == local.n_selected
    assert torch.equal(got.state_dict["w"], local.state_dict["w"])


def _store_mb() -> float:
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0.0)
    return (total - ray.available_resources().get("object_store_memory", total)) / 2**20


def test_ray_bisect_window_one_equals_local_bisect(ray_local, problem, tmp_path):
    cfg = PTNConfig(**{**problem["cfg"].__dict__, "strategy": "bisect"})
    ev = problem["evaluator"](cfg, with_val=False)
    local = ptn_search(problem["evaluator"](cfg, with_val=False), cfg)
    payload = payload_from_evaluator(ev, cfg, model_name=problem["name"], model_kwargs=problem["kwargs"])
    used = _store_mb()
    got = ray_ptn_search(payload, cfg, window=1, storage_path=tmp_path, evaluator=ev)
    # the payload leaves the object store with the search (Tune would keep it for the driver's life)
    deadline = time.monotonic() + 20
    while _store_mb() > used + 0.05 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _store_mb() <= used + 0.05, f"object store {used:.2f} -> {_store_mb():.2f} MB"
    assert [r.k for r in got.trace] == [r.k for r in local.trace]
    assert got.trace == local.trace
    assert got.k_star == local.k_star and got.alpha == local.alpha
    assert all(torch.equal(got.state_dict[n], local.state_dict[n]) for n in local.state_dict)


def test_ray_search_reports_a_failing_trial(ray_local, problem, tmp_path):
    ev = problem["evaluator"](with_val=False)
    payload = payload_from_evaluator(ev, model_name=problem["name"], model_kwargs={**problem["kwargs"], "depth": 3})
    with pytest.raises(PotionError, match="PTN trial failed.*depth"):
        ray_ptn_search(payload, problem["cfg"], window=2, storage_path=tmp_path, evaluator=ev)


def test_ray_search_needs_a_connection_and_a_model_spec(problem, monkeypatch):
    import ray

    ev = problem["evaluator"](with_val=False)
    with pytest.raises(PotionError, match="model name"):
        payload_from_evaluator(ev)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    payload = payload_from_evaluator(ev, model_name="resnet9", model_kwargs=problem["kwargs"])
    with pytest.raises(PotionError, match="not connected"):
        ray_ptn_search(payload, problem["cfg"])


def test_ray_guard_search_makes_the_local_guards_choice(ray_local, problem, tmp_path):
    """The damage guard with the paper's search on Tune returns the local guard's step and weights."""
    from potion.unlearning.guard import GuardConfig, guard_search

    cfg = problem["cfg"]
    gcfg = GuardConfig(max_damage=1.0, ahead=2)

    def evaluator():
        ev = problem["evaluator"](cfg, with_val=False)
        ev.proxy_batches = problem["val"]  # a slice of Dr, as heal draws it
        return ev

    local = guard_search(evaluator(), cfg, gcfg)
    search = make_ray_search(model_name=problem["name"], model_kwargs=problem["kwargs"], window=3,
                             storage_path=tmp_path / "ray_results")
    got = guard_search(evaluator(), cfg, gcfg, search=search)
    assert got.k_star == local.k_star and got.guard["status"] == local.guard["status"]
    assert got.guard["reason"] == local.guard["reason"] and got.guard["damage"] == local.guard["damage"]
    assert got.guard["probes"] == local.guard["probes"] and got.guard["probes"]
    horizon = local.guard["horizon"]
    assert got.guard["horizon"] == horizon and max(r.k for r in got.trace) <= max(horizon + 2, *local.guard["probes"])
    # the Tune trials measured Sf alone; the probes (on the driver) the proxy too
    assert all((r.acc_proxy is not None) == (str(r.k) in got.guard["damage"]) for r in got.trace)
    assert [r for r in got.trace if r.k <= horizon] == [r for r in local.trace if r.k <= horizon]
    assert all(torch.equal(got.state_dict[n], local.state_dict[n]) for n in local.state_dict)
