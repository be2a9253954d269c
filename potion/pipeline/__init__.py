"""Deprecated: the old flat home of the glue, split by job in 0.2 (see ARCHITECTURE.md).

``potion.pipeline.<module>`` still imports for one release and forwards every name to the
module it moved to, with a ``DeprecationWarning`` that names the new path.
"""
from __future__ import annotations

import importlib
import warnings

# old module -> the modules that now hold its names (searched in order)
MOVED: dict[str, tuple[str, ...]] = {
    "configs": ("potion.runs.configs",),
    "runs": ("potion.runs.folder",),
    "checks": ("potion.runs.checks",),
    "train": ("potion.jobs.train",),
    "evaluate": ("potion.jobs.evaluate",),
    "demo": ("potion.jobs.demo",),
    "data_prep": ("potion.jobs.data",),
    "heal_inputs": ("potion.heal.inputs",),
    "heal": ("potion.heal.run", "potion.heal.sets", "potion.heal.importances", "potion.heal.outputs",
             "potion.heal.tracked"),
    "report": ("potion.heal.report",),
    "ray_runtime": ("potion.distributed.runtime",),
    "ray_search": ("potion.distributed.search", "potion.distributed.trials", "potion.distributed.searcher"),
    "ray_importances": ("potion.distributed.importances",),
    "tracking": ("potion.tracking.tracker", "potion.tracking.store", "potion.tracking.steps", "potion.tracking.plots",
                 "potion.tracking.tune_callback"),
    "benchmark": ("potion.bench.run",),
    "benchmark_grid": ("potion.bench.grid",),
    "benchmark_cells": ("potion.bench.cells",),
    "benchmark_results": ("potion.bench.results",),
    "benchmark_report": ("potion.bench.report",),
}


def alias(old: str):
    """The ``__getattr__`` of the deprecated module ``old``: warns once, then forwards."""
    short = old.rsplit(".", 1)[-1]
    targets = MOVED[short]
    warnings.warn(f"{old} is deprecated and goes in the next release; import from {' or '.join(targets)}",
                  DeprecationWarning, stacklevel=3)

    def __getattr__(name: str):
        for target in targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {' or '.join(targets)})")

    return __getattr__
