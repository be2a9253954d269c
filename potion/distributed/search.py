"""PTN search (SPEC §8) as a Ray Tune experiment: one trial per step k.

The trials call the *same* ``StepEvaluator.evaluate(k)`` as the local search; only the
choice of which k to run differs, and that lives in :class:`PTNSearcher`:

- ``linear`` / ``waves``: a sliding window over k. A new k starts whenever a trial ends,
  never more than ``window`` steps past the lowest unfinished one, and nothing new starts
  once a crossing is known. The experiment ends (``Searcher.FINISHED``) as soon as every k
  below the smallest crossing has been measured, so k* is exactly linear's k* whatever the
  shape of a_k, and at most ``window - 1`` steps beyond k* are ever run.
- ``bisect``: galloping k = 0, 1, 3, 7, … then a ``window``-ary bisection of the bracket;
  the same k* as linear when a_k is non-increasing in k (SPEC §8).

What the trials need travels once through Ray's object store as NUMPY arrays
(owned by a small actor, so that the heal frees it when the search ends): numpy comes back zero-copy, torch tensors would be copied per
worker, and tensors inside ``param_space`` would be copied into Tune's experiment state.
Each worker process builds its evaluator once (``reuse_actors=True`` keeps it).
The healed weights are rebuilt on the driver from θ0 with the driver's evaluator, so they
are bit-identical to the local search's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import torch

from potion.distributed.searcher import PTNSearcher
from potion.distributed.trials import (
    SearchPayload,
    build_evaluator,
    payload_from_evaluator,
    ptn_trial,
    result_from_metrics,
)
from potion.errors import PotionError, detail_of
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.ptn import (
    PTNConfig,
    PTNResult,
    StepResult,
    crossing_threshold,
    describe_step,
    no_crossing,
    search_label,
    search_outcome,
    smallest_crossing,
)
from potion.progress import progress_bar

# A trial is a pure function of k, so a trial whose worker died (killed, OOM, node lost)
# simply runs again: Tune restarts it TRIAL_RETRIES times, then the searcher proposes the
# same k once more in a fresh trial. An exception inside the trial is deterministic and is
# reported as the trial's result instead, so it is never retried.
TRIAL_RETRIES = 3


# ---------------------------------------------------------------- the search
def trial_resources(gpus_per_trial: float = 0.25, cpus_per_trial: float = 1.0) -> dict[str, float]:
    """A fraction of a GPU per trial when the cluster has GPUs (several trials share one;
    Ray does no memory isolation), CPUs otherwise."""
    from potion.distributed.runtime import cluster_gpus

    if gpus_per_trial and cluster_gpus() > 0:
        return {"cpu": cpus_per_trial, "gpu": float(gpus_per_trial)}
    return {"cpu": cpus_per_trial}


def ray_ptn_search(
    payload: SearchPayload,
    config: PTNConfig | None = None,
    *,
    window: int | None = None,
    strategy: str | None = None,
    resources: Mapping[str, float] | None = None,
    storage_path: str | os.PathLike | None = None,
    callbacks: Sequence = (),
    evaluator: StepEvaluator | None = None,
    progress: bool = False,
    placement: dict | None = None,
) -> PTNResult:
    """PTN over Ray Tune; returns the same :class:`PTNResult` as ``ptn_search``.

    ``evaluator`` is the driver's own evaluator on the same inputs (built from the payload
    on CPU when omitted): it gives acc0 and rebuilds θ_{k*}. ``strategy`` ``linear`` and
    ``waves`` both run the exact sliding window; ``bisect`` gallops and bisects.
    Ray must be connected (``ray_runtime.connect``). ``placement``, when given, receives
    which node measured which k (``trials``) and how many dead trials were restarted.
    """
    import ray

    if not ray.is_initialized():
        raise PotionError("Ray is not connected; call potion.distributed.runtime.connect() first")
    cfg = config or payload.config
    strategy = strategy or cfg.strategy
    window = int(window or cfg.window)
    evaluator = evaluator or build_evaluator(payload, "cpu")
    threshold = crossing_threshold(evaluator, cfg)
    acc0 = float(evaluator.acc0)
    bar = progress_bar(desc=f"{search_label(strategy)} on Ray, {window} in flight", unit="step", enabled=progress)

    def on_result(r: StepResult) -> None:
        bar.set_postfix_str(describe_step(r, threshold), refresh=False)
        bar.update(1)

    searcher = PTNSearcher(threshold, cfg.max_steps, window, strategy, on_result=on_result)
    try:
        results = _run_trials(payload, cfg, searcher, window, strategy, resources, storage_path, callbacks,
                              placement)
    finally:
        bar.set_postfix_str(search_outcome(smallest_crossing(searcher.results.values(), threshold), threshold, cfg),
                            refresh=True)  # steps finish out of order
        bar.close()
    trace = [results[k] for k in sorted(results)]
    hit = smallest_crossing(trace, threshold)
    if hit is None:
        if not trace:
            raise PotionError("the Ray PTN search ran no trials; check the cluster's resources (CPU/GPU per trial)")
        raise no_crossing(trace, cfg, threshold, acc0)
    if strategy != "bisect":
        missing = [k for k in range(hit.k) if k not in results]
        if missing:  # the searcher never lets this happen; guard against silent wrong answers
            raise PotionError(f"the Ray PTN search ended before measuring steps {missing[:5]} below k*={hit.k}")
    state = evaluator.healed_state(hit.k)
    if isinstance(getattr(evaluator, "model", None), torch.nn.Module):
        evaluator.model.load_state_dict(state)
    return PTNResult(
        k_star=hit.k, s=hit.s, alpha=hit.alpha, n_selected=hit.n_selected, acc0=acc0, threshold=threshold,
        trace=trace, evaluations=len(trace), strategy=f"ray-{'bisect' if strategy == 'bisect' else 'window'}",
        state_dict=state,
    )


def _run_trials(payload: SearchPayload, cfg: PTNConfig, searcher: PTNSearcher, window: int, name: str,
                resources: Mapping[str, float] | None, storage_path, callbacks: Sequence,
                placement: dict | None = None) -> dict[int, StepResult]:
    """One Tune experiment driven by ``searcher``; the measured steps by k. ``placement``,
    when given, receives which node measured which k and how many dead trials were restarted."""
    from ray import tune

    if payload.config != cfg:
        payload = dataclasses.replace(payload, config=cfg)
    storage = os.path.abspath(storage_path or tempfile.mkdtemp(prefix="potion-ray-results-"))
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial csv/json/tensorboard files
    # Tune's own Ctrl-C handler ends the experiment early and returns the partial results
    # as if complete; we let the interrupt propagate instead (and check completeness below).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    recovered = _RecoveryCounter()
    import ray

    owner = _own_payload(payload)
    trial = ptn_trial  # looked up now: tests and benchmarks wrap the module's ptn_trial

    def trainable_fn(config: dict) -> None:
        # The trial, not the driver, borrows the reference: a driver that borrows one from an
        # actor keeps a descriptor of that connection after the actor is gone (one per heal).
        return trial(config, ray.get(ray.get(owner.box.remote())[0]))

    trainable = tune.with_resources(trainable_fn, dict(resources or trial_resources()))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=window,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"ptn-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage, verbose=0, callbacks=[*callbacks, recovered],
            # fail_fast would end the search at the first dead worker, retry or not
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES, fail_fast=False),
        ),
    )
    from potion.distributed.leftovers import RESUME_HINT, describe_ray_failure

    try:
        with _quiet_trial_failures():
            grid = tuner.fit()
    except (ray.exceptions.RayError, tune.TuneError) as e:
        raise PotionError(f"the Ray PTN search failed ({describe_ray_failure(e)}); {RESUME_HINT}",
                          detail=detail_of(e)) from None
    finally:
        ray.kill(owner)  # frees the payload: Tune's registry keeps its copy of our reference pinned
    if searcher.failed:
        # a trial's own exception arrives as its result; a dead worker only as Tune errors
        dead = recovered.last_error and searcher.reproposed and "failed:" not in searcher.failed
        lost = f" after its worker died again ({recovered.last_error})" if dead else ""
        raise PotionError(f"a PTN trial failed on the Ray cluster: {searcher.failed}{lost}"
                          + (f"; {RESUME_HINT}" if lost else ""))
    if not searcher.done:
        # Tune stops early only when told to (a signal, SIGUSR1): never read that as a search.
        measured = max(searcher.results, default=None)
        raise KeyboardInterrupt(f"the Ray PTN search was stopped after measuring up to k={measured}")
    results = dict(searcher.results)
    for res in grid:
        if res.metrics and "acc_forget" in res.metrics:
            r = result_from_metrics(res.metrics)
            results.setdefault(r.k, r)
    if placement is not None:
        by_node: dict[str, list[int]] = {}
        for k in sorted(searcher.nodes):
            by_node.setdefault(searcher.nodes[k], []).append(k)
        placement["trials"] = by_node
        placement["trial_restarts"] = recovered.count + sum(searcher.reproposed.values())
    return results


@functools.lru_cache(maxsize=None)
def _payload_owner_class():
    import ray

    @ray.remote(num_cpus=0)
    class PayloadOwner:
        """Owns the search's payload in the object store, so that killing it frees the payload.

        A reference held in a Tune trainable is pickled outside Ray's reference counting, and
        Ray then pins the object for as long as its owner lives: owned by the driver (as
        ``tune.with_parameters`` does) that is the driver's life, one payload per heal.
        """

        def __init__(self, payload):
            self.ref = ray.put(payload)

        def box(self) -> list:
            return [self.ref]  # in a list: the caller gets the reference, not the value

    return PayloadOwner


def _own_payload(payload: SearchPayload):
    """An actor on the driver's node that owns ``payload`` in the object store; its
    ``box()`` hands out the reference."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Hard affinity: a soft one spills the actor to another node while every CPU is busy
    # (8 of 12 times on a 3-node test cluster), and losing that node then fails every trial.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _payload_owner_class().options(scheduling_strategy=here).remote(payload)


