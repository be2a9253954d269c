"""Chaos on a 3-node ``ray.cluster_utils.Cluster``: kill a worker, a whole node (raylet and
agents), and the driver, during the retain pass and during the search.

Each heal runs as its own ``potion heal --address <cluster>`` process, with the shard (or
trial) body wrapped so that the first one to start on a non-head node writes its pid and
node to a flag file and pauses; this script then applies the fault. The floor (issue 23):
every heal either finishes with the quiet run's k*, α and after-metrics, or ends with one
``potion:`` line and nothing written (no ``--out``, no staging folder, no lock); a rerun of
the same command then resumes or starts clean and finishes with the quiet run's result.

    heavy .venv/bin/python benchmarks/chaos.py              # 6 faults, a few minutes on 2 cores
    heavy .venv/bin/python benchmarks/chaos.py --only retain:worker

Prints a markdown table (the one in benchmarks/results/faults.md, "Chaos"); exit status 0
when the floor holds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from potion.tracking.store import free_port
from soak import train_run  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
FAULTS = [f"{phase}:{fault}" for phase in ("retain", "search") for fault in ("worker", "node", "driver")]

DRIVER = textwrap.dedent("""
    import os, sys, time
    import ray
    from potion.cli import main
    PHASE, FLAG, HEAD = sys.argv[1], sys.argv[2], sys.argv[3]

    def _flag():
        node = ray.get_runtime_context().get_node_id()
        if node == HEAD or FLAG == "-":  # HEAD "-": any node will do
            return
        try:
            fd = os.open(FLAG, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {node}".encode())
        os.close(fd)
        time.sleep(6)  # the fault lands while this runs

    if PHASE == "retain":
        import potion.distributed.importances as mod
        inner = mod._shard_sums
        def _shard_sums(*a, **k):
            _flag()
            return inner(*a, **k)
        mod._shard_sums = _shard_sums
    elif PHASE == "search":
        import potion.distributed.search as mod
        inner = mod.ptn_trial
        def ptn_trial(config, payload):
            if config["k"] >= 1:
                _flag()
            return inner(config, payload)
        mod.ptn_trial = ptn_trial
    sys.exit(main(sys.argv[4:]))
""")


def node_args() -> dict:
    return dict(dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
                runtime_env_agent_port=free_port(), metrics_agent_port=free_port(), num_cpus=1)


def heal_cmd(run_dir: Path, out: Path, address: str, cache: str) -> list[str]:
    return ["heal", "--run", str(run_dir), "--discovery-share", "0.3", "--backend", "ray", "--address", address,
            "--step", "1.5", "--window", "2", "--cache-dir", cache, "--tracking-uri", "none", "--out", str(out),
            "--quiet"]


def run_heal(phase: str, flag: str, head: str, args: list[str], fault=None, timeout: float = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, phase, flag, head, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    applied = None
    if fault is not None:
        deadline = time.time() + timeout
        while not Path(flag).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if Path(flag).exists():
            time.sleep(0.3)
            pid, node = Path(flag).read_text().split()
            applied = fault(proc, int(pid), node)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {"rc": proc.returncode, "last": lines[-1] if lines else "", "stderr": err, "applied": applied,
            "s": round(time.perf_counter() - t0, 1)}


def read_result(out: Path) -> dict | None:
    try:
        r = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    after = r.get("after") or r.get("metrics_after") or {}
    return {"k_star": r.get("k_star"), "alpha": r.get("alpha"),
            "after": {k: after.get(k) for k in ("clean_acc", "ra", "asr")} if isinstance(after, dict) else after}


def same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None or a["k_star"] != b["k_star"]:
        return False
    if abs(a["alpha"] - b["alpha"]) > 1e-5 * max(1.0, abs(b["alpha"])):
        return False
    return all(abs((a["after"][k] or 0) - (b["after"][k] or 0)) < 1e-6 for k in b["after"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".staging-" in p.name or p.name.endswith(".lock"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a trained run folder (default: a small digits run trained here)")
    ap.add_argument("--work", help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--only", action="append", choices=FAULTS, help="run only these faults (repeatable)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster

    work = Path(args.work or tempfile.mkdtemp(prefix="potion-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run) if args.run else train_run(work)  # soak.py's small digits run
    c = Cluster(initialize_head=True, connect=False,
                head_node_args=dict(gcs_server_port=free_port(), include_dashboard=False,
                                    ray_client_server_port=free_port(), dashboard_port=free_port(), **node_args()))
    workers = [c.add_node(**node_args()) for _ in range(2)]
    c.wait_for_nodes()
    head = c.head_node.node_id
    rows = []
    try:
        quiet_out = work / "quiet"
        q = run_heal("none", "-", head, heal_cmd(run_dir, quiet_out, c.address, "none"))
        quiet = read_result(quiet_out)
        if quiet is None:
            print(q["stderr"][-3000:], file=sys.stderr)
            return 1
        print(f"quiet run: k*={quiet['k_star']} alpha={quiet['alpha']:.4f} after={quiet['after']} ({q['s']} s)",
              flush=True)
        for name in args.only or FAULTS:
            phase, kind = name.split(":")
            folder = work / name.replace(":", "-")
            folder.mkdir()
            out, flag, cache = folder / "healed", str(folder / "flag"), str(folder / "cache")

            def fault(proc, pid, node, kind=kind):
                if kind == "worker":
                    os.kill(pid, signal.SIGKILL)
                    return f"SIGKILL worker {pid}"
                if kind == "driver":
                    proc.kill()
                    return f"SIGKILL driver {proc.pid}"
                victim = next(n for n in workers if n.node_id == node)
                c.remove_node(victim, allow_graceful=False)  # its raylet and agents, SIGKILL
                workers.remove(victim)
                return f"removed node {node[:8]}"

            # only a node fault needs the paused task off the head node (the driver's node)
            got = run_heal(phase, flag, head if kind == "node" else "-", heal_cmd(run_dir, out, c.address, cache),
                           fault)
            time.sleep(1.5)  # the watchdog's cleanup after a killed driver
            result = read_result(out)
            row = {"fault": name, "applied": got["applied"], "rc": got["rc"], "s": got["s"],
                   "finished_same": got["rc"] == 0 and same(result, quiet),
                   "clean_error": got["rc"] != 0 and got["last"].startswith("potion:") and not out.exists()
                   and not leftovers(folder), "last": got["last"][:160], "left": leftovers(folder)}
            if got["rc"] != 0:
                again = run_heal("none", "-", head, heal_cmd(run_dir, out, c.address, cache))
                row["rerun"] = ("finished, same result" if again["rc"] == 0 and same(read_result(out), quiet)
                                else f"rc {again['rc']}: {again['last'][:100]}")
                row["rerun_s"] = again["s"]
            row["ok"] = bool(got["applied"]) and (row["finished_same"] or row["clean_error"]) \
                and row.get("rerun", "finished, same result") == "finished, same result"
            rows.append(row)
            print(json.dumps(row), flush=True)
            while len(workers) < 2:  # keep three nodes for the next fault
                workers.append(c.add_node(**node_args()))
                c.wait_for_nodes()
    finally:
        c.shutdown()
    print(table(rows, quiet))
    return 0 if rows and all(r["ok"] for r in rows) else 1


def table(rows: list[dict], quiet: dict) -> str:
    head = ("| fault | applied | outcome | last line (shortened) | left beside --out | rerun |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        outcome = ("finished, same k*/α/after" if r["finished_same"] else
                   "clean `potion:` error, nothing written" if r["clean_error"] else f"FLOOR BROKEN (rc {r['rc']})")
        last = r["last"].replace("|", "\\|")[:110] if not r["finished_same"] else "—"
        lines.append(f"| {r['fault']} | {r['applied'] or 'not applied'} | {outcome} | {last} | "
                     f"{', '.join(r['left']) or 'nothing'} | {r.get('rerun', '—')} |")
    lines.append(f"\nquiet run: k*={quiet['k_star']}, α={quiet['alpha']:.4f}, after={quiet['after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
