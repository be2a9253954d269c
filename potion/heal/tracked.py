"""The parent MLflow run a heal opens in its store (``tracking.store.resolve_tracking_uri``
chooses the store), and the inputs it records there."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from potion.config import to_dict
from potion.heal.inputs import HealInputs
from potion.heal.outputs import DELETION_FILE
from potion.runs.configs import HealJob
from potion.unlearning.cache import hash_arrays


def open_tracker(uri, job: HealJob, inputs: HealInputs, out: Path):
    """A context manager yielding the heal's ``SearchTracker``, or None when tracking is off."""
    if not uri:
        return contextlib.nullcontext(None)
    from potion.tracking.store import default_artifact_root
    from potion.tracking.tracker import SearchTracker

    # SearchTracker flattens the nesting into MLflow's dotted param names (heal.ptn.rho, …)
    params = {"run": str(inputs.provenance.get("run")), "method": job.method, "backend": job.backend,
              "heal": to_dict(job), "provenance": inputs.provenance}
    return SearchTracker(uri, job.experiment, run_name=f"{job.method}:{out.name}", params=params,
                         artifact_root=default_artifact_root(uri), source="potion heal")


def log_heal_inputs(tracker, inputs: HealInputs, deletion: np.ndarray) -> None:
    """The training data and the deletion set as the run's dataset inputs, and the model
    that was healed as its model input when ``potion train`` logged it to the same store
    (otherwise tags name the training run and its store)."""
    from potion.tracking.context import RUN_TRACKING_FILE, DataInput

    data = inputs.provenance.get("data") or {}
    name = str(data.get("dataset") or "training data")
    deletion = np.asarray(deletion, dtype=np.int64)
    tracker.log_inputs([
        DataInput(name=name, digest=data.get("manifest_sha256") or inputs.data_key, context="training",
                  rows=inputs.n_train, source=data),
        DataInput(name="deletion set", digest=hash_arrays(deletion), context="deletion", rows=len(deletion),
                  source={"of": name, "file": DELETION_FILE}),
    ])
    run = inputs.provenance.get("run")
    trained = Path(run) / RUN_TRACKING_FILE if run else None
    if trained is None or not trained.is_file():
        return
    ids = json.loads(trained.read_text())
    tracker.set_tags({"potion.trained_run_id": str(ids.get("run_id")),
                      "potion.trained_tracking_uri": str(ids.get("tracking_uri"))})
    if ids.get("model_id") and ids.get("tracking_uri") == tracker.uri:
        tracker.log_inputs(model_ids=[ids["model_id"]])
