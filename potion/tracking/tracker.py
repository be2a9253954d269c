"""MLflow tracking of a heal: one parent run per search, one child run per evaluated step.

Every call names its tracking URI (MLflow >= 3.7 would otherwise write ``mlflow.db`` into
whatever the current folder is), and everything goes through an ``MlflowClient`` with
explicit run ids rather than MLflow's process-wide "active run", so Ray Tune's MLflow
callback (which also sets the global URI) cannot break the parent run.

On one machine the default store is ``sqlite:///<out>/mlflow.db`` with artifacts in
``<out>/mlruns``. With Ray workers on other machines a sqlite file is not reachable from
them, but it need not be: the Tune callback writes every child run from the driver.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlparse

from potion.errors import PotionError

CHECK_TIMEOUT_S = 5.0
CURVE_PREFIX = "curve/"  # the trade-off curve on the parent run, stepped by k
PLOT_FILE = "plots/ptn_tradeoff.png"
MODEL_NAME = "healed_model"  # the mlflow.pytorch model's name (shown under "Logged models")
# MLflow 3's UI opens an experiment in its GenAI view unless told otherwise: the experiment
# tag below is what the UI sets when a user picks "Model training", and the URL parameter
# is what the 3.x UI reads first (ui_url adds it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_VIEW_QUERY = "workflowType=machine_learning"


def step_fields() -> tuple[str, ...]:
    """The fields of a PTN step, as MLflow metrics: whatever StepResult holds today."""
    from potion.unlearning.ptn import StepResult

    return tuple(f.name for f in dataclasses.fields(StepResult))


def child_run_name(k: int) -> str:
    """``k=043``: sorts in k order in the UI's run list."""
    return f"k={int(k):03d}"


def mlflow_executable() -> list[str]:
    """The ``mlflow`` of the interpreter running Potion, by absolute path: it works in a
    fresh shell where the venv is not activated (a bare ``mlflow`` does not)."""
    script = Path(sys.executable).parent / "mlflow"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mlflow"]


def ui_command(uri: str, experiment_id: str | None = None, run_id: str | None = None,
               port: int = 5000) -> tuple[str, str]:
    """(shell command that serves the MLflow UI on ``uri``, the link to open)."""
    args = [*mlflow_executable(), "ui", "--backend-store-uri", uri, "--port", str(port)]
    return " ".join(shlex.quote(a) for a in args), ui_url(f"http://127.0.0.1:{port}", experiment_id, run_id)


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI that opens in the model-training view."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{UI_VIEW_QUERY}"
    page = f"{base}/#/experiments/{experiment_id}"
    if run_id is not None:
        page += f"/runs/{run_id}"
    return f"{page}?{UI_VIEW_QUERY}"


def default_tracking_uri(out: str | Path) -> str:
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def default_artifact_root(uri: str) -> Path | None:
    """``<folder of the sqlite file>/mlruns`` for a sqlite store, else the server's choice."""
    path = _sqlite_path(uri)
    return None if path is None else path.parent / "mlruns"


