"""MLflow tracking: parent + child runs, the trade-off curve, artifacts, failing fast."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from potion.errors import PotionError
from potion.models import create_model, load_checkpoint, save_checkpoint
from potion.tracking.plots import DAMAGE_AXIS_LABEL, curve_fields, tradeoff_figure
from potion.tracking.steps import child_run_name, step_fields
from potion.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    check_tracking,
    default_artifact_root,
    default_tracking_uri,
    ui_command,
)
from potion.tracking.tracker import CHOSEN_TAG, PLOT_FILE, SearchTracker, flatten_params
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
        assert tr.log_children(trace[::-1], k_star=3) == 5  # created in k order whatever the trace's order
        assert tr.log_children(trace, k_star=3) == 0  # nothing logged twice
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
    assert [r.info.run_name for r in children] == ["k=000", "k=001", "k=002", "k=003 ✓ chosen", "k=004"]
    assert [r.data.tags[CHOSEN_TAG] for r in children] == ["false", "false", "false", "true", "false"]
    starts = [r.info.start_time for r in children]
    assert starts == sorted(starts) and len(set(starts)) == 5  # created in k order, no ties
    exp = _client(uri).get_experiment_by_name("exp-local")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI's model-training view
    for r, step in zip(children, trace):
        assert r.info.status == "FINISHED"
        assert r.data.metrics["acc_forget"] == step.acc_forget
        assert r.data.metrics["alpha"] == step.alpha and r.data.metrics["s"] == step.s
        assert r.data.metrics["n_selected"] == step.n_selected and r.data.metrics["acc_val"] == step.acc_val

    c = _client(uri)
    # no parent metric reads as the kept model's value unless it is: the curve lives in the
    # children and the plot, the parent holds k*'s step once (log_curve ran twice)
    assert not [key for key in p.data.metrics if "/" in key and not key.startswith("system/")]
    for key in ("s", "alpha", "n_selected", "acc_val", "acc_forget"):
        assert [(m.step, m.value) for m in c.get_metric_history(parent, key)] == [(0, getattr(chosen, key))]

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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads open descriptors from /proc")
def test_a_finished_tracker_leaves_no_connection_to_its_store(store):
    uri, root = store
    db = str((root / "mlflow.db").resolve())

    def open_on_db() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == db for fd in os.listdir("/proc/self/fd"))

    with SearchTracker(uri, "exp-fds", run_name="r", params={"a": 1}) as tr:
        tr.log_children(_trace())
        assert open_on_db() > 0  # the check below can see a connection
    # MLflow would keep its pool open for the life of the process: one per run folder healed
    assert open_on_db() == 0


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


def _legend(fig) -> list[str]:
    return [t.get_text() for a in fig.axes if a.get_legend() for t in a.get_legend().get_texts()]


def test_tradeoff_plot_states_the_decision_with_plain_labels():
    steps = [dict(s.to_dict(), acc_test=0.9 - 0.05 * s.k) for s in _trace()]  # a field added later
    fig = tradeoff_figure(steps, threshold=0.18, k_star=3)
    ax = fig.axes[0]
    assert ax.get_title().startswith("Kept step k = 3 (α = 2.5): the first step below the stop line")
    labels = _legend(fig)
    assert "stop line ρ·acc0 = 0.180" in labels and "accuracy on the deletion set" in labels
    assert "acc_test" in labels and len(labels) <= 6
    assert [t.get_text() for t in ax.texts] == ["kept k = 3"]  # the vertical line, labelled on the plot
    assert ax.get_xlabel().startswith("search step k")
    assert curve_fields(steps) == ["acc_forget", "acc_val", "acc_test"]
    assert curve_fields([s.to_dict() for s in _trace(with_val=False)]) == ["acc_forget"]
    assert tradeoff_figure(steps, 0.18).axes[0].get_title().startswith("No step kept")


def test_tradeoff_plot_draws_the_guard_in_points_on_its_own_axis():
    steps = [dict(s.to_dict(), acc_proxy=0.9 if s.k in (2, 4) else None) for s in _trace()]
    damage = {"2": -0.4, "4": -1.7}
    for d in steps:
        d["proxy_damage"] = damage.get(str(d["k"]))
    guard = {"status": "partial", "k_paper": 4, "max_damage": 1.0, "damage": damage, "proxy0": {"acc": 0.95}}
    fig = tradeoff_figure(steps, threshold=0.18, k_star=2, guard=guard)
    top, dmg = fig.axes
    assert dmg.get_ylabel() == DAMAGE_AXIS_LABEL and "points" in DAMAGE_AXIS_LABEL
    lines = {line.get_label(): line for line in dmg.get_lines()}
    # the damage in points, not squashed near an accuracy of 1: -1.7 sits inside the axis
    assert list(lines["proxy damage where measured"].get_ydata()) == [-0.4, -1.7]
    assert dmg.get_ylim()[0] < -1.7 and list(lines["allowed damage δ = 1 point"].get_ydata()) == [-1.0, -1.0]
    assert not [line for line in top.get_lines() if "proxy" in line.get_label()]  # no proxy on the accuracy axis
    assert len(_legend(fig)) <= 6
    assert top.get_title() == ("Kept step k = 2 (α = 3.33):\na partial heal: k = 4 would break δ = 1 point; "
                               "proxy damage -0.40 points")
    assert sorted(t.get_text() for t in top.texts) == ["first crossing k = 4", "kept k = 2"]


def test_printed_mlflow_command_names_an_executable_that_exists(tmp_path):
    import os
    import shlex

    import socket

    command, url = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", "1", "abc")
    exe, *args = shlex.split(command)
    assert os.path.isabs(exe) and os.path.isfile(exe) and os.access(exe, os.X_OK), command
    port = int(args[args.index("--port") + 1])
    assert url == f"http://127.0.0.1:{port}/#/experiments/1/runs/abc?workflowType=machine_learning"
    with socket.socket() as s:  # a port nothing listens on: the printed command can serve there
        s.bind(("127.0.0.1", port))
    assert ui_command("sqlite:///x.db", port=5123)[1].startswith("http://127.0.0.1:5123/")
    # what `potion heal` prints: the command for a sqlite store, the run's link on a server
    from potion.tracking.store import where_to_look

    assert where_to_look("http://h:5000/", "1", "abc") == \
        "MLflow run: http://h:5000/#/experiments/1/runs/abc?workflowType=machine_learning\n"
    assert " ui --backend-store-uri sqlite:///x.db --port " in where_to_look("sqlite:///x.db")
    assert where_to_look(None) is None and where_to_look("databricks") is None


def _report(status="partial"):
    """A heal's report.json, reduced to what the description reads."""
    guard = {"status": status, "k_paper": 4, "max_damage": 1.0, "damage": {"2": -0.4, "4": -1.7},
             "proxy0": {"acc": 0.95, "n": 500, "n_excluded": 3},
             "reason": "the paper's k*=4 breaks δ=1 (proxy damage -1.70); best step within δ: k=2"}
    return {"method": "xlf_ptn_guard", "backend": "local", "k_star": 2, "alpha": 3.3333,
            "deletion_set": {"size": 36}, "proxy": {"size": 500},
            "before": {"clean_acc": 0.9861, "ra": 0.1278, "asr": 0.9691},
            "after": {"clean_acc": 0.9850, "ra": 0.6972, "asr": 0.3272, "poison_healed": 70.78, "model_damage": -0.11},
            "before_poison_healed": 12.96, "info": {"guard": guard}}


