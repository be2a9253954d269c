"""What a run leaves when it dies without unwinding, and who cleans it up.

Ray ends the driver itself, with ``_exit``, when the node it runs on dies ("The connection to
the plasma store is failed. Terminate the process."), and SIGKILL or the OOM killer end it
the same way: no ``finally`` runs. The Ray processes an owned local instance started
outlive it (its dashboard and runtime-env agents, whose titles no longer name the session),
the output's staging folder and lock stay, and the user sees Ray's tracebacks and no word
from Potion. Two things repair that:

- a **record** of the processes this run's Ray instance started (pid and start time, so a
  pid the kernel gave to another program since is never touched), written where the next
  run of the same command looks (``stop_recorded``);
- a **watchdog**, a small process started beside the driver, that notices the driver's
  death at once, says in one ``potion:`` line what happened and that the command can be
  rerun, stops the recorded processes, and clears the staging folder and lock of the run's
  ``--out`` (under that lock, so a new run that already took it is left alone).

``describe_ray_failure`` is the one line that names the node when Ray's own errors end a
shard or a trial for good.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

RECORD_FILE = ".ray-processes.json"
_DONE = b"done"
# what every error that a dead worker or node ends a heal with tells the user
RESUME_HINT = ("nothing was written; rerun the same command to resume (finished importance passes come from the "
               "cache)")


def describe_ray_failure(e: BaseException) -> str:
    """One line for a Ray failure that killed workers (``ActorDiedError``, ``NodeDiedError``,
    ``WorkerCrashedError``, ``OwnerDiedError`` ...): its kind and, when Ray says, the node."""
    import re

    text = str(e)
    ip = re.search(r"\bip(?: address)?:? ([0-9a-fA-F.:]+[0-9a-fA-F])", text)
    node = re.search(r"node[ _]id:? ?([0-9a-f]{12})", text)
    where = ""
    if ip or node:
        parts = (ip and ip.group(1), node and f"(node id {node.group(1)})")
        where = " on the Ray node " + " ".join(x for x in parts if x)
    why = "the node died" if "node" in text.lower() and ("died" in text.lower() or "crashed" in text.lower()) \
        else "its worker process died"
    return f"{type(e).__name__}{where}: {why}"


# ---------------------------------------------------------------- the record
def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _alive(entry: dict):
    """The process of a record entry when it is still the same process (pid and start time)."""
    import psutil

    p = _process(int(entry["pid"]))
    try:
        if p is None or abs(p.create_time() - float(entry["create_time"])) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return p


def ray_record() -> dict:
    """This process's Ray instance: the driver, the node it runs on, and the processes it
    started (all descendants of this process, agents and workers included)."""
    import psutil
    import ray

    me = psutil.Process()
    record = {"driver": {"pid": me.pid, "create_time": me.create_time()}, "processes": []}
    for p in me.children(recursive=True):
        try:
            record["processes"].append({"pid": p.pid, "create_time": p.create_time(), "name": p.name()})
        except psutil.Error:
            continue
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        record["node_id"] = ctx.get_node_id()
        record["node_ip"] = ray.util.get_node_ip_address()
    return record


def record_beside(out: str | os.PathLike) -> Path:
    """Where a run writing ``out`` records its Ray processes: beside it, like its lock."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}{RECORD_FILE}"


def write_record(path: str | os.PathLike, record: dict) -> None:
    from potion.io import atomic_write_json

    atomic_write_json(path, record)


def stop_processes(entries: list[dict]) -> list[int]:
    """SIGKILL the recorded processes that still run (those only); returns their pids."""
    import psutil

    live = [p for p in (_alive(e) for e in entries) if p is not None and p.pid != os.getpid()]
    for p in live:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(live, timeout=5)
    return [p.pid for p in live]


