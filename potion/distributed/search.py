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
(``tune.with_parameters``): numpy comes back zero-copy, torch tensors would be copied per
worker, and tensors inside ``param_space`` would be copied into Tune's experiment state.
Each worker process builds its evaluator once (``reuse_actors=True`` keeps it).
The healed weights are rebuilt on the driver from θ0 with the driver's evaluator, so they
are bit-identical to the local search's.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from ray.tune.search import Searcher

from potion.errors import PotionError
from potion.unlearning.ptn import (
    PTNConfig,
    PTNResult,
    StepEvaluator,
    StepResult,
    crossing_threshold,
    describe_step,
    no_crossing,
    search_label,
    search_outcome,
    smallest_crossing,
)
from potion.progress import progress_bar

METRICS = ("k", "s", "alpha", "lam", "n_selected", "acc_forget", "acc_val", "acc_proxy", "acc_proxy_target",
           "acc_proxy_other")
# A trial is a pure function of k, so a trial whose worker died (killed, OOM, node lost)
# simply runs again: Tune restarts it TRIAL_RETRIES times, then the searcher proposes the
# same k once more in a fresh trial. An exception inside the trial is deterministic and is
# reported as the trial's result instead, so it is never retried.
TRIAL_RETRIES = 3
REPROPOSALS = 1


# ---------------------------------------------------------------- the payload
@dataclass
class SearchPayload:
    """Everything a trial needs to rebuild the evaluator, as numpy (zero-copy in Ray).

    The model is rebuilt with ``create_model(model_name, **model_kwargs)`` or, when given,
    ``model_factory()`` (a picklable callable; the state θ0 is loaded afterwards).
    """

    model_name: str | None
    model_kwargs: dict
    state0: dict[str, np.ndarray]
    state_dtypes: dict[str, str]
    imp_f: dict[str, np.ndarray]
    imp_r: dict[str, np.ndarray]
    forget_batches: list[tuple[np.ndarray, np.ndarray]]
    val_batches: list[tuple[np.ndarray, np.ndarray]] | None
    n_forget: int
    n_total: int
    config: PTNConfig
    model_factory: Callable[[], torch.nn.Module] | None = None
    proxy_batches: list[tuple[np.ndarray, np.ndarray]] | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; bf16 → fp32 → bf16 is exact
    return t.contiguous().numpy()


def _batches_np(batches: Iterable) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(_np(b[0]), _np(b[1])) for b in batches]


def make_payload(
    *,
    state0: Mapping[str, torch.Tensor],
    imp_f: Mapping[str, torch.Tensor],
    imp_r: Mapping[str, torch.Tensor],
    forget_batches: Iterable,
    n_forget: int,
    n_total: int,
    config: PTNConfig,
    val_batches: Iterable | Callable[[], Iterable] | None = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_factory: Callable[[], torch.nn.Module] | None = None,
    proxy_batches: Iterable | None = None,
) -> SearchPayload:
    if model_name is None and model_factory is None:
        raise PotionError("the Ray PTN search needs a model name (with its kwargs) or a model_factory to rebuild the model in trials")
    if callable(val_batches):
        val_batches = val_batches()
    return SearchPayload(
        model_name=model_name,
        model_kwargs=dict(model_kwargs or {}),
        state0={n: _np(t) for n, t in state0.items()},
        state_dtypes={n: str(t.dtype).removeprefix("torch.") for n, t in state0.items()},
        imp_f={n: _np(t) for n, t in imp_f.items()},
        imp_r={n: _np(t) for n, t in imp_r.items()},
        forget_batches=_batches_np(forget_batches),
        val_batches=None if val_batches is None else _batches_np(val_batches),
        n_forget=int(n_forget),
        n_total=int(n_total),
        config=config,
        model_factory=model_factory,
        proxy_batches=None if proxy_batches is None else _batches_np(proxy_batches),
    )


