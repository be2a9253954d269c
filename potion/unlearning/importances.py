"""Per-parameter importances I = (1/K) Σ_b G(b) (SPEC §5).

Every estimator has the same shape: a scalar batch objective whose gradient is taken with
respect to every entry of ``named_parameters()``, and an elementwise map (square or abs)
applied to that batch-mean gradient. Only the objective and the map differ, so an
estimator is just those two pieces plus whether it needs labels.

Memory: one batch of activations plus two parameter-sized buffers (the running sums and
the fresh gradients of the current batch). No per-sample gradients are ever formed.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from potion.errors import PotionError
from potion.progress import progress_bar
from potion.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class Estimator:
    """A resolved importance estimator: G(b) = transform(∇θ objective(f(x_b), y_b))."""

    name: str
    objective: Callable[[Tensor, Tensor | None], Tensor]
    transform: str  # "square" (fisher) or "abs" (the loss-free family)
    uses_labels: bool
    p: float | None = None


ESTIMATORS: Registry[Callable[..., Estimator]] = Registry("importance estimator")


def _check_no_p(name: str, p: float | None, fixed: float | None = None) -> None:
    if p is not None and (fixed is None or float(p) != fixed):
        what = "takes no p" if fixed is None else f"has p fixed at {fixed:g}"
        raise PotionError(
            f"importance estimator '{name}' {what}, got p={p}; use estimator 'lf_p' to choose p"
        )


def _norm_power_objective(p: float) -> Callable[[Tensor, Tensor | None], Tensor]:
    def objective(logits: Tensor, _y: Tensor | None) -> Tensor:
        if p == 2.0:
            # Sum of squares: same value as ||f||^2 but with a gradient that is finite
            # everywhere (the norm itself is not differentiable at f = 0).
            return logits.pow(2).sum(dim=1).mean()
        return torch.linalg.vector_norm(logits, ord=2, dim=1).pow(p).mean()

    return objective


def _cross_entropy(logits: Tensor, y: Tensor | None) -> Tensor:
    assert y is not None
    return F.cross_entropy(logits, y)


@ESTIMATORS.register("fisher")
def fisher(p: float | None = None) -> Estimator:
    """SSD's importance: squared gradient of the batch-mean cross-entropy."""
    _check_no_p("fisher", p)
    return Estimator("fisher", _cross_entropy, "square", uses_labels=True)


@ESTIMATORS.register("lf_p")
def lf_p(p: float | None = None) -> Estimator:
    """|∇ mean ||f(x)||_2^p|: label-free; p=1 is XLF, p=2 is LF."""
    if p is None:
        raise PotionError("importance estimator 'lf_p' needs a power p > 0 (e.g. p=1 for xlf)")
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise PotionError(f"importance estimator 'lf_p': p must be a number > 0, got {p!r}") from None
    if not (p > 0 and math.isfinite(p)):
        raise PotionError(f"importance estimator 'lf_p': p must be a finite number > 0, got {p}")
    return Estimator("lf_p", _norm_power_objective(p), "abs", uses_labels=False, p=p)


@ESTIMATORS.register("lf")
def lf(p: float | None = None) -> Estimator:
    """Loss-free SSD: |∇ mean ||f(x)||_2^2|."""
    _check_no_p("lf", p, 2.0)
    return Estimator("lf", _norm_power_objective(2.0), "abs", uses_labels=False, p=2.0)


@ESTIMATORS.register("xlf")
def xlf(p: float | None = None) -> Estimator:
    """This paper's estimator: |∇ mean ||f(x)||_2| (outlier-resistant)."""
    _check_no_p("xlf", p, 1.0)
    return Estimator("xlf", _norm_power_objective(1.0), "abs", uses_labels=False, p=1.0)


def resolve_estimator(estimator: str | Estimator, p: float | None = None) -> Estimator:
    if isinstance(estimator, Estimator):
        return estimator
    return ESTIMATORS.get(estimator)(p=p)


