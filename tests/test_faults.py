"""Faults a heal must survive or end cleanly: dead Ray workers, Ctrl-C / SIGTERM, lost nodes.

Workers are killed for real (SIGKILL of their own process, from inside the trial or the
shard, at a chosen point) so the failure Ray sees is the one a crash or the OOM killer
causes. Signals go to a `potion heal` subprocess from inside its own Ray workers, at the
moment the phase under test is running. Every Ray process a test starts carries a unique
environment marker, so "no Ray process left" is checked on exactly those processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from potion.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds its processes through /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (all Ray processes a driver starts inherit it)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes():
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def run_dir(small_digits_run) -> Path:
    return small_digits_run


# ---------------------------------------------------------------- Ctrl-C / SIGTERM of a Ray heal
# The driver replaces the Ray task or trial body with a wrapper (defined in __main__, so Ray
# ships it by value) that signals the driver while the phase is under way.
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from potion.cli import main
    PHASE, SIG, DRIVER_PID = sys.argv[1], int(sys.argv[2]), os.getpid()
    if PHASE == "importances":
        import potion.distributed.importances as mod
        inner = mod._shard_sums
        def _shard_sums(*a, **k):
            os.kill(DRIVER_PID, SIG)
            time.sleep(30)  # the driver must not wait for this shard
            return inner(*a, **k)
        mod._shard_sums = _shard_sums
    else:
        import potion.distributed.search as mod
        inner = mod.ptn_trial
        def ptn_trial(config, payload):
            if config["k"] == 2:
                os.kill(DRIVER_PID, SIG)
                time.sleep(30)
            return inner(config, payload)
        mod.ptn_trial = ptn_trial
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("phase,sig", [("importances", signal.SIGINT), ("importances", signal.SIGTERM),
                                       ("search", signal.SIGINT), ("search", signal.SIGTERM)])
def test_a_signal_during_a_ray_heal_leaves_nothing(run_dir, tmp_path, phase, sig):
    marker = f"POTION_FAULT_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "healed"
    cmd = [sys.executable, "-c", DRIVER, phase, str(int(sig)), "heal", "--run", str(run_dir), "--discovery-share",
           "0.3", "--backend", "ray", "--num-cpus", "2", "--step", "1.5", "--window", "2", "--cache-dir", "none",
           "--method", "xlf_ptn_guard", "--out", str(out), "--quiet"]  # a method with both phases
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 128 + int(sig), proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("potion: interrupted by") and "Traceback" not in proc.stderr
    assert "no step k" not in proc.stderr  # never a diagnosis drawn from a partial search
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock file
    deadline = time.time() + 20
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert processes_with(marker) == []


def test_sigterm_unwinds_like_ctrl_c_and_staging_is_removed(tmp_path, monkeypatch, capsys):
    """In process: SIGTERM raises through the staged block, the CLI maps it to 143."""
    import potion.jobs.train as train
    from potion.io import staged_output_dir

    def run_train(job, out, overwrite=False, progress=True):
        with staged_output_dir(out, overwrite) as stage:
            (stage / "partial").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(train, "run_train", run_train)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--out", str(tmp_path / "o"), "--quiet"]) == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock
    assert signal.getsignal(signal.SIGTERM) == before  # main gives the handler back


# ---------------------------------------------------------------- dead workers on a local Ray
@pytest.fixture(scope="module")
def ray_local():
    from ray import cloudpickle

    from potion.distributed import runtime as ray_runtime

    # Ray workers cannot import this test module: ship its helpers (KillOnce) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray_runtime.connect(None, num_cpus=2)
    yield
    ray_runtime.shutdown_if_owned()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class KillOnce:
    """A model factory whose first call in a Ray worker SIGKILLs that worker (a marker file
    makes it happen exactly once); the factory is what trials and shards call first."""

    def __init__(self, build, marker: Path):
        self.build, self.marker = build, str(marker)

    def __call__(self):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.build()
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def problem():
    from toy_backdoor import digits_resnet

    return digits_resnet(iterations=80)


def _payload_and_local(problem, marker: Path | None):
    import functools

    from potion.models import create_model
    from potion.distributed.trials import payload_from_evaluator
    from potion.unlearning.importances import compute_importances
    from potion.unlearning.evaluator import StepEvaluator
    from potion.unlearning.ptn import PTNConfig, ptn_search

    model, kwargs, view, deletion, retain = problem
    forget = list(view.subset(deletion).batches(32))
    imp_f = compute_importances(model, forget, "xlf")
    imp_r = compute_importances(model, view.subset(retain[:600]).batches(200), "xlf")
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = PTNConfig(step=1.5, max_steps=60)

    def evaluator():
        return StepEvaluator(create_model("resnet9", **kwargs), state0, imp_f, imp_r, forget, len(deletion),
                             len(view), cfg)

    local = ptn_search(evaluator(), cfg)
    build = functools.partial(create_model, "resnet9", **kwargs)
    factory = KillOnce(build, marker) if marker else build
    return payload_from_evaluator(evaluator(), cfg, model_factory=factory), evaluator, cfg, local


def test_a_killed_trial_worker_is_retried_and_the_search_finds_the_same_k(ray_local, problem, tmp_path):
    from potion.distributed.search import ray_ptn_search

    marker = tmp_path / "killed"
    payload, evaluator, cfg, local = _payload_and_local(problem, marker)
    placement: dict = {}
    got = ray_ptn_search(payload, cfg, window=2, storage_path=tmp_path / "rr", evaluator=evaluator(),
                         placement=placement)
    assert marker.is_file()  # a worker really died
    assert placement["trial_restarts"] >= 1
    assert (got.k_star, got.alpha, got.n_selected) == (local.k_star, local.alpha, local.n_selected)
    assert all(torch.equal(got.state_dict[n], local.state_dict[n]) for n in local.state_dict)


def test_a_killed_shard_worker_is_retried_and_importances_are_unchanged(ray_local, problem, tmp_path):
    import functools

    from potion.models import create_model
    from potion.distributed.importances import sharded_importances
    from potion.unlearning.importances import compute_importances

    model, kwargs, view, deletion, retain = problem
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build():
        m = create_model("resnet9", **kwargs)
        m.load_state_dict(state)
        return m

    positions = retain[:400]
    want = compute_importances(build(), view.subset(positions).batches(100), "xlf")
    marker = tmp_path / "killed"
    placement: dict = {}
    got = sharded_importances(KillOnce(build, marker), functools.partial(lambda v: v, view), positions, "xlf",
                              None, 100, 2, device="cpu", placement=placement)
    assert marker.is_file()
    assert sum(placement["importance_shards"].values()) == 2
    for n in want:
        scale = float(want[n].abs().max())
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_a_tune_run_that_stops_early_is_never_read_as_a_search(ray_local, problem, tmp_path, monkeypatch):
    """Tune ends fit() with partial results when it is told to stop (its SIGUSR1/SIGINT
    handlers, a stopper): that must end as an interruption, never as 'no crossing'.
    Simulated by ending the experiment after two steps behind the searcher's back."""
    from ray.tune.search import Searcher

    from potion.distributed import search as ray_search

    payload, evaluator, cfg, local = _payload_and_local(problem, None)
    assert local.k_star > 2

    class StoppedSearcher(ray_search.PTNSearcher):
        def suggest(self, trial_id):
            if len(self.results) >= 2:
                return Searcher.FINISHED  # Tune stops asking; the search itself is not done
            return super().suggest(trial_id)

    monkeypatch.setattr(ray_search, "PTNSearcher", StoppedSearcher)
    with pytest.raises(KeyboardInterrupt, match="stopped"):
        ray_search.ray_ptn_search(payload, cfg, window=1, storage_path=tmp_path / "rr", evaluator=evaluator())