def test_run_description_tells_what_was_chosen_why_what_it_healed_and_cost(store):
    from potion.heal.report import run_description

    uri, _ = store
    text = run_description(_report())
    assert "Kept step **k\\* = 2**, dampening strength **α = 3.3333**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows == ["| | clean accuracy | ASR | poison healed | damage |",
                    "| none (θ0) | 98.6 % | 96.9 % | 13.0 % | +0.00 |",
                    "| xlf_ptn_guard | 98.5 % | 32.7 % | 70.8 % | -0.11 |"]
    for phrase in ("*clean accuracy*: clean test images", "*ASR*: triggered test images", "*poison healed*: ",
                   "*damage*: change in clean accuracy, in percentage points"):
        assert phrase in text, phrase
    assert ("**Damage guard:** the search's step k=4 would cost more than the allowed 1 points on 500 held-out "
            "clean training images (the proxy); k=2 costs 0.40 points, so the model is only partly healed") in text
    with SearchTracker(uri, "exp-note", run_name="r", system_metrics=False) as tr:
        tr.set_description(text)
        parent = tr.parent_run_id
    assert _client(uri).get_run(parent).data.tags["mlflow.note.content"] == text


def test_the_run_records_source_user_system_metrics_and_dataset_inputs(store):
    import getpass

    from potion.tracking.context import DataInput

    uri, _ = store
    data = DataInput(name="digits", digest="ab" * 32, context="training", rows=1437, source={"dataset": "digits"})
    deletion = DataInput(name="deletion set", digest="cd" * 32, context="deletion", rows=36, source={"of": "digits"})
    with SearchTracker(uri, "exp-context", run_name="r", source="potion heal") as tr:
        tr.log_inputs([data, deletion])
        tr.log_inputs([data])  # once only
        parent = tr.parent_run_id
    run = _client(uri).get_run(parent)
    assert run.data.tags["mlflow.source.name"] == "potion heal" and run.data.tags["mlflow.user"] == getpass.getuser()
    # a run shorter than the sampling interval still gets its sample, taken when it ends
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value, d.dataset.profile)
              for d in run.inputs.dataset_inputs}
    assert inputs == {("digits", "ab" * 8, "training", '{"num_rows": 1437}'),
                      ("deletion set", "cd" * 8, "deletion", '{"num_rows": 36}')}


