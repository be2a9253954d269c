"""End to end on a real (one-node) Ray cluster: `ray start`, `ray job submit -- potion heal
--backend ray`, the result tracked in MLflow.

The cluster gets its own temp folder and is stopped by terminating exactly the processes
whose command line names that folder (and their children): `ray stop` would stop every
Ray process of the machine, including clusters this test did not start.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import owner_case

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `potion`

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops its cluster through /proc"),
]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (all sockets held open until every port is chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_start_port_flags() -> list:
    """Every port `ray start --head` would otherwise take from Ray's fixed defaults, so that
    this cluster runs beside any other Ray on the machine (a second copy of the suite, a
    user's cluster). Ports the test must know (GCS, dashboard) or Ray requires as a number
    (client server) are probed free ports; the agents' ports are 0: the kernel picks them
    when they bind, which no other process can race."""
    gcs, dash, client = _free_ports(3)
    return ["--port", gcs, "--dashboard-port", dash, "--ray-client-server-port", client,
            "--dashboard-agent-listen-port", 0, "--dashboard-agent-grpc-port", 0,
            "--runtime-env-agent-port", 0, "--metrics-export-port", 0]


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid → (parent pid, state, command line), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), fields[0], cmd)
    return out


def _alive(pids: set[int]) -> set[int]:
    procs = _processes()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}


def stop_cluster(marker: str, grace: float = 15.0) -> None:
    """Terminate the processes whose command line contains ``marker`` and their descendants."""
    procs = _processes()
    pids = {p for p, (_, _, cmd) in procs.items() if marker in cmd}
    while True:
        more = {p for p, (pp, _, _) in procs.items() if pp in pids} - pids
        if not more:
            break
        pids |= more
    pids.discard(os.getpid())
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in _alive(pids):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.time() + wait
        while _alive(pids) and time.time() < end:
            time.sleep(0.2)


def _run(cmd, env, cwd, timeout):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)


def test_potion_heal_as_a_ray_job_tracked_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    ray_bin, potion_bin = BIN / "ray", BIN / "potion"
    assert ray_bin.is_file() and potion_bin.is_file(), f"expected ray and potion in {BIN}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    run_dir, out, db, own_out = tmp_path / "run", tmp_path / "heal", tmp_path / "mlflow.db", tmp_path / "own_heal"

    train = _run([potion_bin, "train", "--dataset", "digits", "--poison", "badnet", "--poison-share", "0.02",
                  "--seed", "0", "--iterations", "100", "--out", run_dir, "--quiet"], env, tmp_path, 600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]

    # Short: Ray's unix socket paths under it must stay below ~107 characters.
    temp = tempfile.mkdtemp(prefix="potion-rt-", dir="/tmp")
    ports = ray_start_port_flags()
    address = f"http://127.0.0.1:{ports[ports.index('--dashboard-port') + 1]}"
    sid = f"potion-test-{uuid.uuid4().hex[:8]}"
    try:
        start = _run([ray_bin, "start", "--head", "--num-cpus", "1", "--dashboard-host", "127.0.0.1", *ports,
                      "--temp-dir", temp, "--disable-usage-stats"], env, temp, 180)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        job = _run([ray_bin, "job", "submit", "--address", address, "--working-dir", REPO, "--submission-id", sid,
                    # the entrypoint the README documents: Potion through its interpreter, by
                    # absolute path, so it does not depend on the PATH the cluster started with
                    "--", sys.executable, "-m", "potion", "heal", "--run", run_dir, "--discovery-share", "0.3",
                    "--method", "xlf_ptn", "--backend", "ray", "--step", "3", "--out", out, "--tracking-uri", f"sqlite:///{db}",
                    "--quiet"], env, tmp_path, 900)
        submit_output = f"ray job submit exited {job.returncode}:\n" + job.stdout[-4000:] + job.stderr[-3000:]
        # The submit's own verdict first: if it never reached the cluster there is no job to ask about.
        assert job.returncode == 0, submit_output
        assert f"Job '{sid}' succeeded" in job.stdout + job.stderr, submit_output
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status(sid)
        assert status == JobStatus.SUCCEEDED, f"{status}\n{submit_output}"

        # The owner's own model, from a class installed nowhere: the job's working dir is
        # their folder, and every path is relative to it.
        case = owner_case.build(tmp_path / "owner")
        own = _run([ray_bin, "job", "submit", "--address", address, "--working-dir", case["folder"],
                    "--", "potion", "heal", *owner_case.heal_args(Path(".")), "--method", "xlf_ptn", "--step", "2",
                    "--batch-size", "512",
                    "--backend", "ray", "--out", own_out, "--tracking-uri", "none", "--cache-dir", "none", "--quiet"],
                   env, tmp_path, 900)
        assert own.returncode == 0, own.stdout[-4000:] + own.stderr[-3000:]
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)

    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "ray" and report["method"] == "xlf_ptn"
    assert isinstance(report["k_star"], int)
    parent_id = report["mlflow"]["parent_run_id"]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(report["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert parents[0].info.status == "FINISHED"
    trace = {t["k"]: t for t in report["trace"]}
    assert len(children) == len(trace) >= report["k_star"] + 1
    for r in children:
        assert r.data.metrics["acc_forget"] == trace[int(r.data.metrics["k"])]["acc_forget"]
    artifacts = {f.path for f in client.list_artifacts(parent_id, "model")}
    assert "model/model.pt" in artifacts

    own_report = json.loads((own_out / "report.json").read_text())
    assert own_report["backend"] == "ray" and own_report["provenance"]["model"]["spec"] == "mynet_owner.py:MyNet"
    assert own_report["k_star"] == owner_case.direct_k_star(case)
    assert own_report["after"]["asr"] < 0.5 * own_report["before"]["asr"]
