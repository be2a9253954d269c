"""A PTN step as MLflow sees it: its metric fields, its child run's name, its finite numbers."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence


def step_fields() -> tuple[str, ...]:
    """The fields of a PTN step, as MLflow metrics: whatever StepResult holds today."""
    from potion.unlearning.ptn import StepResult

    return tuple(f.name for f in dataclasses.fields(StepResult))


def child_fields() -> tuple[str, ...]:
    """A child run's metrics: the step's fields, and the damage guard's estimate where it measured the step."""
    return (*step_fields(), "proxy_damage")


def child_run_name(k: int, chosen: bool = False) -> str:
    """``k=043`` (sorts in k order in the UI's run list); ``k=043 ✓ chosen`` for the kept step."""
    return f"k={int(k):03d}" + (" ✓ chosen" if chosen else "")


def update_run_name(update: int, chosen: bool = False) -> str:
    """``update=060`` for a NegGrad+ check (potion_plus); ``✓ chosen`` on the one kept."""
    return f"update={int(update):03d}" + (" ✓ chosen" if chosen else "")


def _step_dict(step: Any) -> dict[str, Any]:
    return step.to_dict() if hasattr(step, "to_dict") else dict(step)


def _numeric(d: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        v = d.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
