"""MLflow tracking: parent + child runs, the trade-off curve, artifacts, failing fast."""
from __future__ import annotations

import socket
import time

import pytest
import torch

from potion.errors import PotionError
from potion.models import create_model, load_checkpoint, save_checkpoint
from potion.tracking.plots import curve_fields, tradeoff_figure
from potion.tracking.steps import child_run_name
from potion.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    check_tracking,
    default_artifact_root,
    default_tracking_uri,
    ui_command,
)
from potion.tracking.tracker import CURVE_PREFIX, PLOT_FILE, SearchTracker, flatten_params
from potion.unlearning.ptn import StepResult


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating one runs MLflow's migrations (seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root


def _trace(with_val=True):
    accs = [0.9, 0.8, 0.85, 0.3, 0.1]
    return [
        StepResult(k=k, s=0.001 * 1.5**k, alpha=10.0 / (k + 1), lam=1.0, n_selected=10 * (k + 1),
                   acc_forget=a, acc_val=(0.95 - 0.01 * k) if with_val else None)
        for k, a in enumerate(accs)
    ]


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, experiment):
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_uri_is_explicit_sqlite_beside_mlruns(tmp_path):
    uri = default_tracking_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert default_artifact_root(uri) == (tmp_path / "out" / "mlruns").resolve()
    assert default_artifact_root("http://host:5000") is None


def test_flatten_params_nests_and_truncates():
    flat = flatten_params({"ptn": {"rho": 0.2, "step": 1.1}, "method": "xlf_ptn", "long": "x" * 7000})
    assert flat["ptn.rho"] == "0.2" and flat["ptn.step"] == "1.1" and flat["method"] == "xlf_ptn"
    assert len(flat["long"]) == 6000


def test_check_tracking_fails_fast_on_a_stopped_server():
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(PotionError, match="does not answer.*mlflow server"):
        check_tracking(uri, timeout=2.0)
    assert time.perf_counter() - t0 < 5


def test_check_tracking_refuses_a_file_that_is_not_sqlite(tmp_path):
    bad = tmp_path / "mlflow.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PotionError, match="not a usable sqlite database"):
        check_tracking(f"sqlite:///{bad}")
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a new file in a new folder is fine
    assert (tmp_path / "new").is_dir()


def test_parent_children_curve_and_artifacts(store, tmp_path):
    uri, root = store
    trace = _trace()
    model = create_model("small_cnn", num_classes=3, in_channels=1, image_size=8, width=4).eval()
    ckpt = save_checkpoint(tmp_path / "model.pt", model, "small_cnn",
                           dict(num_classes=3, in_channels=1, image_size=8, width=4))
    report = tmp_path / "report.json"
    report.write_text('{"k_star": 3}\n')
    with SearchTracker(uri, "exp-local", run_name="xlf_ptn:test",
                       params={"heal": {"ptn": {"rho": 0.2}}, "method": "xlf_ptn"},
                       artifact_root=root / "mlruns") as tr:
        assert tr.log_children(trace) == 5
        assert tr.log_children(trace) == 0  # nothing logged twice
        tr.log_curve(trace, threshold=0.18, k_star=3)
        tr.log_curve(trace, threshold=0.18, k_star=3)
        tr.log_metrics({"after_ra": 0.9, "after_clean_acc": 0.8, "note": "text is skipped"})
        tr.log_model(ckpt)
        tr.log_model(ckpt)
        tr.log_files([report])
        parent = tr.parent_run_id

    runs = _runs(uri, "exp-local")
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 6
    p = by_id.pop(parent)
    assert p.info.status == "FINISHED"
    assert p.data.params["heal.ptn.rho"] == "0.2" and p.data.params["method"] == "xlf_ptn"
    assert p.data.metrics["after_ra"] == 0.9 and "note" not in p.data.metrics
    # the parent's plain metrics are the chosen step's (k* = 3), not the last step tried
    chosen = trace[3]
    assert p.data.metrics["k_star"] == 3 and p.data.metrics["threshold"] == 0.18
    for key in ("s", "alpha", "lam", "n_selected", "acc_forget", "acc_val"):
        assert p.data.metrics[key] == getattr(chosen, key), key
    children = sorted(by_id.values(), key=lambda r: int(r.data.params["k"]))
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent] * 5
    assert [r.info.run_name for r in children] == ["k=000", "k=001", "k=002", "k=003", "k=004"]
    exp = _client(uri).get_experiment_by_name("exp-local")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI's model-training view
    for r, step in zip(children, trace):
        assert r.info.status == "FINISHED"
        assert r.data.metrics["acc_forget"] == step.acc_forget
        assert r.data.metrics["alpha"] == step.alpha and r.data.metrics["s"] == step.s
        assert r.data.metrics["n_selected"] == step.n_selected and r.data.metrics["acc_val"] == step.acc_val

    c = _client(uri)
    # the curve: one point per k (not two: log_curve was called twice), stepped by k
    hist = c.get_metric_history(parent, CURVE_PREFIX + "acc_forget")
    assert sorted((m.step, m.value) for m in hist) == [(s.k, s.acc_forget) for s in trace]
    for key in ("s", "alpha", "n_selected", "acc_val"):
        assert len(c.get_metric_history(parent, CURVE_PREFIX + key)) == 5
        assert len(c.get_metric_history(parent, key)) == 1  # the chosen step only

    arts = {f.path for f in c.list_artifacts(parent, "model")} | {f.path for f in c.list_artifacts(parent, "outputs")}
    assert arts == {"model/model.pt", "outputs/report.json"}
    assert [f.path for f in c.list_artifacts(parent, "plots")] == [PLOT_FILE]
    assert str(root / "mlruns") in c.get_experiment_by_name("exp-local").artifact_location

    # the logged checkpoint downloads, loads with potion and scores the same
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="model/model.pt",
                                                dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    png = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path=PLOT_FILE,
                                              dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    back, meta = load_checkpoint(local)
    assert meta.name == "small_cnn"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    with torch.no_grad():
        acc_a = (model(x).argmax(1) == y).float().mean().item()
        acc_b = (back(x).argmax(1) == y).float().mean().item()
        assert torch.equal(model(x), back(x))
    assert acc_a == acc_b


