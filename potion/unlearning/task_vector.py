"""Task-vector negation, CUTS-style (a baseline beyond the paper; clean-room from the idea).

Fine-tuning θ0 on the found poison Sf with its poisoned labels moves the weights along the
backdoor's task: τ = θ_ft − θ0. Subtracting a scaled copy, θ(λ) = θ0 − λ·τ, walks away from
it. The scale is chosen without ground truth, the way PTN chooses its step (SPEC §8): the
smallest λ at which θ(λ)'s accuracy on Sf (poisoned labels) falls to ρ · acc0. λ doubles from
``scale_start`` until Sf crosses, then ``refine`` bisections narrow it down.

Only parameters move; batch-norm statistics stay θ0's (the fine-tune runs with them frozen,
which also lets a one-image Sf be a batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from potion.errors import PotionError
from potion.metrics import batches_accuracy
from potion.unlearning.finetune import check_sgd, sgd_steps

Tensor = torch.Tensor


@dataclass
class TaskVectorConfig:
    """Fine-tune on Sf (``steps``, ``lr`` ...), then the scale search's first λ, its cap and
    the number of bisections."""

    steps: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    scale_start: float = 0.5
    max_scale: float = 4096.0
    refine: int = 4

    def __post_init__(self) -> None:
        check_sgd("task_vector", self.steps, self.lr, self.momentum, self.weight_decay)
        if not (isinstance(self.scale_start, (int, float)) and math.isfinite(self.scale_start)
                and self.scale_start > 0):
            raise PotionError(f"task_vector.scale_start must be a number > 0, got {self.scale_start!r}")
        if not (isinstance(self.max_scale, (int, float)) and self.max_scale >= self.scale_start):
            raise PotionError(f"task_vector.max_scale must be >= scale_start ({self.scale_start}), "
                              f"got {self.max_scale!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise PotionError(f"task_vector.refine must be an integer >= 0, got {self.refine!r}")


@dataclass
class ScaleResult:
    """One measured scale: θ(λ)'s accuracy on Sf."""

    lam: float
    acc_forget: float

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "acc_forget": self.acc_forget}


def task_vector(model: nn.Module, state0: Mapping[str, Tensor], forget_batches: list, cfg: TaskVectorConfig,
                device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """τ = θ_ft − θ0 over the model's parameters, θ_ft from ``cfg.steps`` SGD steps on Sf."""
    tuned, _ = sgd_steps(model, state0, lambda: forget_batches, cfg.steps, cfg.lr, cfg.momentum,
                         cfg.weight_decay, train_mode=False, device=device)
    names = [n for n, _ in model.named_parameters()]
    return {n: (tuned[n] - state0[n].to(tuned[n].device)).detach() for n in names}


def negated(state0: Mapping[str, Tensor], tau: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
    """θ0 − λ·τ; entries without a τ (buffers) are θ0's."""
    return {n: (t - lam * tau[n].to(t.device)) if n in tau else t.clone() for n, t in state0.items()}


def choose_scale(acc_at: Callable[[float], float], threshold: float,
                 cfg: TaskVectorConfig) -> tuple[float | None, list[ScaleResult]]:
    """The smallest measured λ with ``acc_at(λ) <= threshold`` (doubling, then bisection
    between the last λ above and the first below), or None when ``max_scale`` never crossed;
    with every measurement in the order taken."""
    trace: list[ScaleResult] = []

    def measure(lam: float) -> bool:
        trace.append(ScaleResult(lam, float(acc_at(lam))))
        return trace[-1].acc_forget <= threshold

    lo, hi, lam = 0.0, None, float(cfg.scale_start)
    while lam <= cfg.max_scale:
        if measure(lam):
            hi = lam
            break
        lo, lam = lam, lam * 2
    if hi is None:
        return None, trace
    for _ in range(cfg.refine):
        mid = (lo + hi) / 2
        if measure(mid):
            hi = mid
        else:
            lo = mid
    return hi, trace


def accuracy_on(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> float:
    """Share of ``(x, y)`` rows the model, put in eval mode, gets right."""
    return batches_accuracy(model.eval(), batches, device)