# ---------------------------------------------------------------- staged heal output
def test_heal_output_is_staged_relocated_replaced_and_follows_the_umask(run_dir, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: OUT/mlflow.db
    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "healed"
        args = ["heal", "--run", str(run_dir), "--discovery-count", "2", "--method", "none", "--cache-dir", "none",
                "--quiet", "--out", str(out)]
        assert main(args) == 0, capsys.readouterr().err
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # no staging folder, no lock
    assert {"model.pt", "report.json", "deletion_set.parquet", "mlflow.db", "mlruns"} <= {p.name for p in out.iterdir()}
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "model.pt").stat().st_mode & 0o777) == 0o644
    assert ((out / "report.json").stat().st_mode & 0o777) == 0o644

    # The store was built in the staging folder; every location it records now lies in --out.
    report = json.loads((out / "report.json").read_text())
    assert report["mlflow"]["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["parent_run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(out.resolve().as_uri())
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith(out.resolve().as_uri())
    got = client.download_artifacts(run.info.run_id, "outputs/report.json", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == (out / "report.json").read_bytes()
    assert "staging" not in (tmp_path / "healed" / "mlflow.db").read_bytes().decode("latin-1")

    # --overwrite replaces the folder as a whole (no old MLflow store beside a new report) ...
    assert main(args[:-2] + ["--tracking-uri", "none", "--overwrite", "--out", str(out)]) == 0
    assert "mlflow.db" not in {p.name for p in out.iterdir()}
    # ... and a heal that fails leaves the previous results exactly as they were.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["heal", "--run", str(run_dir), "--discovery-count", "2", "--max-steps", "1", "--step", "1.01",
                 "--method", "xlf_ptn_guard", "--cache-dir", "none", "--tracking-uri", "none", "--quiet", "--overwrite", "--out", str(out)]) == 2
    assert "no step" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "healed"]


