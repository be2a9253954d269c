"""Fine-tuning baselines' shared step: a short SGD run from a state on given batches.

The ``finetune`` baseline runs it on the retain set Dr = D − Sf in a random order (what a
repair after dampening adds on its own); ``task_vector`` runs it on Sf with its poisoned
labels to find the backdoor's direction. Pure: any ``nn.Module``, any ``(x, y)`` batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from potion.errors import PotionError

Tensor = torch.Tensor


@dataclass
class FinetuneConfig:
    """The ``finetune`` baseline: ``steps`` SGD steps of ``batch_size`` images of Dr (shuffled
    with ``seed``)."""

    steps: int = 50
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        check_sgd("finetune", self.steps, self.lr, self.momentum, self.weight_decay)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PotionError(f"finetune.batch_size must be an integer >= 1, got {self.batch_size!r}")


def check_sgd(section: str, steps, lr, momentum, weight_decay) -> None:
    """One-line errors for the SGD knobs of a config section."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PotionError(f"{section}.steps must be an integer >= 1 (SGD steps), got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PotionError(f"{section}.lr must be a number > 0, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise PotionError(f"{section}.momentum must lie in [0, 1), got {momentum!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise PotionError(f"{section}.weight_decay must be a number >= 0, got {weight_decay!r}")


def sgd_steps(
    model: nn.Module,
    state: Mapping[str, Tensor],
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    steps: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    train_mode: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], list[float]]:
    """``steps`` SGD steps (cross-entropy) from ``state``, reading ``batches()`` (a fresh pass
    per call) again whenever a pass ends before the last step; returns the new state (detached clones) and the loss of every step. ``train_mode=False``
    keeps batch-norm statistics frozen (needed for a one-image batch). ``model`` ends up
    holding the new state."""
    model.load_state_dict(state)
    model.to(device)
    model.train(train_mode)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses: list[float] = []
    while len(losses) < steps:
        before = len(losses)
        for x, y in batches():
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        if len(losses) == before:
            raise PotionError("fine-tuning needs at least one batch of (x, y); the given set is empty")
    model.eval()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, losses


def rebatch(batches: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The rows of ``batches`` in the same order, cut every ``size`` rows (the last one shorter):
    an SGD batch size of its own, whatever batch size the source was read at."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += int(y.shape[0])
        while held >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield torch.cat(xs), torch.cat(ys)
