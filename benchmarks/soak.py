"""Soak: many heals back to back on ONE local Ray cluster, then count what they left.

The heals mix the local and Ray backends, importance-cache misses and hits, refusals (no
step heals within the search's limits: the guard returns no model), input refusals and
interrupts (a SIGINT to this process mid-heal). After each one the script records the
processes under it, its open file descriptors, its RSS, the Ray object store's use, and any
``.staging-*`` / ``.old-*`` / ``.lock`` entry beside the outputs. The floor (issue 23): no leaked process, descriptor, object-store byte or stale
entry, and RSS growth under 10 % after the first 5 heals.

    From the repository root (the digits data ship with scikit-learn: no download):
    heavy .venv/bin/python benchmarks/soak.py            # 30 heals, a few minutes on 2 cores
    heavy .venv/bin/python benchmarks/soak.py --smoke    # 6 heals, the test's size

Exit status 0 when the floor holds, 1 otherwise. ``--json FILE`` writes every row.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

WARMUP = 5  # heals before the RSS baseline: imports, Ray's worker pool and caches settle
RSS_FLOOR = 0.10


def kinds(n: int) -> list[dict]:
    """The i-th heal's settings: backends alternate, every third changes the deletion set
    (a cache miss; the rest hit), and refusals and interrupts are spread through the run."""
    plan = []
    for i in range(n):
        k = {"backend": "ray" if i % 2 else "local", "seed": (i // 3) % 3, "kind": "heal"}
        if i % 7 == 5:
            k["kind"] = "no-safe-step"
        elif i % 7 == 3:
            k["kind"] = "interrupt"
        elif i % 11 == 9:
            k["kind"] = "input-refusal"
        plan.append(k)
    return plan


def stale_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".staging-" in p.name or ".old-" in p.name
                  or p.name.endswith(".lock"))


def sample(outs: Path) -> dict:
    import psutil
    import ray

    me = psutil.Process()
    kids = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    total = ray.cluster_resources().get("object_store_memory", 0.0)
    free = ray.available_resources().get("object_store_memory", total)
    return {"rss_mb": me.memory_info().rss / 2**20, "fds": me.num_fds(), "threads": me.num_threads(),
            "processes": len(kids), "workers": sum(p.name().startswith("ray::") for p in kids),
            "object_store_mb": (total - free) / 2**20, "stale": stale_entries(outs), "fd_targets": fd_targets()}


def fd_targets() -> list[str]:
    """What each open descriptor points at (a leak names itself: a file, a socket, a pipe);
    a socket as ``socket:NETID STATE LOCAL PEER``."""
    sockets = _socket_names()
    out = []
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
        # a socket in no table: its connection is gone (closed by the peer), the descriptor is not
        out.append(f"socket:{sockets.get(inode, 'without a connection')}" if inode else target)
    return sorted(out)


def _socket_names() -> dict[str, str]:
    """inode → "netid state local peer", from ``ss`` (every kind of socket, bound or not)."""
    import re
    import subprocess

    try:
        lines = subprocess.run(["ss", "-apen"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    names = {}
    for line in lines:
        f = line.split()
        m = re.search(r"ino:(\d+)", line)
        if m:
            names[m.group(1)] = " ".join(f[:2] + f[4:6])
        elif f and f[0].startswith("u_") and len(f) > 5:  # unix: "u_str ESTAB 0 0 PATH INODE * PEER"
            names[f[5]] = " ".join(f[:2] + [f[4]])
    return names


def one_heal(i: int, spec: dict, run_dir: Path, outs: Path, cache: Path) -> str:
    from potion.errors import PotionError
    from potion.heal.run import run_heal
    from potion.runs.configs import HealJob
    from potion.unlearning.ptn import PTNConfig

    # one step of 1 %: nothing crosses, the guard refuses and writes only its report
    refuse = spec["kind"] == "no-safe-step"
    ptn = PTNConfig(step=1.01, max_steps=1, window=2) if refuse else PTNConfig(step=1.5, window=2)
    job = HealJob(method="xlf_ptn_guard", backend=spec["backend"], ptn=ptn, seed=spec["seed"], cache_dir=str(cache),
                  tracking_uri="none" if i % 4 else None)
    out = outs / f"heal-{i:02d}"
    if spec["kind"] == "input-refusal":
        out = outs / "heal-00"  # exists: refused before any compute without --overwrite
    timer = None
    if spec["kind"] == "interrupt":  # mid-heal: after loading, inside the importances or the search
        timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
    try:
        run_heal(run_dir, job, out, share=0.3, progress=False)
        outcome = "healed"
    except KeyboardInterrupt:
        outcome = "interrupted"
    except PotionError as e:
        outcome = "refused: " + str(e).split(";")[0][:70]
    finally:
        if timer is not None:
            timer.cancel()
    return outcome


def train_run(folder: Path) -> Path:
    from potion.cli import main

    run = folder / "run"
    if not (run / "model.pt").is_file():
        assert main(["train", "--dataset", "digits", "--poison-share", "0.05", "--seed", "0", "--iterations", "120",
                     "--out", str(run), "--quiet"]) == 0
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heals", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="6 heals (what the test runs)")
    ap.add_argument("--run", help="a trained run folder (default: a small digits run trained here)")
    ap.add_argument("--work", help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json", help="write every row to this file")
    args = ap.parse_args(argv)
    n = 6 if args.smoke else args.heals
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from potion.interrupts import handle_signals

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="potion-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run) if args.run else train_run(work)
    outs, cache = work / "outs", work / "cache"
    outs.mkdir(exist_ok=True)
    # ONE cluster for every heal: started here, so the heals join it and never stop it
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    rows = []
    try:
        with handle_signals():
            for i, spec in enumerate(kinds(n)):
                t0 = time.perf_counter()
                outcome = one_heal(i, spec, run_dir, outs, cache)
                gc.collect()
                row = {"i": i, **spec, "outcome": outcome, "s": round(time.perf_counter() - t0, 1), **sample(outs)}
                rows.append(row)
                print(f"{i:2d} {spec['backend']:5s} {spec['kind']:12s} {outcome[:60]:60s} {row['s']:5.1f} s  "
                      f"rss {row['rss_mb']:6.0f} MB  fds {row['fds']:3d}  procs {row['processes']:2d}  "
                      f"store {row['object_store_mb']:5.1f} MB  stale {len(row['stale'])}", flush=True)
        time.sleep(5)  # let Ray reap the workers of the last heal
        final = sample(outs)
    finally:
        ray.shutdown()
    return report(rows, final, n, args.json)


def _fd_kind(target: str) -> str:
    # inode numbers differ between samples: compare what the descriptor is, not which
    return target.split("[")[0] if target.startswith(("pipe:", "anon_inode:")) else target


def report(rows: list[dict], final: dict, n: int, json_path: str | None) -> int:
    base = rows[min(WARMUP, len(rows)) - 1]
    later = rows[WARMUP:] or rows[-1:]
    rss_growth = (max(r["rss_mb"] for r in later) - base["rss_mb"]) / base["rss_mb"]
    leaks = {
        "processes": max(0, final["processes"] - base["processes"]),
        "fds": max(0, final["fds"] - base["fds"]),
        "object_store_mb": round(max(0.0, final["object_store_mb"] - base["object_store_mb"]), 2),
        "stale": final["stale"],
        "new_fds": sorted((Counter(map(_fd_kind, final["fd_targets"]))
                           - Counter(map(_fd_kind, base["fd_targets"]))).elements()),
    }
    outcomes: dict[str, int] = {}
    for r in rows:
        key = r["outcome"].split(":")[0]
        outcomes[f"{r['backend']} {key}"] = outcomes.get(f"{r['backend']} {key}", 0) + 1
    ok = not leaks["processes"] and not leaks["fds"] and not leaks["object_store_mb"] and not leaks["stale"] \
        and rss_growth < RSS_FLOOR
    print(f"\n{n} heals: {', '.join(f'{v} {k}' for k, v in sorted(outcomes.items()))}")
    print(f"after heal {base['i']} → end: RSS {base['rss_mb']:.0f} → max {max(r['rss_mb'] for r in later):.0f} MB "
          f"({100 * rss_growth:+.1f} %, floor < {100 * RSS_FLOOR:.0f} %); leaked processes {leaks['processes']}, "
          f"fds {leaks['fds']}, object store {leaks['object_store_mb']} MB, stale entries {len(leaks['stale'])}")
    if leaks["new_fds"]:
        print(f"descriptors open at the end and not after heal {base['i']}: {', '.join(leaks['new_fds'])}")
    print("floor holds" if ok else "FLOOR BROKEN")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows, "final": final, "leaks": leaks,
                                               "rss_growth": rss_growth, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