def test_an_interrupted_search_leaves_no_mlflow_run_running(tmp_path):
    from mlflow import MlflowClient

    from potion.tracking.tracker import SearchTracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(KeyboardInterrupt):
        with SearchTracker(uri, "e", run_name="p") as tracker:
            c = tracker.client
            child = c.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": tracker.parent_run_id})
            raise KeyboardInterrupt
    with pytest.raises(RuntimeError):
        with SearchTracker(uri, "e", run_name="q") as failed:
            raise RuntimeError("boom")
    c = MlflowClient(tracking_uri=uri)
    status = {r.info.run_id: r.info.status for r in c.search_runs([tracker.experiment_id])}
    assert status[tracker.parent_run_id] == "KILLED" and status[child.info.run_id] == "KILLED"
    assert status[failed.parent_run_id] == "FAILED"
    assert "RUNNING" not in status.values()


def test_searcher_survives_dead_trials_in_any_order():
    """Without Ray: trials die at random (once each, at most), the window search still
    returns linear's k* and measures every k below it."""
    from potion.distributed.searcher import PTNSearcher
    from searcher_driver import acc_result, drive

    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(2, 30))
        accs = list(rng.choice([0.1, 0.5, 0.9], size=n, p=[0.15, 0.35, 0.5]))
        want = next((k for k in range(n) if accs[k] <= 0.2), None)
        s = PTNSearcher(0.2, n - 1, 3, "waves" if trial % 2 else "bisect")
        died: set[int] = set()

        def die(k, rng):  # each trial's worker dies at most once
            if k not in died and rng.random() < 0.3:
                died.add(k)
                return True
            return False

        drive(s, acc_result(accs), 3, trial, die)
        assert not s.failed
        if s.bisect:
            continue  # bisect's k* equals linear's only on monotone curves (tested elsewhere)
        hit = s.crossing()
        assert (hit.k if hit else None) == want


# ---------------------------------------------------------------- what a dead writer leaves
def test_the_next_run_clears_a_dead_writers_staging_folder_and_restores_a_half_swapped_output(tmp_path, capsys):
    from potion.io import staged_output_dir

    out = tmp_path / "healed"
    stale = tmp_path / ".healed.staging-dead1"
    stale.mkdir()
    (stale / "model.pt").write_text("half")
    (tmp_path / ".healed.lock").write_text("")  # flock died with its process; the file stays
    with staged_output_dir(out) as stage:
        (stage / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]
    assert "removed .healed.staging-dead1" in capsys.readouterr().err

    # a writer that died between the swap's two renames: the previous results are put back
    old = tmp_path / ".healed.old-dead2"
    os.replace(out, old)
    (tmp_path / ".healed.staging-dead3").mkdir()
    with pytest.raises(Exception, match="already exists"):
        with staged_output_dir(out):
            pass
    assert (out / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]
    assert "restored" in capsys.readouterr().err