def test_children_carry_the_guards_damage_where_it_was_measured(store):
    uri, _ = store
    trace = [dict(s.to_dict(), acc_proxy=0.9 if s.k == 2 else None) for s in _trace()]
    guard = {"damage": {"2": -0.4}, "max_damage": 1.0, "proxy0": {"acc": 0.95}, "reason": "r", "probes": [2]}
    with SearchTracker(uri, "exp-guard-children", run_name="r", system_metrics=False) as tr:
        tr.log_children(trace, k_star=2, guard=guard)
        tr.log_curve(trace, threshold=0.18, k_star=2, guard=guard)
        parent = tr.parent_run_id
    runs = {r.info.run_name: r for r in _runs(uri, "exp-guard-children")}
    p = runs.pop("r")
    assert runs["k=002 ✓ chosen"].data.metrics["proxy_damage"] == -0.4
    assert runs["k=002 ✓ chosen"].data.metrics["acc_proxy"] == 0.9
    assert all("proxy_damage" not in r.data.metrics for name, r in runs.items() if not name.startswith("k=002"))
    assert set(runs["k=001"].data.metrics) == {"k", "s", "alpha", "lam", "n_selected", "acc_forget", "acc_val"}
    assert p.data.metrics["proxy_damage"] == -0.4 and p.data.metrics["k_star"] == 2  # the kept step's own
    assert set(step_fields()) < set(runs["k=002 ✓ chosen"].data.metrics) | {"acc_proxy_target", "acc_proxy_other"}