def _sqlite_path(uri: str) -> Path | None:
    # SQLAlchemy's form: sqlite:///relative/file.db or sqlite:////absolute/file.db
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def check_tracking(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, before any compute, when the tracking store cannot be used.

    MLflow's own client retries an unreachable server with exponential backoff for
    minutes, so a stopped server would otherwise surface only after the whole heal.
    """
    if not uri or not isinstance(uri, str):
        raise PotionError("the MLflow tracking URI is empty; pass --tracking-uri (e.g. sqlite:///out/mlflow.db)")
    scheme = urlparse(uri).scheme
    _check_scheme(uri, scheme)
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        _check_writable_dir(path, uri)
    # databricks://, other plugins: nothing cheap to check; MLflow reports problems itself.


def _check_scheme(uri: str, scheme: str) -> None:
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        known = sorted(k for k in _tracking_store_registry._registry if k)
    except (ImportError, AttributeError):  # a future MLflow: let it judge the URI itself
        return
    if scheme not in known and scheme != "":
        raise PotionError(
            f"MLflow tracking URI {uri}: unknown scheme '{scheme}://' (MLflow knows {', '.join(known)}); "
            "use e.g. sqlite:///<folder>/mlflow.db, http://host:5000, or 'none' to disable tracking"
        )


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    _check_writable_dir(path.parent, uri)
    if path.exists():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S) as con:
                con.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise PotionError(
                f"MLflow tracking store {uri}: {path} exists but is not a usable sqlite database ({e}); "
                "point --tracking-uri at another file"
            ) from None


def _check_writable_dir(path: Path, uri: str) -> None:
    import os

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PotionError(f"MLflow tracking store {uri}: cannot create folder {path} ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PotionError(f"MLflow tracking store {uri}: folder {path} is not writable; "
                          "pass another --tracking-uri (or 'none')")


def _check_server(uri: str, timeout: float) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise PotionError(
        f"the MLflow tracking server at {uri} does not answer ({problem} from {health}). Start it, e.g. "
        f"`mlflow server --host 0.0.0.0 --port {urlparse(uri).port or 5000} --backend-store-uri "
        "sqlite:///mlflow.db`, or pass --tracking-uri sqlite:///<folder>/mlflow.db to track into a local file"
    )


def relocate_sqlite_store(db: str | Path, old: str | Path, new: str | Path) -> int:
    """Rewrite every location under folder ``old`` recorded in the sqlite store ``db`` to
    lie under ``new`` (both plain paths and ``file://`` URIs); returns rows changed.

    A store built in a staging folder records absolute artifact locations there; after
    the folder is moved into place they must point into the final folder. Every text
    column of every table is rewritten, so no knowledge of MLflow's schema is assumed;
    the staging folder's name is unique, so nothing else can match.
    """
    old, new = Path(old).absolute(), Path(new).absolute()
    pairs = [(old.as_uri(), new.as_uri()), (str(old), str(new))]
    changed = 0
    con = sqlite3.connect(str(db), timeout=30)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'pragma table_info("{table}")') if "CHAR" in (r[2] or "").upper()
                    or "TEXT" in (r[2] or "").upper() or "CLOB" in (r[2] or "").upper()]
            for col in cols:
                for a, b in pairs:
                    cur = con.execute(f'update "{table}" set "{col}" = replace("{col}", ?, ?) '
                                      f'where instr("{col}", ?) > 0', (a, b, a))
                    changed += cur.rowcount
        con.commit()
    finally:
        con.close()
    return changed


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``a.b`` keys with string values MLflow accepts (≤ 6000 characters)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def _step_dict(step: Any) -> dict[str, Any]:
    return step.to_dict() if hasattr(step, "to_dict") else dict(step)


def _numeric(d: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        v = d.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class SearchTracker:
    """Context manager around one parent MLflow run.

    ``params`` (the config) are logged once on entry; per-step child runs come either from
    :meth:`tune_callback` (Ray backend; written by the driver) or :meth:`log_children`
    (local backend) — never both. Every ``log_*`` call is idempotent: what was logged once
    is not logged again.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
                 artifact_root: str | Path | None = None, tags: Mapping[str, str] | None = None):
        if not uri:
            raise PotionError("SearchTracker needs an explicit tracking URI")
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = flatten_params(params or {})
        self.artifact_root = Path(artifact_root) if artifact_root else default_artifact_root(uri)
        self.tags = dict(tags or {})
        self.client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._children_by_callback = False
        self._logged: set[str] = set()

    # -- lifetime -----------------------------------------------------------------
    def __enter__(self) -> "SearchTracker":
        from mlflow import MlflowClient

        check_tracking(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if self.artifact_root is not None:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
                location = self.artifact_root.resolve().as_uri()
            self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:  # a user's own choice stays
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, self.params)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.client is None or self.parent_run_id is None:
            return False
        if exc is None:
            self.client.set_terminated(self.parent_run_id, "FINISHED")
            return False
        # An interrupted search is KILLED, a failed one FAILED; trials that were still in
        # flight (their child runs are RUNNING) end the same way, so nothing stays RUNNING.
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_tag(self.parent_run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            for run in self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                max_results=50000,
            ):
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    self.client.set_terminated(run.info.run_id, status)
            self.client.set_terminated(self.parent_run_id, status)
        except Exception:  # noqa: BLE001 — never hide the error that ended the search
            pass
        return False

    @property
    def run_id(self) -> str | None:
        return self.parent_run_id

    def _require(self) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("SearchTracker used outside its `with` block")

    def _once(self, key: str) -> bool:
        """True the first time ``key`` is seen: the caller logs; afterwards it skips."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(run_id, params=chunk)

    def _log_metric_list(self, run_id: str, metrics: list) -> None:
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    # -- children -----------------------------------------------------------------
    def tune_callback(self):
        """Ray Tune callback that logs each trial as a child run of the parent run.

        The explicit ``tracking_uri`` matters: without it the callback resets the
        process's URI and the parent run is no longer found.
        """
        self._require()
        self._children_by_callback = True
        return _batched_logger_callback()(
            tracking_uri=self.uri, experiment_name=self.experiment,
            tags={"mlflow.parentRunId": self.parent_run_id, **self.tags},
        )

    def log_children(self, trace: Iterable[Any]) -> int:
        """One child run per evaluated step (local backend). Steps already logged, or all
        of them when the Tune callback logs the children, are skipped. Returns how many
        child runs were created."""
        from mlflow.entities import Metric, Param

        self._require()
        if self._children_by_callback:
            return 0
        made = 0
        for step in trace:
            d = _step_dict(step)
            if not self._once(f"child:{int(d['k'])}"):
                continue
            run = self.client.create_run(self.experiment_id, run_name=child_run_name(d["k"]),
                                         tags={"mlflow.parentRunId": self.parent_run_id, **self.tags})
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in _numeric(d, step_fields()).items()]
            self.client.log_batch(run.info.run_id, metrics=metrics, params=[Param("k", str(int(d["k"])))])
            self.client.set_terminated(run.info.run_id, "FINISHED")
            made += 1
        return made

    # -- the parent's curve and results -------------------------------------------
    def log_curve(self, trace: Sequence[Any], threshold: float | None = None, k_star: int | None = None,
                  guard: Mapping[str, Any] | None = None) -> None:
        """The trade-off curve as parent metrics ``curve/<field>`` stepped by k, and a PNG
        plot of it. With ``k_star``, the chosen step's own values go on the parent under
        the plain field names (``acc_forget``, ``s``, ``alpha``, ...) with ``k_star``: the
        numbers the run table shows are those of the model that was kept. With ``guard``
        (xlf_ptn_guard) also the proxy damage per step, δ, θ0's proxy accuracy and the
        reason for the chosen step (tag ``guard_reason``)."""
        from mlflow.entities import Metric

        self._require()
        steps = sorted((_step_dict(s) for s in trace), key=lambda d: d["k"])
        if not steps or not self._once("curve"):
            return
        if guard:
            damage = guard.get("damage") or {}
            steps = [{**d, "proxy_damage": damage.get(str(int(d["k"])))} for d in steps]
        now = int(time.time() * 1000)
        fields = [f for f in step_fields() if f != "k"] + (["proxy_damage"] if guard else [])
        metrics = [Metric(CURVE_PREFIX + key, v, now, int(d["k"]))
                   for d in steps for key, v in _numeric(d, fields).items()]
        if guard:
            proxy0 = guard.get("proxy0") or {}
            summary = {"max_damage": guard.get("max_damage"), "proxy0_acc": proxy0.get("acc"),
                       "proxy0_n_excluded": proxy0.get("n_excluded"), "k_paper": guard.get("k_paper"),
                       "poison_share_est": guard.get("poison_share"), "guard_probes": len(guard.get("probes") or [])}
            metrics += [Metric(key, v, now, 0) for key, v in _numeric(summary, list(summary)).items()]
            self.client.set_tag(self.parent_run_id, "guard_reason", str(guard.get("reason", ""))[:5000])
        hit = [d for d in steps if d["k"] == k_star]
        if hit:
            chosen = {"k_star": hit[0]["k"], **_numeric(hit[0], fields)}
            metrics += [Metric(key, v, now, 0) for key, v in _numeric(chosen, chosen).items()]
        if threshold is not None:
            metrics.append(Metric("threshold", float(threshold), now, 0))
        self._log_metric_list(self.parent_run_id, metrics)
        self.client.log_figure(self.parent_run_id, tradeoff_figure(steps, threshold, k_star, guard), PLOT_FILE)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None) -> None:
        """Final numbers on the parent run (e.g. attack metrics before and after healing);
        with ``model_id`` they are also the logged model's metrics in the UI."""
        from mlflow.entities import Metric

        self._require()
        now = int(time.time() * 1000)
        todo = [Metric(k, v, now, step or 0, model_id=model_id) for k, v in _numeric(metrics, list(metrics)).items()
                if self._once(f"metric:{k}:{step}")]
        self._log_metric_list(self.parent_run_id, todo)

    def log_model(self, checkpoint_path: str | Path) -> None:
        """The potion checkpoint file as artifact ``model/<name>`` (load it back with
        ``potion.models.load_checkpoint``)."""
        self._log_file(Path(checkpoint_path), "model")

    def log_pytorch_model(self, model, example_input, *, registered_name: str | None = None) -> str | None:
        """The healed model as an MLflow model (``mlflow.pytorch``), linked to the parent
        run, so it is listed under "Logged models" and loads with
        ``mlflow.pytorch.load_model(f"models:/{model_id}")``; with ``registered_name`` it is
        also registered in the model registry. Returns the model id.

        The model is pickled by class (not the "pt2" export, which fixes the batch size and
        fails on some models), so loading it needs ``potion`` importable; the pip
        requirements are given rather than inferred (inference would load the model in a
        subprocess, for seconds, on every heal).
        """
        self._require()
        if not self._once("pytorch_model"):
            return None
        try:
            return self._log_pytorch_model(model, example_input, registered_name)
        except Exception as e:  # noqa: BLE001  (pickling a user's own class can fail many ways)
            # The checkpoint file is logged regardless; a model that cannot be pickled for
            # MLflow must not fail a heal whose outputs are already written.
            msg = f"{type(e).__name__}: {e}"[:4000]
            self.client.set_tag(self.parent_run_id, "potion.mlflow_model_error", msg)
            print(f"potion: warning: the healed model was not logged as an MLflow model ({msg}); "
                  "the checkpoint artifact model/model.pt is there", file=sys.stderr)
            return None

    def _log_pytorch_model(self, model, example_input, registered_name: str | None) -> str:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        model = model.cpu().eval()
        x = example_input[:2].detach().cpu().float()
        with torch.no_grad():
            y = model(x)
        signature = infer_signature(x.numpy(), y.numpy().astype(np.float32))
        from importlib.metadata import PackageNotFoundError, version

        try:
            potion_req = f"potion=={version('potion')}"
        except PackageNotFoundError:
            potion_req = "potion"
        reqs = [f"torch=={torch.__version__.split('+')[0]}", potion_req]
        # Created here, in this experiment: left to itself, log_model would file the model
        # under the process's active experiment, not the run's.
        logged = self.client.create_logged_model(self.experiment_id, name=MODEL_NAME, source_run_id=self.parent_run_id,
                                                 params={k: v for k, v in self.params.items() if len(v) <= 500})
        quiet = _QuietLogger("mlflow.pytorch")  # its pickle warning is the documented trade-off above
        with _use_tracking_uri(self.uri), quiet:
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, run_id=self.parent_run_id, model_id=logged.model_id, signature=signature,
                pip_requirements=reqs, registered_model_name=registered_name, serialization_format="pickle",
            )
        return info.model_id

    def log_files(self, paths: Iterable[str | Path], artifact_path: str = "outputs") -> None:
        """Manifest, deletion set, report... as artifacts under ``artifact_path``."""
        for p in paths:
            self._log_file(Path(p), artifact_path)

    def _log_file(self, path: Path, artifact_path: str) -> None:
        self._require()
        if not path.is_file():
            raise PotionError(f"cannot log {path} to MLflow: it does not exist or is not a file")
        if self._once(f"file:{artifact_path}/{path.name}"):
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path)


