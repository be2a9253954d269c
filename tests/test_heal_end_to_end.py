"""A heal heals: poison digits, train once, then heal through the command line with the
default method and the default MLflow store, on the local and the Ray backend, and check
the effect on the model — attack success falls, poison healed rises, clean accuracy stays —
not just the shape of the output.

One model is trained for the whole module (``run_dir``); every heal reads it.

Bounds of the efficacy test, measured, not tuned. The run below (badnet, 5 % of digits
poisoned, ResNet-9 width 0.25, 150 iterations) healed with the default method
(``potion_plus``, δ = 1 point, importance batch size chosen from the data: 16 here) and a
deletion set of 30 % of the poison (22 samples), for seeds 0–4 of poison draw and training:

    for s in 0 1 2 3 4; do
      potion train --dataset digits --poison badnet --poison-share 0.05 --seed $s --iterations 150 --out r$s
      potion heal --run r$s --discovery-share 0.3 --tracking-uri none --cache-dir none --out h$s
    done

measured 2026-12-03 17:55 UTC with the trigger transplant, and again at 20:52 UTC with the
erosion control, the lazy checks and channels-last updates: the same on every seed (step:
NegGrad+ kept, or the guard's dampening, k = the paper's k* or a partial step below it; Sf:
the deletion set as grown), and
``--method xlf_ptn_guard`` beside it (measured the same day, before the transplant, which it
does not use):

    seed  Sf  step          asr before→after  poison_healed before→after  clean_acc before→after  guard: healed, clean_acc
    0     50  NegGrad+      0.948 → 0.000     14.9 → 100.0                0.9861 → 0.9917         76.3, 0.9833
    1     46  k=16 partial  0.988 → 0.519     11.3 → 53.4                 0.9806 → 0.9778         78.0, 0.9722
    2     28  k=28 partial  0.997 → 0.176     10.4 → 84.7                 0.9889 → 0.9778         85.5, 0.9750
    3     55  NegGrad+      1.000 → 0.006     10.2 → 98.9                 0.9833 → 0.9889         72.2, 0.9778
    4     33  k=30 partial  1.000 → 0.537     10.1 → 52.8                 0.9917 → 0.9778         61.9, 0.9694

so the bounds leave a margin beyond the worst seed: asr after < 0.75 (worst 0.537), poison
healed > 35 (worst 52.8), clean accuracy within 3 points of θ0's (worst −1.4). θ0 itself
fails the first two (asr ≥ 0.94, poison healed ≤ 14.9). On these seeds the default healed
78.0 % at −0.33 points on average against the guard's 74.8 % at −1.06; where its Sf stayed
under NegGrad+'s 50 samples it dampened the grown set and healed less than the guard on two
seeds (1 and 4). The paper-exact ``xlf_ptn`` healed more (80.7–103.8 on the seeds of
2026-11-29) at up to −11.7 points of clean accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from potion.cli import main
from potion.runs.configs import HealJob

pytestmark = pytest.mark.slow

SEED = 0
ASR_AFTER_MAX = 0.75
POISON_HEALED_MIN = 35.0
CLEAN_DROP_MAX = 0.03
HEAL_ARGS = ["--discovery-share", "0.3", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    rc = main(["train", "--dataset", "digits", "--poison", "badnet", "--poison-share", "0.05", "--seed", str(SEED),
               "--iterations", "150", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def default_heal(run_dir, tmp_path_factory):
    """``potion heal`` with no tracking flag and MLFLOW_TRACKING_URI unset, so the default
    store OUT/mlflow.db is used; each backend gets its own importance cache (otherwise the
    Ray heal would read the local heal's retain importances and never run its sharded pass)."""
    done: dict[tuple, tuple[Path, dict]] = {}

    def heal(backend: str, method: str | None = None) -> tuple[Path, dict]:
        if (backend, method) not in done:
            base = tmp_path_factory.mktemp(f"heal-{backend}")
            extra = ["--num-cpus", "2"] if backend == "ray" else []
            extra += ["--method", method] if method else []
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv("MLFLOW_TRACKING_URI", raising=False)
                mp.setenv("POTION_CACHE", str(base / "cache"))
                rc = main(["heal", "--run", str(run_dir), "--backend", backend, *HEAL_ARGS, *extra,
                           "--out", str(base / "out")])
            assert rc == 0
            done[backend, method] = base / "out", json.loads((base / "out" / "report.json").read_text())
        return done[backend, method]

    return heal


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_the_default_heal_heals(default_heal):
    out, rep = default_heal("local")
    assert rep["method"] == HealJob().method and rep["backend"] == "local"
    before, after = rep["before"], rep["after"]
    assert before["asr"] > 0.9 and rep["before_poison_healed"] < 20  # the attack worked
    assert after["asr"] < ASR_AFTER_MAX, rep["after"]
    assert after["poison_healed"] > POISON_HEALED_MIN, rep["after"]
    assert after["clean_acc"] >= before["clean_acc"] - CLEAN_DROP_MAX, rep["after"]
    # The numbers describe the written model, not some other state.
    metrics = out.parent / "model.metrics.json"
    assert main(["evaluate", "--run", rep["run"], "--checkpoint", str(out / "model.pt"), "--out", str(metrics)]) == 0
    measured = json.loads(metrics.read_text())
    assert measured["asr"] == pytest.approx(after["asr"]) and measured["clean_acc"] == pytest.approx(after["clean_acc"])


@pytest.mark.ray
@pytest.mark.parametrize("method", [None, "xlf_ptn_guard"])  # the default, and the dampening on the cluster
def test_ray_backend_heals_like_the_local_one(default_heal, method):
    (out_l, local), (out_r, ray) = default_heal("local", method), default_heal("ray", method)
    assert ray["backend"] == "ray" and ray["method"] == local["method"] == (method or HealJob().method)
    assert ray["k_star"] == local["k_star"]
    assert ray["info"].get("step") == local["info"].get("step")
    if method:  # the search ran as Ray Tune trials on the sharded retain importances
        assert ray["k_star"] is not None and len(ray["trace"]) > 0
        assert ray["alpha"] == pytest.approx(local["alpha"], rel=1e-4)
    # The sharded retain pass sums the same batches in another order: equal up to float rounding.
    a, b = _state(out_l / "model.pt"), _state(out_r / "model.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-4, atol=1e-6), name
    assert ray["after"]["asr"] < ASR_AFTER_MAX and ray["after"]["poison_healed"] > POISON_HEALED_MIN
    assert ray["after"]["clean_acc"] == pytest.approx(local["after"]["clean_acc"], abs=2 / 360)


def test_default_mlflow_store_holds_parent_children_and_model(default_heal):
    from mlflow import MlflowClient

    out, rep = default_heal("local")
    db = out / "mlflow.db"
    assert db.is_file(), "no tracking flag and no MLFLOW_TRACKING_URI: the store must be OUT/mlflow.db"
    assert rep["mlflow"]["tracking_uri"] == f"sqlite:///{db.resolve()}"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(rep["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parent_id = rep["mlflow"]["parent_run_id"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert parents[0].info.status == "FINISHED"
    assert len(children) >= 1
    assert any(k.startswith("after_") for k in parents[0].data.metrics), parents[0].data.metrics
    # The healed model: a run artifact under model/ or (MLflow 3) a logged model of this run.
    def _walk(path=None):
        for f in client.list_artifacts(parent_id, path):
            yield from (_walk(f.path) if f.is_dir else [f.path])

    artifacts = list(_walk())
    logged = []
    search = getattr(client, "search_logged_models", None)
    if search is not None:
        logged = search([exp.experiment_id], filter_string=f"source_run_id = '{parent_id}'")
    assert logged or any(p.startswith("model/") for p in artifacts), artifacts


# ---------------------------------------------------------------- the importance cache, through heal
def test_cache_skips_the_retain_pass_and_never_crosses_deletion_sets(run_dir, tmp_path, monkeypatch):
    import potion.unlearning.importances as importances

    calls = []
    real = importances.compute_importances

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(importances, "compute_importances", counting)
    cache = tmp_path / "cache"

    def heal(name: str, *extra: str) -> dict:
        calls.clear()
        out = tmp_path / name
        assert main(["heal", "--run", str(run_dir), *HEAL_ARGS, "--cache-dir", str(cache), "--tracking-uri", "none",
                     "--method", "xlf_ptn_guard", "--out", str(out), *extra]) == 0  # reads both importances
        rep = json.loads((out / "report.json").read_text())
        rep["calls"] = len(calls)
        rep["deletion"] = pq.read_table(out / "deletion_set.parquet").column("index").to_numpy()
        return rep

    first = heal("first")
    assert first["calls"] == 2  # Sf and Dr, both computed and stored
    other_rho = heal("rho", "--rho", "0.3")
    assert other_rho["calls"] == 0  # both read back: ρ does not change importances
    assert np.array_equal(other_rho["deletion"], first["deletion"])
    assert other_rho["timings"]["importance_retain_s"] < 0.5 * first["timings"]["importance_retain_s"]
    other_set = heal("other-set", "--seed", "1")  # another draw of the deletion set
    assert not np.array_equal(other_set["deletion"], first["deletion"])
    assert other_set["calls"] == 2, "importances of another deletion set were read from the cache"


# ---------------------------------------------------------------- baselines for real
def test_eu_retrained_without_all_poison_forgets_the_trigger(run_dir, tmp_path):
    """EU retrains from scratch on Dr with θ0's recipe; with every poisoned sample identified
    Dr is clean, so the trigger is gone.

    Measured on the runs of the module docstring, seeds 0, 1, 2 (``potion heal --run r$s
    --discovery-share 1.0 --method eu --tracking-uri none --cache-dir none``): asr
    0.978/0.981/0.994 → 0.000/0.000/0.000, clean_acc 0.9861/0.9944/0.9889 after."""
    out = tmp_path / "eu"
    assert main(["heal", "--run", str(run_dir), "--discovery-share", "1.0", "--method", "eu", "--quiet",
                 "--tracking-uri", "none", "--cache-dir", "none", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["deletion_set"]["true_poison_in_set"] == rep["deletion_set"]["n_poison_total"]
    assert rep["timings"]["retrain_s"] > 0
    assert rep["before"]["asr"] > 0.9 and rep["after"]["asr"] < 0.1, rep["after"]
    assert rep["after"]["clean_acc"] > 0.85


def test_ssd_grid_picks_the_best_pair_of_its_grid(run_dir, tmp_path):
    """Measured on seeds 0, 1, 2 (``... --discovery-share 0.3 --batch-size 16 --method
    ssd_grid``): best score 0.354/0.194/0.361 (the worst pair of each grid −0.44/−0.43/−0.42),
    ra 0.119/0.117/0.106 → 0.886/0.581/0.911."""
    out = tmp_path / "grid"
    assert main(["heal", "--run", str(run_dir), *HEAL_ARGS, "--method", "ssd_grid", "--tracking-uri", "none",
                 "--cache-dir", "none", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    info, grid = rep["info"], rep["info"]["grid"]
    assert len(grid) >= 10 and len({(p["alpha"], p["lam"]) for p in grid}) == len(grid)
    scores = [p["score"] for p in grid]
    assert info["score"] == max(scores) and min(scores) < max(scores)
    assert (rep["alpha"], info["lam"]) == next((p["alpha"], p["lam"]) for p in grid if p["score"] == max(scores))
    assert info["score"] >= 0  # θ0 scores 0 by construction: the pick is no worse than doing nothing
    assert rep["after"]["ra"] >= rep["before"]["ra"]
