"""What an MLflow run records about where it ran: Source and Created-by, the machine's
system metrics while it runs, and the data it read as dataset inputs."""
from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

# In a `potion train` run folder: the MLflow store, run and logged model of the training, so
# that a heal of that run links to the model it healed.
RUN_TRACKING_FILE = "mlflow_run.json"
DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest
SYSTEM_SAMPLE_S = 5.0  # how often the CPU, memory, disk (and GPU) are sampled


@dataclass(frozen=True)
class DataInput:
    """A dataset a run read: shown on the run page under "Datasets used"."""
    name: str
    digest: str  # a fingerprint of the data (hex); cut to DIGEST_CHARS
    context: str  # "training", "deletion", ... (MLflow's mlflow.data.context tag)
    rows: int
    source: Mapping[str, Any]  # where it came from (paths, dataset name and arguments)

    def entity(self):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=self.name, digest=self.digest[:DIGEST_CHARS], source_type="local",
                     source=json.dumps(dict(self.source), sort_keys=True, default=str),
                     profile=json.dumps({"num_rows": int(self.rows)}))
        return DatasetInput(ds, tags=[InputTag("mlflow.data.context", self.context)])


def source_tags(command: str) -> dict[str, str]:
    """The run page's Source (the command) and Created by (the user); MlflowClient.create_run,
    unlike mlflow.start_run, sets neither."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    return {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "mlflow.user": user}


def command_line(name: str) -> str:
    """The whole command (``potion heal --run …``) when ``name`` (``potion heal``) is what runs,
    else ``name`` (the Python API, a benchmark script, a test)."""
    words = name.split()
    if len(words) == 2 and sys.argv[1:2] == words[1:]:
        return " ".join(["potion", *sys.argv[1:]])[:500]
    return name


class SystemMetrics:
    """MLflow's system-metrics sampler (``system/…`` metrics, stepped by sample) around a run.

    psutil samples CPU, memory, disk and network; GPUs are sampled where ``pynvml``
    (package nvidia-ml-py) is installed. MLflow logs only every full sampling interval,
    so a sample is also taken when the run ends: a short run still gets one.
    """

    def __init__(self, uri: str, run_id: str, interval: float = SYSTEM_SAMPLE_S):
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil missing: the run is still worth having
            print(f"potion: warning: no system metrics in MLflow ({e}); pip install psutil", file=sys.stderr)
            return
        # MLflow tells at INFO that it starts, stops, and skips the GPU on every CPU machine
        with QuietLogger("mlflow.system_metrics"):
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)
            self.monitor.start()

    def finish(self) -> None:
        m, self.monitor = self.monitor, None
        if m is None:
            return
        with QuietLogger("mlflow.system_metrics"):
            m.finish()
        try:
            m.collect_metrics()
            m.publish_metrics(m.aggregate_metrics())
            m.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001 — a missed sample must not fail the run
            print(f"potion: warning: the last system-metrics sample was not logged ({e})", file=sys.stderr)


class QuietLogger:
    """Raise one logger's level to ERROR for the duration of a ``with`` block."""

    def __init__(self, name: str):
        self.logger, self.level = logging.getLogger(name), logging.ERROR

    def __enter__(self):
        self.saved = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.saved)
        return False