class _QuietLogger:
    """Raise one logger's level to ERROR for the duration of a ``with`` block."""

    def __init__(self, name: str):
        import logging

        self.logger, self.level = logging.getLogger(name), logging.ERROR

    def __enter__(self):
        self.saved = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.saved)
        return False


def _batched_logger_callback():
    """Ray's ``MLflowLoggerCallback`` with one ``log_batch`` per trial result.

    The stock callback sends every metric of a result as its own request (on sqlite, its
    own transaction), on the driver, inside Tune's event loop: with a few milliseconds of
    evaluation per trial that is a large share of the search's wall time.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class BatchedMLflowLoggerCallback(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            # Ray names the run after the trial ("ptn_trial_299a61f0"); the step k says more.
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial)}
                run = self.mlflow_util.start_run(tags=tags, run_name=child_run_name(trial.config["k"]))
                self._trial_runs[trial] = run.info.run_id
            if not self.log_params_on_trial_end:
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial.config)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            if getattr(self, "_client", None) is None:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            now = int(time.time() * 1000)
            # Only the step's own measurements: Tune adds its bookkeeping (timestamp, pid,
            # done, time_this_iter_s, config/k, ...) to every result.
            metrics = [Metric(key, v, now, 0) for key, v in _numeric(result, step_fields()).items()]
            for chunk in _chunks(metrics, 1000):
                self._client.log_batch(self._trial_runs[trial], metrics=chunk)

    return BatchedMLflowLoggerCallback


# How the plot names a step's accuracy fields; a field not listed here (a new one) is
# plotted under its own name.
CURVE_LABELS = {
    "acc_forget": "a_k: accuracy on the deletion set Sf (poisoned labels)",
    "acc_val": "accuracy on clean validation images",
    "acc_proxy": "accuracy on the clean proxy (from Dr)",
}
S_AXIS_LABEL = "PTN dial s_k = (|Sf| / |D|) / b · c^k  (sets α; may exceed 1)"


def curve_fields(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The accuracy fields (``acc_*``) that at least one step has a value for."""
    keys = [f for f in step_fields() if f.startswith("acc_")]
    keys += sorted({k for d in steps for k in d if k.startswith("acc_") and k not in keys})
    return [k for k in keys if any(d.get(k) is not None for d in steps)]