def test_val_accuracy_absent_and_failed_parent(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"):
        with SearchTracker(uri, "exp-fail", run_name="r", params={}) as tr:
            tr.log_children(_trace(with_val=False))
            tr.log_curve(_trace(with_val=False))
            parent = tr.parent_run_id
            raise RuntimeError("boom")
    runs = {r.info.run_id: r for r in _runs(uri, "exp-fail")}
    assert runs[parent].info.status == "FAILED"
    assert "boom" in runs[parent].data.tags["error"]
    assert "acc_val" not in runs[parent].data.metrics
    assert all("acc_val" not in r.data.metrics for i, r in runs.items() if i != parent)


def test_tune_callback_replaces_local_children(store):
    uri, _ = store
    with SearchTracker(uri, "exp-cb", run_name="r", params={}) as tr:
        cb = tr.tune_callback()
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        assert isinstance(cb, MLflowLoggerCallback)
        assert cb.tracking_uri == uri and cb.experiment_name == "exp-cb"
        assert cb.tags["mlflow.parentRunId"] == tr.parent_run_id
        assert tr.log_children(_trace()) == 0  # the callback owns the children
    assert len(_runs(uri, "exp-cb")) == 1


def test_missing_artifact_is_an_error(store, tmp_path):
    uri, _ = store
    with SearchTracker(uri, "exp-missing", run_name="r") as tr:
        with pytest.raises(PotionError, match="does not exist"):
            tr.log_files([tmp_path / "nope.json"])
    assert _runs(uri, "exp-missing")[0].info.status == "FINISHED"


def test_healed_model_is_an_mlflow_model_that_loads_and_scores_the_same(store, tmp_path):
    import mlflow.pytorch

    uri, _ = store
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, in_channels=1, image_size=8, width=4).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    with SearchTracker(uri, "exp-model", run_name="r") as tr:
        model_id = tr.log_pytorch_model(model, x[:4], registered_name="potion-test-healed")
        tr.log_metrics({"after_clean_acc": 0.5}, model_id=model_id)
        parent = tr.parent_run_id
    c = _client(uri)
    logged = c.get_logged_model(model_id)
    assert logged.source_run_id == parent and logged.name == "healed_model"
    assert [m.key for m in logged.metrics] == ["after_clean_acc"]  # shown in the "Logged models" table
    assert c.get_registered_model("potion-test-healed").name == "potion-test-healed"
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    (tmp_path / "dl").mkdir()
    with _use_tracking_uri(uri):
        back = mlflow.pytorch.load_model(f"models:/{model_id}", dst_path=str(tmp_path / "dl"))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
        assert (model(x).argmax(1) == y).sum() == (back(x).argmax(1) == y).sum()


def test_tune_children_are_named_by_k_and_carry_only_step_fields(store):
    uri, _ = store

    class Trial:  # what the callback reads of a Tune trial
        config = {"k": 7}
        local_path = None

        def __str__(self):
            return "ptn_trial_299a61f0"

    step = _trace()[2].to_dict()
    result = {**step, "timestamp": 1.7e9, "done": False, "pid": 1234, "time_this_iter_s": 0.01,
              "training_iteration": 1, "config": {"k": 7}, "hostname": "box", "trial_id": "299a61f0"}
    with SearchTracker(uri, "exp-tune", run_name="r") as tr:
        cb = tr.tune_callback()
        cb.setup()
        trial = Trial()
        cb.log_trial_start(trial)
        cb.log_trial_result(1, trial, result)
        cb.log_trial_end(trial)
        parent = tr.parent_run_id
    child = [r for r in _runs(uri, "exp-tune") if r.info.run_id != parent][0]
    assert child.info.run_name == "k=007" == child_run_name(7)
    assert set(child.data.metrics) == {k for k, v in step.items() if v is not None}
    assert child.data.metrics["acc_forget"] == step["acc_forget"] and child.data.params["k"] == "7"


def test_tradeoff_plot_is_titled_marks_k_star_and_threshold_and_names_s_honestly():
    steps = [dict(s.to_dict(), acc_proxy=0.9 - 0.05 * s.k) for s in _trace()]  # a field added later
    fig = tradeoff_figure(steps, threshold=0.18, k_star=3)
    ax = fig.axes[0]
    assert "k* = 3" in ax.get_title()
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(lbl.startswith("threshold") for lbl in labels) and any(lbl.startswith("k* = 3") for lbl in labels)
    assert "share" not in ax.get_xlabel() and "s_k" in ax.get_xlabel()
    assert curve_fields(steps) == ["acc_forget", "acc_val", "acc_proxy"]
    assert curve_fields([s.to_dict() for s in _trace(with_val=False)]) == ["acc_forget"]


def test_printed_mlflow_command_names_an_executable_that_exists(tmp_path):
    import os
    import shlex

    command, url = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", "1", "abc")
    exe = shlex.split(command)[0]
    assert os.path.isabs(exe) and os.path.isfile(exe) and os.access(exe, os.X_OK), command
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
