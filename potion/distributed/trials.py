"""What one Ray Tune trial of the PTN search runs: the payload it receives and the step it measures."""
from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from potion.errors import PotionError
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.ptn import PTNConfig, StepResult

METRICS = ("k", "s", "alpha", "lam", "n_selected", "acc_forget", "acc_val", "acc_proxy", "acc_proxy_target",
           "acc_proxy_other")


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
        from potion.distributed.runtime import worker_device

        _CACHE["evaluator"] = build_evaluator(payload, worker_device())
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


def result_from_metrics(m: Mapping[str, Any]) -> StepResult:
    return StepResult(
        k=int(m["k"]), s=float(m["s"]), alpha=float(m["alpha"]), lam=float(m.get("lam", 1.0)),
        n_selected=int(m["n_selected"]), acc_forget=float(m["acc_forget"]),
        acc_val=None if m.get("acc_val") is None else float(m["acc_val"]),
        **{key: None if m.get(key) is None else float(m[key])
           for key in ("acc_proxy", "acc_proxy_target", "acc_proxy_other")},
    )


def _short(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"
