"""The MLflow UI in a real browser (headless Chromium): what a newcomer sees after a heal.

Skipped, with the reason, where no Chromium is installed (Debian: apt-get install chromium).
The store is written by the same tracker calls a heal makes, on a tiny model, so the test
costs the UI and the browser, not a training run.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mlflow_screenshot", REPO / "benchmarks" / "mlflow_screenshot.py")
shot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shot)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shot.find_browser() is None,
                       reason="no Chromium/Chrome on PATH (Debian: apt-get install chromium)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops its mlflow ui by process group"),
]


def test_parent_run_shows_curve_metrics_children_and_logged_model(tmp_path):
    from potion.models import create_model
    from potion.tracking.tracker import SearchTracker
    from potion.unlearning.ptn import StepResult

    trace = [StepResult(k=k, s=0.001 * 1.5**k, alpha=10.0 / (k + 1), lam=1.0, n_selected=10 * (k + 1),
                        acc_forget=a, acc_val=0.95 - 0.01 * k)
             for k, a in enumerate([0.9, 0.8, 0.85, 0.3, 0.1])]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = create_model("small_cnn", num_classes=3, in_channels=1, image_size=8, width=4).eval()
    with SearchTracker(uri, "potion-browser", run_name="xlf_ptn:heal", params={"method": "xlf_ptn"}) as tr:
        tr.log_children(trace)
        tr.log_curve(trace, threshold=0.18, k_star=3)
        model_id = tr.log_pytorch_model(model, torch.randn(2, 1, 8, 8))
        tr.log_metrics({"before_clean_acc": 0.95, "after_clean_acc": 0.93, "before_poison_healed": 20.0,
                        "after_poison_healed": 90.0}, model_id=model_id)
        ids = {"tracking_uri": uri, "experiment_id": tr.experiment_id, "parent_run_id": tr.parent_run_id}
    (tmp_path / "report.json").write_text(json.dumps({"mlflow": ids}))

    checks = shot.check_pages(tmp_path, tmp_path / "shots", shot.find_browser(), screenshots=False)
    failed = [what for what, ok in checks if not ok]
    assert not failed, failed
