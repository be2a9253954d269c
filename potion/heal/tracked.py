"""Which MLflow store a heal logs to (``--tracking-uri``, ``MLFLOW_TRACKING_URI`` or a sqlite
file in the output folder), and the parent run it opens there."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from potion.config import to_dict
from potion.heal.inputs import HealInputs
from potion.runs.configs import HealJob


def resolve_tracking_uri(job: HealJob, out: Path) -> str | None:
    uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri == "none":
        return None
    if uri:
        return uri
    from potion.tracking.store import default_tracking_uri

    return default_tracking_uri(out)


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
                         artifact_root=default_artifact_root(uri))
