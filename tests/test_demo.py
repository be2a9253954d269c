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
    # It healed, if only a smoke run. Measured (`potion demo --smoke --out D`): asr 0.812 → 0.145,
    # poison healed 27.5 → 84.7, clean accuracy 0.9806 → 0.9806.
    assert rep["after"]["asr"] < rep["before"]["asr"] / 2, rep["after"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("potion-demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert len(runs) - 1 == len(rep["trace"])  # one child per evaluated PTN step