def make_ray_search(
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_factory: Callable[[], torch.nn.Module] | None = None,
    window: int | None = None,
    strategy: str | None = None,
    gpus_per_trial: float = 0.25,
    cpus_per_trial: float = 1.0,
    resources: Mapping[str, float] | None = None,
    storage_path: str | os.PathLike | None = None,
    callbacks: Sequence = (),
    progress: bool = False,
    placement: dict | None = None,
) -> Callable[[StepEvaluator, PTNConfig | None], PTNResult]:
    """A drop-in for ``ptn_search(evaluator, config)`` (``HealContext.search``) that runs
    the steps as Ray Tune trials on the connected cluster."""

    def search(evaluator: StepEvaluator, config: PTNConfig | None = None) -> PTNResult:
        cfg = config or evaluator.config
        payload = payload_from_evaluator(evaluator, cfg, model_name=model_name, model_kwargs=model_kwargs,
                                         model_factory=model_factory)
        return ray_ptn_search(
            payload, cfg, window=window, strategy=strategy,
            resources=resources or trial_resources(gpus_per_trial, cpus_per_trial),
            storage_path=storage_path, callbacks=callbacks, evaluator=evaluator, progress=progress,
            placement=placement,
        )

    return search


def _recovery_counter_class():
    from ray.tune import Callback

    class RecoveryCounter(Callback):
        """Counts trials Tune restarted after their worker died, and says how the last one died."""

        def __init__(self):
            self.count = 0
            self.last_error: str | None = None

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.count += 1
            self._note(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._note(trial)

        def _note(self, trial):
            from potion.distributed.leftovers import describe_ray_failure

            try:
                err = trial.get_pickled_error() or trial.get_error()
            except Exception:  # noqa: BLE001 — only a better message is at stake
                err = None
            if err is not None:
                self.last_error = describe_ray_failure(getattr(err, "cause", None) or err)

    return RecoveryCounter


def _RecoveryCounter():
    return _recovery_counter_class()()


@contextlib.contextmanager
def _quiet_trial_failures():
    """Tune logs every dead trial worker as an ERROR with Ray's traceback; the search retries
    those itself and reports what it could not recover as one PotionError, so the user sees
    that line instead of the tracebacks."""
    import logging

    log = logging.getLogger("ray.tune.execution.tune_controller")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
