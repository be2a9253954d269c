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

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from potion.errors import PotionError
from potion.tracking.context import DataInput, QuietLogger, SystemMetrics, command_line, source_tags
from potion.tracking.plots import neggrad_figure, tradeoff_figure
from potion.tracking.steps import _chunks, _numeric, _step_dict, child_fields, child_run_name, update_run_name
from potion.tracking.store import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, check_tracking, default_artifact_root, release_store,
)
from potion.tracking.tune_callback import _batched_logger_callback

CHOSEN_TAG = "potion.chosen"  # "true" on the child run of the step the heal kept
MAX_TAG = 8000  # characters MLflow keeps of a tag value
PLOT_FILE = "plots/ptn_tradeoff.png"
NEGGRAD_PLOT_FILE = "plots/neggrad.png"
MODEL_NAME = "healed_model"  # the mlflow.pytorch model's name (shown under "Logged models")


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


class SearchTracker:
    """Context manager around one parent MLflow run.

    ``params`` (the config) are logged once on entry, with Source (``source``, or the
    command line of ``potion …``) and Created-by; while the run is open the machine's
    ``system/…`` metrics are sampled (``system_metrics``). Per-step child runs come either
    from :meth:`tune_callback` (a Tune run's trials, live) or :meth:`log_children` (a
    finished search, in k order) — never both. Every ``log_*`` call is idempotent: what was
    logged once is not logged again.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
                 artifact_root: str | Path | None = None, tags: Mapping[str, str] | None = None,
                 source: str = "potion", system_metrics: bool = True):
        if not uri:
            raise PotionError("SearchTracker needs an explicit tracking URI")
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = flatten_params(params or {})
        self.artifact_root = Path(artifact_root) if artifact_root else default_artifact_root(uri)
        self.tags = dict(tags or {})
        self.source = source
        self.system_metrics = system_metrics
        self._system: SystemMetrics | None = None
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
        run = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                     tags={**source_tags(command_line(self.source)), **self.tags})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, self.params)
        if self.system_metrics:
            self._system = SystemMetrics(self.uri, self.parent_run_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._end(exc_type, exc)
        finally:
            if self.client is not None:
                release_store(self.uri)

    def _end(self, exc_type, exc) -> bool:
        if self.client is None or self.parent_run_id is None:
            return False
        if self._system is not None:
            self._system.finish()  # while the run is still RUNNING: the sampler stops at the end
            self._system = None
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

    def log_children(self, trace: Iterable[Any], k_star: int | None = None,
                     guard: Mapping[str, Any] | None = None) -> int:
        """One child run per evaluated step, created in k order (the run list and the compare
        view then show the steps around k* first). Metrics: the step's fields and, where
        the damage guard measured the step, ``proxy_damage``. The chosen step's child is
        named ``k=043 ✓ chosen`` and tagged ``potion.chosen=true``. Steps already logged,
        or all of them when the Tune callback logs the children, are skipped. Returns how
        many child runs were created."""
        self._require()
        if self._children_by_callback:
            return 0
        damage = (guard or {}).get("damage") or {}
        made = 0
        t0 = int(time.time() * 1000)
        for i, d in enumerate(sorted((_step_dict(s) for s in trace), key=lambda d: d["k"])):
            k = int(d["k"])
            if not self._once(f"child:{k}"):
                continue
            chosen = k_star is not None and k == int(k_star)
            values = {**d, "proxy_damage": damage.get(str(k))}
            self._child(child_run_name(k, chosen), t0 + i, chosen, _numeric(values, child_fields()), {"k": k})
            made += 1
        return made

    def _child(self, name: str, at: int, chosen: bool, metrics: Mapping[str, float], params: Mapping[str, Any]) -> None:
        """One finished child run of the parent, started at ``at`` (ms)."""
        from mlflow.entities import Metric, Param

        # start times one millisecond apart: equal times would leave the UI's order to chance
        run = self.client.create_run(self.experiment_id, run_name=name, start_time=at,
                                     tags={"mlflow.parentRunId": self.parent_run_id, **self.tags,
                                           CHOSEN_TAG: str(chosen).lower()})
        self.client.log_batch(run.info.run_id, metrics=[Metric(k, v, at, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, "FINISHED", end_time=at)

    def log_updates(self, record: Mapping[str, Any], max_damage: float) -> int:
        """potion_plus's NegGrad+ checks (``record``: its ``info.plus.neggrad``): one child run
        per check, named ``update=060`` in update order (``✓ chosen`` on the one kept), with its
        held-out and deletion-set accuracy and proxy damage; on the parent the kept check's
        values and the plot ``plots/neggrad.png``. Returns how many child runs were created."""
        self._require()
        checks = sorted(record.get("checks") or [], key=lambda c: c["step"])
        picked = record.get("picked")
        made = 0
        t0 = int(time.time() * 1000)
        for i, c in enumerate(checks):
            if not self._once(f"update:{c['step']}"):
                continue
            chosen = c["step"] == picked
            values = {"update": c["step"], "acc_held_out": c.get("acc_held_out"), "acc_forget": c.get("acc_forget"),
                      "proxy_damage": c.get("damage"), "proxy_erosion": c.get("erosion")}
            self._child(update_run_name(c["step"], chosen), t0 + i, chosen, _numeric(values, values),
                        {"update": c["step"]})
            made += 1
        if checks and self._once("neggrad_plot"):
            kept = next((c for c in checks if c["step"] == picked), None)
            summary = {"neggrad_threshold": record.get("threshold")}
            if kept is not None:  # the kept model's values (else the dampening's, from log_curve)
                summary.update(neggrad_update=kept["step"], acc_held_out=kept.get("acc_held_out"),
                               proxy_damage=kept.get("damage"), proxy_erosion=kept.get("erosion"),
                               max_damage=max_damage)
            self.log_metrics(summary)
            self.client.log_figure(self.parent_run_id, neggrad_figure(record, max_damage), NEGGRAD_PLOT_FILE)
        return made

    # -- the parent: the choice, the plot, the description -----------------------
    def log_curve(self, trace: Sequence[Any], threshold: float | None = None, k_star: int | None = None,
                  guard: Mapping[str, Any] | None = None) -> None:
        """The trade-off plot, and the choice on the parent: with ``k_star``, the chosen
        step's own values under the plain field names (``acc_forget``, ``s``, ``alpha``,
        ``proxy_damage``, ...) with ``k_star``. The curve itself stays in the children and
        the plot: a parent metric is the kept model's value or a setting, never another
        step's. With ``guard`` (xlf_ptn_guard) also δ, θ0's proxy accuracy, the paper's k*
        and the reason for the chosen step (tag ``guard_reason``)."""
        from mlflow.entities import Metric

        self._require()
        steps = sorted((_step_dict(s) for s in trace), key=lambda d: d["k"])
        if not steps or not self._once("curve"):
            return
        if guard:
            damage = guard.get("damage") or {}
            steps = [{**d, "proxy_damage": damage.get(str(int(d["k"])))} for d in steps]
        now = int(time.time() * 1000)
        metrics = []
        if guard:
            proxy0 = guard.get("proxy0") or {}
            summary = {"max_damage": guard.get("max_damage"), "proxy0_acc": proxy0.get("acc"),
                       "proxy0_n_excluded": proxy0.get("n_excluded"), "k_paper": guard.get("k_paper"),
                       "poison_share_est": guard.get("poison_share"), "guard_probes": len(guard.get("probes") or [])}
            metrics += [Metric(key, v, now, 0) for key, v in _numeric(summary, list(summary)).items()]
            self.client.set_tag(self.parent_run_id, "guard_reason", str(guard.get("reason", ""))[:5000])
        hit = [d for d in steps if d["k"] == k_star]
        if hit:
            chosen = {"k_star": hit[0]["k"], **_numeric(hit[0], [f for f in child_fields() if f != "k"])}
            metrics += [Metric(key, v, now, 0) for key, v in _numeric(chosen, chosen).items()]
        if threshold is not None:
            metrics.append(Metric("threshold", float(threshold), now, 0))
        self._log_metric_list(self.parent_run_id, metrics)
        self.client.log_figure(self.parent_run_id, tradeoff_figure(steps, threshold, k_star, guard), PLOT_FILE)

    def set_description(self, markdown: str) -> None:
        """The parent run's description (the run page's "Description" box, markdown)."""
        self.set_tags({"mlflow.note.content": markdown})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._require()
        for key, value in tags.items():
            self.client.set_tag(self.parent_run_id, key, str(value)[:MAX_TAG])

    def log_inputs(self, datasets: Sequence[DataInput] = (), model_ids: Sequence[str] = ()) -> None:
        """Datasets the run read (name, digest, context) and logged models it started from,
        as the run's inputs (the run page's "Datasets used" and model links)."""
        from mlflow.entities import LoggedModelInput

        self._require()
        ds = [d.entity() for d in datasets if self._once(f"dataset:{d.context}:{d.name}")]
        models = [LoggedModelInput(m) for m in model_ids if self._once(f"model_input:{m}")]
        if ds or models:
            self.client.log_inputs(self.parent_run_id, datasets=ds or None, models=models or None)

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
        quiet = QuietLogger("mlflow.pytorch")  # its pickle warning is the documented trade-off above
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(self.uri), quiet:
                info = mlflow.pytorch.log_model(
                    model, name=MODEL_NAME, run_id=self.parent_run_id, model_id=logged.model_id,
                    signature=signature, pip_requirements=reqs, registered_model_name=registered_name,
                    serialization_format="pickle",
                )
        finally:
            # MLflow leaves the variable unset on the way out (it restores its own global,
            # not the environment): the process's next run would lose the user's store.
            if user_uri is not None:
                os.environ["MLFLOW_TRACKING_URI"] = user_uri
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