def payload_from_evaluator(evaluator: StepEvaluator, config: PTNConfig | None = None, **model_spec) -> SearchPayload:
    """The payload for the inputs a local :class:`StepEvaluator` holds."""
    return make_payload(
        state0=evaluator.state0, imp_f=evaluator.imp_f, imp_r=evaluator.imp_r,
        forget_batches=evaluator.forget_batches, n_forget=evaluator.n_forget, n_total=evaluator.n_total,
        config=config or evaluator.config, val_batches=evaluator.val_batches,
        proxy_batches=evaluator.proxy_batches, **model_spec,
    )


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Arrays from the object store are read-only views of shared memory; the evaluator
    # clones θ0 and only reads the rest, so sharing them is safe. torch warns regardless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def build_evaluator(payload: SearchPayload, device: str = "cpu") -> StepEvaluator:
    """The evaluator a trial uses: the same class and inputs as the local search."""
    if payload.model_factory is not None:
        model = payload.model_factory()
    else:
        from potion.models import create_model

        model = create_model(payload.model_name, **payload.model_kwargs)
    state0 = {n: _tensor(a).to(getattr(torch, payload.state_dtypes[n])) for n, a in payload.state0.items()}
    conv = lambda bs: [(_tensor(x), _tensor(y)) for x, y in bs]  # noqa: E731
    return StepEvaluator(
        model, state0,
        {n: _tensor(a) for n, a in payload.imp_f.items()},
        {n: _tensor(a) for n, a in payload.imp_r.items()},
        conv(payload.forget_batches), payload.n_forget, payload.n_total, payload.config,
        val_batches=None if payload.val_batches is None else conv(payload.val_batches),
        device=device,
        proxy_batches=None if payload.proxy_batches is None else conv(payload.proxy_batches),
    )


# ---------------------------------------------------------------- the trial
_CACHE: dict[str, Any] = {}


def _cached_evaluator(payload: SearchPayload) -> StepEvaluator:
    """One evaluator per worker process and search (reused actors keep it)."""
    if _CACHE.get("token") != payload.token:
        _CACHE.clear()
        import ray

        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        _CACHE["evaluator"] = build_evaluator(payload, device)
        _CACHE["token"] = payload.token
    return _CACHE["evaluator"]


def ptn_trial(config: dict, payload: SearchPayload) -> None:
    """Tune trainable: evaluate one step k and report its StepResult (and the node it ran on)."""
    import ray
    from ray import tune

    node = ray.get_runtime_context().get_node_id()
    try:
        result = _cached_evaluator(payload).evaluate(int(config["k"]))
    except Exception as e:  # noqa: BLE001 — deterministic: report it rather than have Tune retry it
        # Tune insists on the searcher's metric in every result: NaN, never a number
        tune.report({"k": int(config["k"]), "acc_forget": float("nan"), "error": f"{type(e).__name__}: {_short(e)}",
                     "node": node})
        return
    tune.report({**{k: v for k, v in result.to_dict().items() if v is not None}, "node": node})


