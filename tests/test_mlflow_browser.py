"""The MLflow UI in a real browser (headless Chromium): what a newcomer sees after a heal.

Chromium is installed with apt-get when it is missing (Debian, as root); only a machine
with neither Chromium nor apt-get skips, with the reason. The store is written by the same
tracker calls a heal makes, on a tiny model, so the test costs the UI and the browser, not
a training run.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
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
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops its mlflow ui by process group"),
]


@pytest.fixture(scope="module")
def browser():
    if shot.find_browser() is None and shutil.which("apt-get") is None:
        pytest.skip("no Chromium/Chrome on PATH and no apt-get to install it")
    path = shot.install_browser()
    assert path is not None, "Chromium is missing and `apt-get install chromium` did not install it (needs root)"
    return path


def test_parent_run_tells_the_story_children_plot_and_logged_model(tmp_path, browser):
    from potion.heal.report import run_description
    from potion.models import create_model
    from potion.tracking.context import DataInput
    from potion.tracking.tracker import SearchTracker
    from potion.unlearning.ptn import StepResult

    trace = [StepResult(k=k, s=0.001 * 1.5**k, alpha=10.0 / (k + 1), lam=1.0, n_selected=10 * (k + 1),
                        acc_forget=a, acc_val=0.95 - 0.01 * k)
             for k, a in enumerate([0.9, 0.8, 0.85, 0.3, 0.1])]
    report = {"method": "xlf_ptn", "backend": "local", "k_star": 3, "alpha": 2.5, "deletion_set": {"size": 36},
              "before": {"clean_acc": 0.95, "ra": 0.19, "asr": 0.8},
              "after": {"clean_acc": 0.93, "ra": 0.84, "asr": 0.1, "poison_healed": 90.0, "model_damage": -2.0},
              "before_poison_healed": 20.0, "info": {}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = create_model("small_cnn", num_classes=3, in_channels=1, image_size=8, width=4).eval()
    with SearchTracker(uri, "potion-browser", run_name="xlf_ptn:heal", params={"method": "xlf_ptn"},
                       source="potion heal") as tr:
        tr.log_children(trace, k_star=3)
        tr.log_curve(trace, threshold=0.18, k_star=3)
        model_id = tr.log_pytorch_model(model, torch.randn(2, 1, 8, 8))
        tr.log_metrics({"before_clean_acc": 0.95, "after_clean_acc": 0.93, "before_poison_healed": 20.0,
                        "after_poison_healed": 90.0}, model_id=model_id)
        tr.set_description(run_description(report))
        tr.log_inputs([DataInput("digits", "ab" * 8, "training", 1437, {"dataset": "digits"}),
                       DataInput("deletion set", "cd" * 8, "deletion", 36, {"of": "digits"})])
        ids = {"tracking_uri": uri, "experiment_id": tr.experiment_id, "parent_run_id": tr.parent_run_id}
    (tmp_path / "report.json").write_text(json.dumps({"mlflow": ids}))

    checks = shot.check_pages(tmp_path, tmp_path / "shots", browser, screenshots=False)
    failed = [what for what, ok in checks if not ok]
    assert not failed, failed
