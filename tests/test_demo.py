"""The README's main job, in its CPU smoke mode, on the backend `make demo` uses (Ray), and the
MLflow store a newcomer opens."""
from __future__ import annotations

import json
import os
import re
import shlex

import mlflow
import pytest
import torch

from potion.cli import main
from potion.runs.configs import HealJob


@pytest.mark.slow
@pytest.mark.ray
def test_demo_smoke_runs_end_to_end(tmp_path, capsys):
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from potion.models import load_checkpoint
    from potion.heal.report import before_after_metrics
    from potion.tracking.steps import child_fields, child_run_name
    from potion.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--smoke", "--quiet"]) == 0  # no --backend: what `make demo` runs
    printed = capsys.readouterr().out
    assert "poison_healed" in printed
    # the printed MLflow command works in a fresh shell: its executable is a real file
    command = re.search(r"MLflow UI:\s+(.+)", printed).group(1)
    exe = shlex.split(command)[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK), command
    assert shlex.split(command)[1:4] == ["ui", "--backend-store-uri", f"sqlite:///{out.resolve() / 'mlflow.db'}"]
    assert "workflowType=machine_learning" in printed

    rep = json.loads((out / "heal" / "report.json").read_text())
    assert rep["backend"] == "ray" and rep["method"] == HealJob().method == "potion_plus"
    assert "potion_plus: the deletion set" in printed  # what it did beyond the guard, in words
    # Measured (`potion demo --smoke`): nothing grown in, and Sf's 9 samples are under NegGrad+'s
    # 50, so the guard dampened, its search running as Ray Tune trials
    assert rep["k_star"] is not None and rep["info"]["plus"]["neggrad_min_forget"] > rep["info"]["plus"]["n_forget_grown"]
    # It healed, if only a smoke run. Measured (`potion demo --smoke --out D`, then xlf_ptn at B = 16):
    # asr 0.812 → 0.145, poison healed 27.5 → 84.7, clean accuracy 0.9806 → 0.9806.
    assert rep["after"]["asr"] < rep["before"]["asr"] / 2, rep["after"]
    assert "damage guard" in printed and rep["info"]["guard"]["reason"]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("potion-demo")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # opens in the model-training view
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(rep["trace"])  # one child per evaluated PTN step
    assert sorted(r.info.run_name for r in children) == [child_run_name(t["k"], t["k"] == rep["k_star"])
                                                         for t in rep["trace"]]
    assert all(set(r.data.metrics) <= set(child_fields()) for r in children)  # no Tune bookkeeping

    # the parent's numbers are the kept model's: k*'s step, and before/after healing
    chosen = next(t for t in rep["trace"] if t["k"] == rep["k_star"])
    m = parent.data.metrics
    assert m["k_star"] == rep["k_star"] and m["acc_forget"] == chosen["acc_forget"] and m["s"] == chosen["s"]
    want = before_after_metrics(rep)
    assert set(want) >= {f"{p}_{k}" for p in ("before", "after")
                         for k in ("clean_acc", "ra", "asr", "poison_healed", "model_damage")}
    for key, value in want.items():
        assert m[key] == pytest.approx(value), key

    # the healed model is an MLflow model that loads back and scores as the checkpoint does
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == parent.info.run_id
    (tmp_path / "dl").mkdir()
    with _use_tracking_uri(uri):
        logged = mlflow.pytorch.load_model(f"models:/{models[0].model_id}", dst_path=str(tmp_path / "dl"))
    ckpt, _ = load_checkpoint(out / "heal" / "model.pt")
    from potion.runs.folder import load_run

    clean, triggered = load_run(out / "train").test_views(seed=0)
    for view in (clean, triggered):
        correct = {}
        for name, model in (("mlflow", logged), ("checkpoint", ckpt)):
            model.eval()
            with torch.no_grad():
                correct[name] = sum(int((model(x).argmax(1) == y).sum()) for x, y in view.batches(512))
        assert correct["mlflow"] == correct["checkpoint"]
    assert correct["checkpoint"] / len(clean) == pytest.approx(rep["after"]["ra"])
