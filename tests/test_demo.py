"""The README's main job, in its CPU smoke mode, on the backend `make demo` uses (Ray)."""
from __future__ import annotations

import json

import mlflow
import pytest

from potion.cli import main


@pytest.mark.slow
@pytest.mark.ray
def test_demo_smoke_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--smoke", "--quiet"]) == 0  # no --backend: what `make demo` runs
    printed = capsys.readouterr().out
    assert "poison_healed" in printed and "mlflow ui --backend-store-uri" in printed
    rep = json.loads((out / "heal" / "report.json").read_text())
    assert rep["backend"] == "ray" and rep["k_star"] is not None
    assert rep["after"]["asr"] < rep["before"]["asr"] / 2, rep["after"]  # it healed, if only a smoke run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("potion-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert len(runs) - 1 == len(rep["trace"])  # one child per evaluated PTN step
