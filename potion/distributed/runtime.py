"""Starting or joining a Ray cluster, quietly, and failing fast when it is not there.

Everything Ray-specific that the rest of the pipeline needs before any compute happens:
``connect`` is called first by ``potion heal --backend ray`` so that a wrong address or a
stopped cluster is reported in seconds, not after the importance pass.

Authentication (Ray >= 2.59): Ray turns on token authentication for a new local cluster
when ``RAY_AUTH_MODE`` is unset, which writes a token to ``~/.ray/auth_token``; from then
on *every* later Ray driver of that user silently switches to token mode, and a cluster
started with ``ray start`` without a token can no longer be joined. For the cluster that
Potion starts for itself (owned by this process and stopped with it) we therefore set
``RAY_AUTH_MODE=disabled`` when the user has not chosen a mode, so running Potion leaves no
token behind and changes nothing for other Ray programs. Note that Ray's servers listen on
all interfaces; on a machine shared with untrusted users set ``RAY_AUTH_MODE=token``
yourself (Potion never overrides a mode that is set). When joining an existing cluster we
make Ray's own choice explicit: ``token`` when a token is available, else ``disabled``.

Ports: a local instance from ``ray.init`` lets the GCS, raylet, metrics and runtime-env
agents bind ports the kernel picks, finds a dashboard (API server) port by trying upwards
from 8265, and starts no client server; only the dashboard agent's HTTP port is fixed
(52365) and ``ray.init`` has no argument for it. A second Ray on the machine (another Potion,
a second test suite, a user's cluster) then leaves the agent without its HTTP service, which
job and state calls need. ``_kernel_chosen_agent_port`` gives that port 0 too, so any number
of local instances can run side by side.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from potion.errors import PotionError, detail_of
from potion.interrupts import reinstall

AUTH_ENV = "RAY_AUTH_MODE"
CONNECT_TIMEOUT_S = 5.0

_owned = False  # whether this process started the Ray instance it is connected to
_watchdog = None  # potion.distributed.leftovers.Watchdog of this run, while one runs
_record = None  # the file listing the processes of our Ray instance, while it runs


def _quiet_env() -> None:
    # The new Tune/Train console output ignores verbose=0; the old one honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def set_auth_mode(joining: bool) -> str:
    """Make the authentication mode explicit (see the module docstring for why)."""
    mode = os.environ.get(AUTH_ENV)
    if not mode:
        mode = "token" if joining and _token_available() else "disabled"
        os.environ[AUTH_ENV] = mode
    return mode


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``ray://host:port`` → (host, port); anything else → PotionError."""
    addr = address.strip()
    if addr.startswith(("http://", "https://")):
        raise PotionError(
            f"Ray address {address} is a dashboard (job submission) URL; --address needs the cluster's "
            "GCS address host:port (printed by `ray start --head`, default port 6379), or run "
            "`ray job submit --address {address} -- potion ...` without --address"
        )
    if addr.startswith("ray://"):
        addr = addr[len("ray://"):]
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise PotionError(
            f"Ray address '{address}' is not of the form host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)"
        )
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connect to the cluster's port, so that a dead address fails in seconds
    (``ray.init`` itself retries an unreachable GCS for a long time)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise PotionError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start one with "
            f"`ray start --head --port {port}` on that machine, check the address (the RAY_ADDRESS "
            "environment variable or --address), or leave both unset to run on a local Ray instance"
        ) from None


def _resolve_auto() -> str:
    from ray._private.services import canonicalize_bootstrap_address

    try:
        addr = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        addr = None
    if not addr:
        raise PotionError(
            "address 'auto' found no running Ray cluster on this machine; start one with "
            "`ray start --head`, or leave the address unset to run on a local Ray instance"
        )
    return addr