def tradeoff_figure(steps: Sequence[Mapping[str, Any]], threshold: float | None = None, k_star: int | None = None,
                    guard: Mapping[str, Any] | None = None):
    """Every accuracy a step recorded against PTN's dial s_k, with the threshold ρ·acc0 and
    the chosen step k* marked (with ``guard``: the proxy's poison-corrected curve, θ0's
    proxy accuracy, the bound δ and the paper's k*): the trade-off PTN walks along. s_k is not a share of
    parameters (it feeds the percentile q(s) = 100 − ln(1 + 100·s) that sets α, and grows
    past 1), so the axis says what it is. Uses the Agg canvas, never a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = iter("os^vD<>")
    for key in curve_fields(steps):
        pts = [(d["s"], d[key]) for d in steps if d.get(key) is not None]
        ax.plot(*zip(*pts), f"{next(markers, 'o')}-", ms=3, label=CURVE_LABELS.get(key, key))
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold ρ·acc0 = {threshold:.3f}")
    title = "PTN trade-off"
    hit = [d for d in steps if d["k"] == k_star] if k_star is not None else []
    if hit:
        h = hit[0]
        ax.axvline(h["s"], color="red", lw=1, label=f"k* = {k_star} (s = {h['s']:.3g}, α = {h['alpha']:.3g})")
        ax.plot([h["s"]], [h["acc_forget"]], "*", color="red", ms=12)
        title += f": k* = {k_star} of {len(steps)} steps evaluated"
    base = (guard or {}).get("proxy0") or {}
    if guard and base.get("acc") is not None:
        pts = [(d["s"], base["acc"] + d["proxy_damage"] / 100) for d in steps if d.get("proxy_damage") is not None]
        if pts:
            ax.plot(*zip(*pts), "^-", ms=3, color="tab:green", label="proxy, poison-corrected")
        ax.axhline(base["acc"], color="tab:green", ls=":", lw=1, label="θ0 on the proxy")
        ax.axhline(base["acc"] - guard["max_damage"] / 100, color="tab:red", ls=":", lw=1,
                   label=f"damage bound δ = {guard['max_damage']:g} points")
        paper = [d for d in steps if d["k"] == guard.get("k_paper")]
        if paper and guard.get("k_paper") != k_star:
            ax.axvline(paper[0]["s"], color="gray", lw=1, ls="-.", label=f"paper's k* = {guard['k_paper']}")
    ax.set_title(title)
    ax.set_xscale("log")
    ax.set_xlabel(S_AXIS_LABEL)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="center left")  # the curves run along the top and fall on the right
    fig.tight_layout()
    return fig