def test_describe_ray_failure_names_the_node():
    from potion.distributed.leftovers import describe_ray_failure

    text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\n\tpid: 712\n"
            "\tip: 10.1.2.3\nThe actor is dead because its owner has died. Owner Ip address: 10.1.2.3 "
            "Worker exit detail: Owner's node has crashed.")
    assert describe_ray_failure(RuntimeError(text)) == "RuntimeError on the Ray node 10.1.2.3: the node died"
    assert describe_ray_failure(RuntimeError("worker exited")) == "RuntimeError: its worker process died"


# ---------------------------------------------------------------- a node that dies mid-heal
NODE_DIES = textwrap.dedent("""
    import os, sys, time
    from potion.cli import main
    import potion.distributed.search as mod
    inner, FLAG = mod.ptn_trial, sys.argv[1]
    def ptn_trial(config, payload):
        if config["k"] == 2 and not os.path.exists(FLAG):
            open(FLAG, "w").write(str(os.getpid()))
            time.sleep(60)  # the test kills this node meanwhile
        return inner(config, payload)
    mod.ptn_trial = ptn_trial
    sys.exit(main(sys.argv[2:]))
""")


def _ray_children(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
@pytest.mark.ray
def test_a_heal_whose_ray_node_dies_says_so_in_one_line_leaves_nothing_and_can_be_rerun(run_dir, tmp_path):
    import psutil

    marker = f"POTION_FAULT_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    work.mkdir()
    flag, out = tmp_path / "flag", work / "healed"
    heal = ["heal", "--run", str(run_dir), "--discovery-share", "0.3", "--backend", "ray", "--num-cpus", "2",
            "--step", "1.5", "--window", "2", "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", "none",
            "--method", "xlf_ptn_guard", "--out", str(out), "--quiet"]  # its retain pass runs on the cluster
    proc = subprocess.Popen([sys.executable, "-c", NODE_DIES, str(flag), *heal], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert flag.exists(), proc.communicate()[1][-3000:]
        ray_procs = [p for p in _ray_children(proc.pid)
                     if p.name() != "python" or "leftovers" not in " ".join(p.cmdline())]
        # the node dies: its raylet and its agents (on Ray 2.60 the raylet outlives its agents,
        # and a heal on such a node hangs: new workers never start)
        node = [p for p in ray_procs if p.name() == "raylet" or "Agent" in p.name()
                or "Agent" in " ".join(p.cmdline()) or "agent" in " ".join(p.cmdline())]
        assert any(p.name() == "raylet" for p in node), [p.name() for p in ray_procs]
        for p in node:
            p.kill()
        _, err = proc.communicate(timeout=180)
    finally:  # a failure must not leave a hung heal and its Ray running
        if proc.poll() is None:
            for p in _ray_children(proc.pid):
                p.kill()
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    # "the Ray node X … died", or, when the raylet and the driver went within one poll of the
    # watchdog, "killed …, or its Ray node X … died": the node is named either way
    assert last.startswith("potion: error: this heal stopped: "), err[-3000:]
    assert re.search(r"Ray node [0-9.]+ \(node id [0-9a-f]{12}\)[^.;]* died", last), last
    assert f"nothing was written to {out}" in last and "can be resumed: rerun the same command" in last
    assert sorted(p.name for p in work.iterdir()) == []  # no staging folder, no lock
    gone, alive = psutil.wait_procs(ray_procs, timeout=20)
    assert alive == []
    # the rerun of the same command resumes: the importances come from the cache
    rerun = subprocess.run([sys.executable, "-m", "potion", *heal], env=env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "model.pt").is_file() and sorted(p.name for p in work.iterdir()) == ["healed"]


# ---------------------------------------------------------------- a benchmark killed with SIGKILL
TINY_SUITE = """
name: tiny-kill
description: one cell, for the SIGKILL test
data: {dataset: digits, args: {upscale: 2}}
model: {name: small_cnn, args: {width: 8}}
recipe: {iterations: 100, batch_size: 64, lr: 0.05}
device: cpu
poisons: [{trigger: badnet}]
n: [0.05]
shares: [one]
methods: [none]
seeds: [0]
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("watchdog", ["killed too", "alive"])
def test_a_benchmark_killed_with_sigkill_leaves_no_ray_processes_once_rerun(tmp_path, watchdog):
    """The driver dies outright while it trains. With its watchdog alive the Ray processes
    it started stop at once; when the watchdog was killed too, the rerun stops exactly them."""
    import psutil

    from potion.distributed.leftovers import RECORD_FILE

    suite, out = tmp_path / "tiny.yaml", tmp_path / "bench"
    suite.write_text(TINY_SUITE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "potion", "benchmark", "--suite", str(suite), "--out", str(out), "--num-cpus", "1",
           "--tracking-uri", "none"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = out / RECORD_FILE
    deadline = time.time() + 120
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert record.exists(), proc.communicate()[1][-3000:]
    time.sleep(1)
    entries = json.loads(record.read_text())["processes"]
    started = [psutil.Process(e["pid"]) for e in entries if psutil.pid_exists(e["pid"])]
    assert any("Agent" in p.name() for p in started)
    kids = _ray_children(proc.pid)
    dog = [p for p in kids if "potion.distributed.leftovers" in " ".join(p.cmdline())]
    assert len(dog) == 1
    if watchdog == "killed too":
        dog[0].kill()  # it stays a zombie of the driver: nothing to wait for
    proc.kill()
    _, err = proc.communicate(timeout=60)
    if watchdog == "alive":
        last = err.strip().splitlines()[-1]
        assert last.startswith("potion: error: this benchmark stopped: its process was killed"), err[-2000:]
        assert "finished cells are kept" in err
        _, alive = psutil.wait_procs(started, timeout=20)
        assert alive == []
        return
    time.sleep(3)
    survivors = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors, "nothing outlived the driver: the test no longer shows the leak it guards against"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the run's: must survive
    try:
        rerun = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0
        # a dry run starts and stops nothing: the record stays for the real rerun. (An orphaned
        # Ray process may still exit on its own meanwhile, more so on a loaded machine: seen once.)
        assert record.exists() and "stopped" not in rerun.stderr, rerun.stderr[-2000:]
        survivors = [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert re.search(r"stopped \d+ Ray processes", rerun.stderr), rerun.stderr[-2000:]
        _, alive = psutil.wait_procs(survivors, timeout=20)
        assert alive == [] and other.poll() is None and not record.exists()
    finally:
        other.kill()


# ---------------------------------------------------------------- soak
@pytest.mark.slow
@pytest.mark.ray
def test_the_soak_smoke_run_holds_its_floor(run_dir, tmp_path):
    """benchmarks/soak.py --smoke: six heals (both backends, a cache miss and hits, a refusal
    without a model, an interrupt) on one Ray cluster leak nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    rows_file = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--smoke", "--run", str(run_dir),
                           "--work", str(tmp_path / "w"), "--json", str(rows_file)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert rows_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(rows_file.read_text())
    outcomes = [r["outcome"].split(":")[0] for r in got["rows"]]
    assert {"healed", "interrupted", "refused"} <= set(outcomes), outcomes
    assert {r["backend"] for r in got["rows"]} == {"local", "ray"}
    leaks = got["leaks"]
    assert (leaks["processes"], leaks["fds"], leaks["stale"]) == (0, 0, []) and got["rss_growth"] < 0.10, leaks
    if leaks["object_store_mb"]:
        # tune.with_parameters keeps every search's payload in Ray's object store for the life
        # of the driver (a _ParameterRegistry per call, held by ray's _post_init_hooks)
        pytest.xfail(f"the object store grew {leaks['object_store_mb']} MB over the soak (Tune's with_parameters)")
    assert got["ok"] and proc.returncode == 0