# ---------------------------------------------------------------- the searcher
class PTNSearcher(Searcher):
    """Proposes PTN steps k; see the module docstring for the two strategies."""

    def __init__(self, threshold: float, max_steps: int, window: int, strategy: str = "waves",
                 on_result: Callable[[StepResult], None] | None = None, reproposals: int = REPROPOSALS):
        super().__init__(metric="acc_forget", mode="min")
        self.on_result = on_result  # called on the driver as each step's result arrives
        self.reproposals = int(reproposals)
        if strategy == "bracket":
            strategy = "waves"  # in parallel, waves of the window give linear's exact k* at once
        if strategy not in ("linear", "waves", "bisect"):
            raise PotionError(f"unknown PTN strategy '{strategy}'; use linear, waves or bisect")
        if window < 1:
            raise PotionError(f"the PTN window must be at least 1, got {window}")
        self.threshold = float(threshold)
        self.max_steps = int(max_steps)
        self.window = int(window)
        self.bisect = strategy == "bisect"
        self.results: dict[int, StepResult] = {}
        self.pending: dict[str, int] = {}  # trial id → k
        self.proposed: list[int] = []
        self.nodes: dict[int, str] = {}  # k → the Ray node that measured it
        self.failed: str | None = None
        self.retry: list[int] = []  # ks whose trial died: proposed again before anything new
        self.reproposed: dict[int, int] = {}
        self.done = False
        self._next_k = 0  # sliding window: the next k to propose
        self._queue: list[int] = []  # bisect: this round's ks still to hand out
        self._gallop_j = 0

    def __getstate__(self) -> dict:
        # Tune pickles the searcher into its experiment state; the progress callback
        # holds an output stream, which does not pickle and would mean nothing restored.
        return {**self.__dict__, "on_result": None}

    # -- Tune's interface ---------------------------------------------------------
    def suggest(self, trial_id: str):
        if self.done or self.failed:
            return Searcher.FINISHED
        k = self.retry.pop(0) if self.retry else (self._next_bisect() if self.bisect else self._next_window())
        if k == Searcher.FINISHED:
            self.done = True
            return Searcher.FINISHED
        if k is None:
            return None
        self.pending[trial_id] = k
        self.proposed.append(k)
        return {"k": k}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        k = self.pending.pop(trial_id, None)
        if k is None:
            return
        if result and result.get("error"):
            self.failed = f"the trial for k={k} failed: {result['error']}"
            return
        if error or not result or "acc_forget" not in result:
            # The worker died (Tune's own retries are spent): a pure function of k, so run it again.
            if self.reproposed.get(k, 0) < self.reproposals:
                self.reproposed[k] = self.reproposed.get(k, 0) + 1
                self.retry.append(k)
                return
            self.failed = f"the trial for k={k} failed"
            return
        self.results[k] = result_from_metrics(result)
        if result.get("node"):
            self.nodes[k] = str(result["node"])
        if self.on_result is not None:
            self.on_result(self.results[k])

    # -- helpers ------------------------------------------------------------------
    def crossing(self) -> StepResult | None:
        return smallest_crossing(self.results.values(), self.threshold)

    def _next_window(self):
        open_ks = [*self.pending.values(), *self.retry]
        hit = self.crossing()
        if hit is not None:
            # Everything below hit.k was proposed (proposals are consecutive); wait for it.
            return None if any(k < hit.k for k in open_ks) else Searcher.FINISHED
        if self._next_k > self.max_steps:
            return None if open_ks else Searcher.FINISHED
        lowest_open = min(open_ks, default=self._next_k)
        if self._next_k >= lowest_open + self.window:
            return None
        k, self._next_k = self._next_k, self._next_k + 1
        return k

    def _next_bisect(self):
        if self._queue:
            return self._queue.pop(0)
        if self.pending or self.retry:
            return None  # rounds: the next points depend on all of this round's results
        self._queue = self._plan_round()
        return self._queue.pop(0) if self._queue else Searcher.FINISHED

    def _plan_round(self) -> list[int]:
        hit = self.crossing()
        if hit is None:
            if self.max_steps in self.results:
                return []  # galloped to max_steps without a crossing
            ks: list[int] = []
            while len(ks) < self.window:
                k = min(2**self._gallop_j - 1, self.max_steps)
                self._gallop_j += 1
                if k not in self.results and k not in ks:
                    ks.append(k)
                if k == self.max_steps:
                    break
            return ks
        hi = hit.k
        lo = max((k for k, r in self.results.items() if k < hi and r.acc_forget > self.threshold), default=-1)
        inside = hi - lo - 1  # candidates strictly between lo and hi
        if inside <= 0:
            return []
        if inside <= self.window:
            return [k for k in range(lo + 1, hi) if k not in self.results]
        pts = sorted({lo + (i * (hi - lo)) // (self.window + 1) for i in range(1, self.window + 1)})
        return [k for k in pts if lo < k < hi and k not in self.results]


def result_from_metrics(m: Mapping[str, Any]) -> StepResult:
    return StepResult(
        k=int(m["k"]), s=float(m["s"]), alpha=float(m["alpha"]), lam=float(m.get("lam", 1.0)),
        n_selected=int(m["n_selected"]), acc_forget=float(m["acc_forget"]),
        acc_val=None if m.get("acc_val") is None else float(m["acc_val"]),
        **{key: None if m.get(key) is None else float(m[key])
           for key in ("acc_proxy", "acc_proxy_target", "acc_proxy_other")},
    )


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
    trainable = tune.with_resources(tune.with_parameters(ptn_trial, payload=payload),
                                    dict(resources or trial_resources()))
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
    grid = tuner.fit()
    if searcher.failed:
        raise PotionError(f"a PTN trial failed on the Ray cluster: {searcher.failed}")
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
        """Counts trials Tune restarted after their worker died."""

        def __init__(self):
            self.count = 0

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.count += 1

    return RecoveryCounter


def _RecoveryCounter():
    return _recovery_counter_class()()


def _short(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"