def stop_recorded(path: str | os.PathLike) -> list[int]:
    """Stop what the run that wrote the record at ``path`` started, if that run is dead.

    A record whose driver still runs belongs to a live run (a second invocation on the
    same folder) and is left alone. Returns the pids stopped; the record is removed.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if _alive(record.get("driver") or {"pid": -1, "create_time": 0}) is not None:
        return []
    stopped = stop_processes(record.get("processes", []))
    path.unlink(missing_ok=True)
    if stopped:
        print(f"potion: note: stopped {len(stopped)} Ray processes (pids {', '.join(map(str, stopped))}) left "
              f"running by an earlier run that was killed", file=sys.stderr, flush=True)
    return stopped


# ---------------------------------------------------------------- the watchdog
class Watchdog:
    """The driver's side: ``close()`` on every way out that Python sees (success, error,
    Ctrl-C), so the watchdog exits quietly; a driver that dies without it triggers it."""

    def __init__(self, proc: subprocess.Popen | None, fd: int | None):
        self.proc, self.fd = proc, fd

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, _DONE)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def start_watchdog(what: str, out: str | os.PathLike | None, record: dict,
                   resume: str = "importance passes that finished come from the cache",
                   record_file: str | os.PathLike | None = None) -> Watchdog:
    """Watch this process: when it dies without ``Watchdog.close()``, report it as ``what``
    (e.g. "this heal"), stop the processes of ``record`` (and remove its ``record_file``) and
    clear ``out``'s staging folder and lock. Never fails the run: without a watchdog the
    next run still cleans up."""
    r, w = os.pipe()
    spec = json.dumps({"what": what, "out": str(Path(out).absolute()) if out else None, "record": record,
                       "resume": resume, "record_file": str(record_file) if record_file else None})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "potion.distributed.leftovers", str(r)],
                                stdin=subprocess.PIPE, pass_fds=(r,), start_new_session=False)
        proc.stdin.write(spec.encode())
        proc.stdin.close()
    except OSError:
        os.close(r)
        os.close(w)
        return Watchdog(None, None)
    os.close(r)
    return Watchdog(proc, w)


def _raylet(record: dict) -> dict | None:
    return next((p for p in record.get("processes", []) if p.get("name") == "raylet"), None)


def _driver_died(spec: dict, node_first: bool, raylet_at_death: bool) -> None:
    """``node_first``: the raylet was seen dead while the driver still ran (Ray then ends the
    driver); ``raylet_at_death``: it still ran when the driver's end was noticed."""
    record = spec["record"]
    node = f"{record.get('node_ip') or 'this machine'} (node id {(record.get('node_id') or '')[:12]})"
    if node_first:
        cause = f"the Ray node {node} it ran on died, and Ray ended the process with it"
    elif raylet_at_death:
        cause = "its process was killed (SIGKILL or out of memory)"
    else:
        cause = f"its process was killed (SIGKILL or out of memory), or its Ray node {node} died"
    stop_processes(record.get("processes", []))
    if spec.get("record_file"):
        Path(spec["record_file"]).unlink(missing_ok=True)
    out = Path(spec["out"]) if spec.get("out") else None
    wrote = ""
    if out is not None:
        from potion.errors import PotionError
        from potion.io import clean_stale_stages, output_lock

        try:
            with output_lock(out):
                clean_stale_stages(out.resolve(), quiet=True)
        except PotionError:
            pass  # a new run holds the lock now; it clears what is left itself
        wrote = f"; nothing was written to {out}"
    print(f"potion: error: {spec['what']} stopped: {cause}{wrote}. The run can be resumed: rerun the same "
          f"command ({spec['resume']})", file=sys.stderr, flush=True)


def _watch(fd: int, spec: dict) -> None:
    driver, raylet = spec["record"]["driver"], _raylet(spec["record"])
    node_first = False
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)  # Ray ends the driver soon after its node
        if ready:
            data = os.read(fd, 16)
            if data.startswith(_DONE):
                return
            if not data:  # every copy of the write end closed: the driver is gone
                break
        elif _alive(driver) is None:
            break
        if raylet is not None and not node_first and _alive(raylet) is None:
            node_first = True  # Ray ends a driver whose node died, a moment later
    raylet_at_death = raylet is not None and _alive(raylet) is not None
    time.sleep(0.2)  # let Ray's own last lines reach the terminal first
    _driver_died(spec, node_first, raylet_at_death)


if __name__ == "__main__":
    # A terminal's Ctrl-C reaches the whole process group; the driver handles it and closes us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _watch(int(sys.argv[1]), json.loads(sys.stdin.read()))
