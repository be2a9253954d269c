"""A one-machine Ray cluster for `ray job submit`, on free ports, stopped without `ray stop`.

    CLUSTER=$(.venv/bin/python scripts/local_cluster.py start --num-cpus 2)
    .venv/bin/ray job submit --address "$(cat "$CLUSTER/address")" --working-dir . -- "$PWD/.venv/bin/python" -m potion …
    .venv/bin/python scripts/local_cluster.py stop "$CLUSTER"

`start` makes a fresh folder /tmp/potion-ray-XXXX (short: Ray's socket paths under it must stay
below ~107 characters), starts a head node there whose every port is free (GCS, dashboard and
client server probed free; the agents' ports chosen by the kernel), so it runs beside any other
Ray on the machine, writes the job address to `<folder>/address` and prints the folder.
`stop FOLDER` ends exactly the processes of that cluster (those whose command line names the
folder, and their children) and removes the folder; `ray stop` would end every Ray of the
machine. The cluster runs with RAY_AUTH_MODE=disabled: it listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADDRESS_FILE = "address"  # also what marks a folder as one of these clusters for `stop`
RAY = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all held open until every port is chosen: n distinct ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(num_cpus: int | None) -> int:
    folder = Path(tempfile.mkdtemp(prefix="potion-ray-", dir="/tmp"))
    gcs, dashboard, client = _free_ports(3)
    cmd = [str(RAY), "start", "--head", "--temp-dir", str(folder), "--disable-usage-stats",
           "--dashboard-host", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", "0",
           "--dashboard-agent-grpc-port", "0", "--runtime-env-agent-port", "0", "--metrics-export-port", "0"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        _stop(folder)
        print(f"ray start failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}",
              file=sys.stderr)
        return 1
    address = f"http://127.0.0.1:{dashboard}"
    (folder / ADDRESS_FILE).write_text(address + "\n")
    print(f"Ray cluster up: jobs at {address} (GCS 127.0.0.1:{gcs}); "
          f"stop it with: {sys.executable} {Path(__file__).resolve()} stop {folder}", file=sys.stderr)
    print(folder)
    return 0


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


def _stop(folder: Path, grace: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` s, to the cluster's processes; returns how many."""
    procs = _processes()
    pids = {p for p, (_, _, cmd) in procs.items() if str(folder) in cmd}
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
    shutil.rmtree(folder, ignore_errors=True)
    return len(pids)


def stop(folder: str) -> int:
    path = Path(folder).absolute()
    if not (path / ADDRESS_FILE).is_file():
        print(f"{path} is not a cluster folder that `start` made (no {ADDRESS_FILE} file in it); nothing stopped",
              file=sys.stderr)
        return 2
    n = _stop(path)
    print(f"stopped the Ray cluster in {path} ({n} processes)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    if not sys.platform.startswith("linux"):
        print("local_cluster.py finds the cluster's processes through /proc: Linux only", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a head node on free ports; prints its folder")
    s.add_argument("--num-cpus", type=int, help="CPUs the cluster offers (default: all of this machine)")
    t = sub.add_parser("stop", help="stop the cluster that `start` made in FOLDER")
    t.add_argument("folder")
    args = p.parse_args(argv)
    return start(args.num_cpus) if args.command == "start" else stop(args.folder)


if __name__ == "__main__":
    sys.exit(main())
