"""The Ray Tune callback that writes each trial as a child run of the heal's parent run."""
from __future__ import annotations

import time

from potion.tracking.steps import _chunks, _numeric, child_run_name, step_fields


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
