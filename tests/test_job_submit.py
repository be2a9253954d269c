"""End to end on a real (one-node) Ray cluster: `ray job submit -- potion heal --backend ray`,
the result tracked in MLflow; the README's local-cluster recipe, run verbatim; a relative
`--out` refused inside the job's working-dir copy.

Clusters are started and stopped with `scripts/local_cluster.py` (free ports, its own temp
folder, stopped by its processes): `ray stop` would stop every Ray process of the machine,
including clusters these tests did not start.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import owner_case

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `potion`
CLUSTER_SCRIPT = REPO / "scripts" / "local_cluster.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="local_cluster.py stops its cluster through /proc"),
]


def _run(cmd, env, cwd, timeout):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True)


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _cluster_pids(folder: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and folder in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _stop_left_over(output: str, env) -> None:
    """After a failure: stop the cluster that `start` announced, if it is still there."""
    for folder in re.findall(r"local_cluster\.py stop (\S+)", output):
        if Path(folder).is_dir():
            _run([sys.executable, CLUSTER_SCRIPT, "stop", folder], env, REPO, 120)


def test_potion_heal_as_a_ray_job_tracked_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    ray_bin, potion_bin = BIN / "ray", BIN / "potion"
    assert ray_bin.is_file() and potion_bin.is_file(), f"expected ray and potion in {BIN}"
    env = _env()
    run_dir, out, db, own_out = tmp_path / "run", tmp_path / "heal", tmp_path / "mlflow.db", tmp_path / "own_heal"

    train = _run([potion_bin, "train", "--dataset", "digits", "--poison", "badnet", "--poison-share", "0.02",
                  "--seed", "0", "--iterations", "100", "--out", run_dir, "--quiet"], env, tmp_path, 600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]

    start = _run([sys.executable, CLUSTER_SCRIPT, "start", "--num-cpus", "1"], env, tmp_path, 180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    cluster = start.stdout.strip()
    address = (Path(cluster) / "address").read_text().strip()
    sid = f"potion-test-{os.getpid()}"
    try:
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

        # A relative --out would land in the job's temporary copy of its working dir: refused,
        # before any work, with what to pass instead.
        rel = _run([ray_bin, "job", "submit", "--address", address, "--working-dir", case["folder"],
                    "--", sys.executable, "-m", "potion", "heal", *owner_case.heal_args(Path(".")),
                    "--out", "healed-rel", "--tracking-uri", "none", "--quiet"], env, tmp_path, 600)
        said = rel.stdout + rel.stderr
        assert rel.returncode != 0, said[-4000:]
        assert "potion: error: --out healed-rel would be written inside this Ray job's temporary copy" in said
        assert "absolute path" in said and "Traceback" not in said, said[-4000:]
        assert not (Path(case["folder"]) / "healed-rel").exists()
    finally:
        stopped = _run([sys.executable, CLUSTER_SCRIPT, "stop", cluster], env, tmp_path, 120)
    assert stopped.returncode == 0, stopped.stderr
    assert not Path(cluster).exists() and not _cluster_pids(cluster)

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


def _readme_block(heading: str) -> str:
    """The first ```bash block under ``heading`` in README.md, as written there."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n"):]
    return section[section.index("```bash\n") + len("```bash\n"):section.index("\n```", section.index("```bash"))]


def test_the_readme_local_cluster_recipe_runs_verbatim(tmp_path):
    block = _readme_block("## Ray jobs on a local cluster")
    assert "scripts/local_cluster.py start" in block and "ray stop" not in block
    # a fresh shell: no Ray address, no tracking store chosen; mktemp -t writes under TMPDIR
    env = _env(TMPDIR=str(tmp_path))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("POTION_TRACKING_URI", None)
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env, timeout=1500,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        _stop_left_over("".join(x.decode() if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x), env)
        raise
    said = done.stdout + done.stderr
    _stop_left_over(said, env)
    assert done.returncode == 0, said[-6000:]

    [out] = tmp_path.glob("potion-job-*")
    healed = out / "healed"
    report = json.loads((healed / "report.json").read_text())
    assert report["backend"] == "ray" and isinstance(report["k_star"], int)
    # the paths the job printed are where the files are
    assert f"healed model: {healed / 'model.pt'}" in said and f"report: {healed / 'report.json'}" in said
    assert (healed / "model.pt").is_file() and "model.pt" in done.stdout.split()
    # the cluster it started is gone, processes and folder
    [cluster] = re.findall(r"local_cluster\.py stop (\S+)", said)
    assert f"stopped the Ray cluster in {cluster}" in said
    assert not Path(cluster).exists() and not _cluster_pids(cluster)