@pytest.mark.slow
@pytest.mark.parametrize("method", [None, "xlf_ptn_guard"])
def test_a_heal_run_page_tells_the_story_and_links_the_trained_model(method, tmp_path, capsys):
    """`potion train` and `potion heal` into one store: what the run page reads from it, for the
    default (potion_plus, whose NegGrad+ step is kept on this run) and for the guard's dampening."""
    import json

    from potion.cli import main
    from potion.tracking.steps import update_run_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, out = tmp_path / "run", tmp_path / "healed"
    assert main(["train", "--dataset", "digits", "--poison-share", "0.05", "--iterations", "120", "--quiet",
                 "--tracking-uri", uri, "--out", str(run)]) == 0
    assert main(["heal", "--run", str(run), "--discovery-share", "0.5", "--val-size", "100", "--cache-dir", "none",
                 "--tracking-uri", uri, "--quiet", "--out", str(out), *(["--method", method] if method else [])]) == 0
    rep = json.loads((out / "report.json").read_text())
    c = _client(uri)
    trained = json.loads((run / "mlflow_run.json").read_text())
    train_run = c.get_run(trained["run_id"])
    # in-process main() leaves sys.argv alone, so Source is the command's name (from a shell: the whole line)
    assert train_run.data.tags["mlflow.source.name"] == "potion train"
    assert train_run.data.metrics["clean_acc"] == json.loads((run / "metrics.json").read_text())["clean_acc"]
    assert c.get_logged_model(trained["model_id"]).source_run_id == trained["run_id"]

    parent = c.get_run(rep["mlflow"]["parent_run_id"])
    tags, m = parent.data.tags, parent.data.metrics
    note = tags["mlflow.note.content"]
    assert "| none (θ0) |" in note
    assert not [k for k in m if "/" in k and not k.startswith("system/")]  # no curve on the parent
    # the run page lists the model metrics in the order they were first logged: the headline first
    order = [x.key for x in parent.data._metric_objs if not x.key.startswith("system/")]
    assert order[:2] == ["after_poison_healed", "after_model_damage"], order
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    chosen_runs = [r for r in children if r.data.tags.get("potion.chosen") == "true"]
    by_start = sorted(children, key=lambda r: r.info.start_time)
    if method is None:
        # the description says what potion_plus did; one child per NegGrad+ check, in update order
        assert rep["method"] == "potion_plus" and rep["info"]["step"] == "neggrad"
        ng = rep["info"]["plus"]["neggrad"]
        kept = next(x for x in ng["checks"] if x["step"] == ng["picked"])
        assert f"**potion_plus:**" in note and f"kept at update {ng['picked']} of" in note
        assert m["neggrad_update"] == ng["picked"] and m["acc_held_out"] == kept["acc_held_out"]
        assert m["proxy_damage"] == kept["damage"] and kept["acc_held_out"] <= m["neggrad_threshold"]
        assert kept["damage"] - kept.get("erosion", 0.0) >= -m["max_damage"]
        assert [r.info.run_name for r in by_start] == [update_run_name(x["step"], x["step"] == ng["picked"])
                                                       for x in ng["checks"]]
        assert [r.info.run_name for r in chosen_runs] == [update_run_name(ng["picked"], True)]
        assert [r.data.metrics["acc_held_out"] for r in by_start] == [x["acc_held_out"] for x in ng["checks"]]
        assert "plots/neggrad.png" in [a.path for a in c.list_artifacts(parent.info.run_id, "plots")]
    else:
        # the description states the table, k*, α and the guard's reason in plain words
        assert f"k\\* = {rep['k_star']}**" in note and "**Damage guard:**" in note
        # every plain-name step value on the parent is the kept step's
        chosen = next(t for t in rep["trace"] if t["k"] == rep["k_star"])
        for key, value in chosen.items():
            if value is not None:
                assert m[key if key != "k" else "k_star"] == value, key
        # the chosen child is tagged and named so, and children were created in k order
        assert [r.info.run_name for r in chosen_runs] == [f"k={rep['k_star']:03d} ✓ chosen"]
        assert [int(r.data.params["k"]) for r in by_start] == sorted(t["k"] for t in rep["trace"])
        damage = rep["info"]["guard"]["damage"]
        assert {r.data.params["k"]: r.data.metrics["proxy_damage"] for r in children
                if "proxy_damage" in r.data.metrics} == damage
    # 8: system metrics, the two dataset inputs with digests, the healed model's source, Source and Created-by
    assert any(k.startswith("system/cpu") for k in m)
    inputs = {d.tags[0].value: d.dataset for d in parent.inputs.dataset_inputs}
    assert inputs["training"].name == "digits" and inputs["training"].digest == \
        rep["provenance"]["data"]["manifest_sha256"][:16]
    assert inputs["deletion"].name == "deletion set" and json.loads(inputs["deletion"].profile) == \
        {"num_rows": rep["deletion_set"]["size"]}
    assert [i.model_id for i in parent.inputs.model_inputs] == [trained["model_id"]]
    assert tags["potion.trained_run_id"] == trained["run_id"]
    assert tags["mlflow.source.name"] == "potion heal" and tags["mlflow.user"]


def test_source_is_the_whole_command_when_potion_runs_it(monkeypatch):
    from potion.tracking.context import command_line

    monkeypatch.setattr("sys.argv", ["/venv/bin/potion", "heal", "--run", "r", "--out", "o"])
    assert command_line("potion heal") == "potion heal --run r --out o"
    assert command_line("potion train") == "potion train"  # another command runs: just the name
    monkeypatch.setattr("sys.argv", ["pytest", "-x"])
    assert command_line("potion heal") == "potion heal"
