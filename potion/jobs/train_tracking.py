"""``potion train``'s MLflow run: the config, the training data as a dataset input, the
metrics, the checkpoint and the model as an MLflow logged model; a heal of the run folder
links to that model (``mlflow_run.json``)."""
from __future__ import annotations

from pathlib import Path

from potion.config import to_dict
from potion.io import atomic_write_json
from potion.models.spec import file_sha256
from potion.runs.configs import TrainJob
from potion.runs.folder import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, MODEL_FILE


def check_train_tracking(job: TrainJob, out: Path) -> None:
    """A store the user named must answer before training starts, not after."""
    from potion.tracking.store import check_tracking, configured_tracking_uri, default_tracking_uri

    uri = configured_tracking_uri(job.tracking_uri)
    if uri and uri != "none":
        check_tracking(uri)
    elif uri is None:
        default_tracking_uri(out)  # an --out the default sqlite URI cannot hold fails here


def log_train_run(job: TrainJob, stage: Path, final_out: Path, model, example, metrics: dict,
                  n_train: int) -> dict | None:
    """Log the finished run folder in ``stage`` (to be moved to ``final_out``) as one MLflow
    run; writes ``mlflow_run.json`` there and returns what it holds (None: tracking is off)."""
    from potion.tracking.context import RUN_TRACKING_FILE, DataInput
    from potion.tracking.store import relocate_sqlite_store, resolve_tracking_uri
    from potion.tracking.tracker import SearchTracker

    final_uri = resolve_tracking_uri(job.tracking_uri, final_out)
    if final_uri is None:
        return None
    uri = resolve_tracking_uri(job.tracking_uri, stage)  # the default store is built in the stage, moved with it

    data = DataInput(name=job.data.dataset, digest=file_sha256(stage / MANIFEST_FILE), context="training",
                     rows=n_train, source={"dataset": job.data.dataset, "args": job.data.args,
                                           "poison": to_dict(job.poison)})
    with SearchTracker(uri, job.experiment, run_name=f"train:{final_out.name}", params=to_dict(job),
                       source="potion train") as tracker:
        tracker.log_inputs([data])
        model_id = tracker.log_pytorch_model(model, example)
        tracker.log_metrics(metrics, model_id=model_id)
        tracker.log_model(stage / MODEL_FILE)
        tracker.log_files([stage / METRICS_FILE, stage / CONFIG_FILE, stage / MANIFEST_FILE])
        ids = {"tracking_uri": final_uri, "experiment": job.experiment, "experiment_id": tracker.experiment_id,
               "run_id": tracker.run_id, "model_id": model_id}
    if uri != final_uri:
        relocate_sqlite_store(stage / "mlflow.db", stage.resolve(), final_out.resolve())
    atomic_write_json(stage / RUN_TRACKING_FILE, ids)
    return ids