@contextmanager
def _eval_mode_all_grads(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad on every parameter, restoring both exactly afterwards.

    Modes are restored per module (not with ``model.train(was_training)``) so a model
    that deliberately keeps some submodules frozen in eval mode comes back unchanged.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(q, q.requires_grad) for q in model.parameters()]
    model.eval()
    for q, _ in flags:
        q.requires_grad_(True)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for q, flag in flags:
            q.requires_grad_(flag)


def _split_batch(batch: Any, needs_labels: bool, est_name: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
    else:
        raise PotionError(
            f"importance batches must be (x, y) pairs of tensors, got {type(batch).__name__}"
        )
    if needs_labels and y is None:
        raise PotionError(f"importance estimator '{est_name}' needs labels: pass (x, y) batches")
    if x.shape[0] == 0:
        raise PotionError("an importance batch is empty; drop empty batches from the data")
    return x, y


def importance_sums(
    model: nn.Module,
    batches: Iterable,
    estimator: str | Estimator,
    *,
    p: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
    desc: str | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Σ_b G(b) over the batches, and the number of batches K.

    Sums (rather than means) are returned so that passes over shards of the data can be
    added together before dividing by the total K (the Ray-sharded pass does that).
    The model is moved to ``device``; its train/eval modes and requires_grad flags are
    restored afterwards; its ``.grad`` fields are left untouched.
    Returns fp32 CPU tensors keyed by parameter name.
    """
    est = resolve_estimator(estimator, p)
    device = torch.device(device)
    model.to(device)
    work = model
    if any(q.dtype != torch.float32 for q in model.parameters()):
        # SPEC §5 says fp32: a half-precision model is measured through an fp32 copy.
        work = copy.deepcopy(model).float()

    named = list(work.named_parameters())
    if not named:
        raise PotionError("the model has no parameters to compute importances for")
    names = [n for n, _ in named]
    params = [q for _, q in named]
    sums = [torch.zeros_like(q, dtype=torch.float32, memory_format=torch.contiguous_format) for q in params]

    k = 0
    bar = progress_bar(batches, total=total, enabled=progress, desc=desc or f"importances ({est.name})", unit="batch")
    with _eval_mode_all_grads(work), torch.autocast(device.type, enabled=False), bar:
        for batch in bar:
            x, y = _split_batch(batch, est.uses_labels, est.name)
            x = x.to(device, torch.float32, non_blocking=True)
            if y is not None and est.uses_labels:
                y = y.to(device, non_blocking=True)
            with torch.enable_grad():
                objective = est.objective(work(x), y)
                # autograd.grad hands back fresh tensors we can transform in place, and
                # leaves any .grad the caller holds alone.
                grads = torch.autograd.grad(objective, params, allow_unused=True, materialize_grads=True)
            with torch.no_grad():
                if est.transform == "square":
                    torch._foreach_addcmul_(sums, grads, grads)
                else:
                    try:
                        torch._foreach_abs_(grads)  # no extra buffer in the common case
                    except RuntimeError:
                        # A gradient can be an expanded view (e.g. of p.sum()), which
                        # cannot be written in place; abs is idempotent, so redo it out of place.
                        grads = torch._foreach_abs(grads)
                    torch._foreach_add_(sums, grads)
            del grads, objective
            k += 1
    if k == 0:
        raise PotionError("no batches to compute importances on: the data set is empty")

    bad = [n for n, s in zip(names, sums) if not bool(torch.isfinite(s).all())]
    if bad:
        raise PotionError(
            f"importances contain NaN/inf: the model or data produce non-finite gradients (first in "
            f"'{bad[0]}', {len(bad)} tensors affected); check the inputs for NaN/inf, the model weights, and "
            "for lf_p with p < 1 samples whose logits are exactly zero"
        )
    return {n: s.cpu() for n, s in zip(names, sums)}, k


def compute_importances(
    model: nn.Module,
    batches: Iterable,
    estimator: str | Estimator,
    *,
    p: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
    desc: str | None = None,
) -> dict[str, Tensor]:
    """I = (1/K) Σ_b G(b) (SPEC §5); see :func:`importance_sums`."""
    sums, k = importance_sums(model, batches, estimator, p=p, device=device, progress=progress, total=total,
                              desc=desc)
    return {n: s.div_(k) for n, s in sums.items()}