def connect(address: str | None = None, num_cpus: int | None = None, py_modules: list[str] | None = None,
            watch: tuple[str, Path | None] | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local one.

    ``num_cpus`` sizes only a local instance; a running cluster has its own resources
    (Ray refuses the argument there). ``py_modules``: the user's model files, shipped to
    every worker through Ray's runtime_env so that a class installed nowhere can be
    rebuilt there. ``watch``: (what this run is, its ``--out`` or None) for a watchdog that
    reports and cleans up if Ray (or a SIGKILL) ends this process before
    ``shutdown_if_owned`` (see ``potion.distributed.leftovers``). Already connected → no-op.
    """
    import ray

    _quiet_env()
    if ray.is_initialized():
        return
    record = None
    if watch is not None and watch[1] is not None:
        from potion.distributed.leftovers import record_beside, stop_recorded

        record = record_beside(watch[1])
        stop_recorded(record)  # what a run on the same --out that was killed outright left
    _connect(ray, address, num_cpus, py_modules)
    if watch is not None:
        start_watch(*watch, record=record)


def start_watch(what: str, out: Path | None, resume: str | None = None, record: Path | None = None) -> None:
    """Start the watchdog of this process (once), and write the processes of an owned Ray
    instance to ``record`` for a rerun; ``shutdown_if_owned`` stops both."""
    global _watchdog, _record
    import atexit

    from potion.distributed.leftovers import ray_record, start_watchdog, write_record

    if _watchdog is None:
        started = ray_record()
        if record is not None and _owned:
            write_record(record, started)
            _record = Path(record)
        kwargs = {"resume": resume} if resume else {}
        _watchdog = start_watchdog(what, out, started, record_file=_record, **kwargs)
        atexit.register(stop_watch)


def stop_watch() -> None:
    global _watchdog, _record
    if _watchdog is not None:
        _watchdog.close()
        _watchdog = None
    if _record is not None:
        _record.unlink(missing_ok=True)
        _record = None


def _connect(ray, address: str | None, num_cpus: int | None, py_modules: list[str] | None) -> None:
    global _owned
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    runtime_env = _runtime_env(py_modules)
    if runtime_env:
        common["runtime_env"] = runtime_env
    if address:
        if num_cpus is not None:
            raise PotionError(
                f"--num-cpus only sizes a local Ray instance; the cluster at {address} has its own "
                "resources. Drop --num-cpus or the address."
            )
        target = _resolve_auto() if address == "auto" else address
        check_reachable(target)
        set_auth_mode(joining=True)
        try:
            ray.init(address=address, **common)
        except Exception as e:  # ConnectionError, AuthenticationError, version mismatch ...
            raise PotionError(
                f"could not join the Ray cluster at {address}: {type(e).__name__}: {_first_line(e)}. "
                f"If the cluster uses token authentication set {AUTH_ENV}=token (and RAY_AUTH_TOKEN); "
                "the cluster must run the same Ray and Python versions as this machine."
            ) from None
        _owned = False
        reinstall()  # ray.init made SIGTERM call sys.exit; a SIGTERM must unwind like Ctrl-C
        return
    if num_cpus is not None and num_cpus < 1:
        raise PotionError(f"--num-cpus must be at least 1, got {num_cpus}")
    set_auth_mode(joining=False)
    _start_local(num_cpus, common)
    _owned = True
    reinstall()


# Ray waits 30 s for a new node to register with its GCS, then gives up with "the GCS has
# become overloaded"; on a loaded machine (a test suite beside two benchmarks) that happens
# to a start that would have succeeded a little later. The retry waits this long instead.
START_RETRY_WAIT_S = 120.0
_STARTUP_TIMEOUTS = ("timed out during startup", "gcs has become overloaded", "timed out waiting for node",
                     "timed out after", "failed to connect to gcs")


def _is_startup_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, TimeoutError) or any(t in text for t in _STARTUP_TIMEOUTS)


def _start_local(num_cpus: int | None, common: dict) -> None:
    """``ray.init`` of a private local instance, tried once more with a longer wait when
    the first start timed out; a start that fails leaves none of its processes behind."""
    import ray

    for attempt, wait in enumerate((None, START_RETRY_WAIT_S)):
        try:
            # "local" (not None): never silently join a cluster that `ray start` left running.
            with _stop_new_children_on_failure(), _kernel_chosen_agent_port(), _patient_node_wait(wait):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
            return
        except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception for this timeout
            if not _is_startup_timeout(e):
                raise
            if attempt == 1:
                raise PotionError(
                    f"the local Ray instance did not start, twice (the second time after waiting "
                    f"{START_RETRY_WAIT_S:.0f} s): {_first_line(e)}. The machine is probably overloaded: "
                    "rerun when other jobs have finished, or start a cluster with `ray start --head` and "
                    "pass its address with --address", detail=detail_of(e)
                ) from None
            print(f"potion: note: the local Ray instance timed out while starting ({_first_line(e)}); "
                  f"trying once more with a {START_RETRY_WAIT_S:.0f} s wait", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _patient_node_wait(wait_s: float | None) -> Iterator[None]:
    """Within the block, Ray's wait for a starting node to register lasts ``wait_s``
    seconds instead of its fixed 30 (``None``: Ray's own). Ray polls ``services.get_node``
    until a hard-coded deadline, so the swapped-in function keeps polling until ours."""
    from ray._private import services

    original = getattr(services, "get_node", None)
    if wait_s is None or original is None:
        yield
        return

    deadline = time.monotonic() + wait_s

    def get_node(*args, **kwargs):
        while True:
            try:
                return original(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


@contextlib.contextmanager
def _stop_new_children_on_failure() -> Iterator[None]:
    """When the block raises, stop this process's child processes that it started (a Ray
    start that failed half-way leaves its GCS and raylet running otherwise) and forget Ray's
    half-built state, so that the next ``ray.init`` starts clean."""
    import psutil
    import ray

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    except BaseException:
        new = [p for p in me.children(recursive=True) if p.pid not in before]
        with contextlib.suppress(Exception):
            ray.shutdown()
        for p in new:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(new, timeout=5)
        raise


AGENT_PORT_ARG = "dashboard_agent_listen_port"


@contextlib.contextmanager
def _kernel_chosen_agent_port() -> Iterator[None]:
    """Within the block, a Ray node started by ``ray.init`` asks the kernel for its dashboard
    agent's HTTP port (0) instead of the fixed 52365 (see the module docstring).

    ``ray.init`` builds its ``RayParams`` without that argument, so the class is swapped, for
    the length of the call, for one whose default is 0; Ray's own multi-node test clusters
    start their agents on port 0 the same way. If a later Ray drops the argument, the swap
    is skipped and Ray's default applies.
    """
    from ray._private import parameter

    original = parameter.RayParams
    if AGENT_PORT_ARG not in inspect.signature(original.__init__).parameters:
        yield
        return

    class _RayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault(AGENT_PORT_ARG, 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _runtime_env(py_modules: list[str] | None) -> dict | None:
    if not py_modules:
        return None
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_env = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if job_env:
        # Inside `ray job submit`: Ray refuses to merge two py_modules lists; a job that
        # ships its own modules keeps them (and its --working-dir holds the model file).
        import json

        if (json.loads(job_env).get("runtime_env") or {}).get("py_modules"):
            return None
    return {"py_modules": list(py_modules)}


def owned() -> bool:
    return _owned


def worker_device(device: str = "auto") -> str:
    """Inside a Ray task or actor: ``device``, with ``auto`` read as CUDA when Ray gave this
    worker a GPU and torch can use it, else the CPU."""
    if device != "auto":
        return device
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def shutdown_if_owned() -> None:
    """Stop the Ray instance if this process started it; leave a joined cluster alone.
    Either way the run is over: its watchdog stops."""
    global _owned
    import ray

    try:
        if _owned and ray.is_initialized():
            ray.shutdown()
    finally:
        _owned = False
        stop_watch()


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 when none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"

