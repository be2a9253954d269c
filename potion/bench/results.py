"""A benchmark cell's row and ``results.parquet`` (its schema, the run's environment)."""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from potion.io import atomic_write
from potion.bench.grid import META_KEY, Cell


# ---------------------------------------------------------------- rows and results.parquet
SCHEMA = pa.schema([
    ("suite", pa.string()), ("cell_id", pa.string()), ("poison", pa.string()), ("trigger", pa.string()),
    ("n", pa.float64()), ("n_poison", pa.int64()), ("share", pa.float64()), ("share_label", pa.string()),
    ("one_shot", pa.bool_()), ("n_forget", pa.int64()), ("method", pa.string()), ("base_method", pa.string()),
    ("seed", pa.int64()), ("status", pa.string()), ("error", pa.string()),
    ("clean_acc_before", pa.float64()), ("ra_before", pa.float64()), ("asr_before", pa.float64()),
    ("clean_acc_after", pa.float64()), ("ra_after", pa.float64()), ("asr_after", pa.float64()),
    ("poison_healed_before", pa.float64()), ("poison_healed", pa.float64()), ("model_damage", pa.float64()),
    ("k_star", pa.int64()), ("alpha", pa.float64()),
    ("importance_s", pa.float64()), ("search_s", pa.float64()), ("total_s", pa.float64()), ("wall_s", pa.float64()),
    ("reused", pa.bool_()), ("model_dir", pa.string()), ("note", pa.string()),
])
METRIC_NAMES = [f.name for f in SCHEMA if pa.types.is_floating(f.type) or f.name in ("k_star", "n_forget", "n_poison")]


def _num(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _int(v) -> int | None:
    return None if v is None or isinstance(v, bool) else int(v)


def base_row(cell: Cell, suite: str) -> dict:
    return {"suite": suite, "cell_id": cell.cell_id, "poison": cell.poison, "trigger": cell.trigger,
            "n": float(cell.n), "share_label": cell.share_label, "one_shot": cell.count == 1,
            "share": cell.share, "method": cell.method, "base_method": cell.base_method, "seed": cell.seed,
            "model_dir": str(cell.model.dir), "reused": False}


def cell_row(cell: Cell, suite: str, outcome: dict, n_poison: int | None) -> dict:
    """One results row from a heal task's outcome (or a training failure)."""
    row = base_row(cell, suite)
    row.update(status=outcome["status"], error=outcome.get("error"), n_poison=n_poison,
               wall_s=_num(outcome.get("wall_s")))
    if row["share"] is None and n_poison:
        row["share"] = cell.count / n_poison
    rep = outcome.get("report")
    if rep:
        b, a, t = rep["before"], rep["after"], rep.get("timings", {})
        row.update(
            n_forget=_int(rep["deletion_set"]["size"]), n_poison=_int(rep["deletion_set"]["n_poison_total"]),
            clean_acc_before=_num(b["clean_acc"]), ra_before=_num(b["ra"]), asr_before=_num(b["asr"]),
            clean_acc_after=_num(a["clean_acc"]), ra_after=_num(a["ra"]), asr_after=_num(a["asr"]),
            poison_healed_before=_num(rep.get("before_poison_healed")),
            poison_healed=_num(a["poison_healed"]), model_damage=_num(a["model_damage"]),
            k_star=_int(rep.get("k_star")), alpha=_num(rep.get("alpha")),
            importance_s=(_num(t.get("importance_forget_s")) or 0.0) + (_num(t.get("importance_retain_s")) or 0.0),
            search_s=_num(t.get("search_s")), total_s=_num(t.get("total_s")),
        )
        if cell.count is not None and row["n_poison"]:
            row["share"] = cell.count / row["n_poison"]
        info = rep.get("info", {})
        if info.get("guard_no_safe_step"):
            row["note"] = "damage guard: no step heals within δ (max_damage): θ0 kept"
        elif info.get("no_crossing"):
            row["note"] = "no PTN crossing within max_steps: θ0 kept"
        elif info.get("nothing_to_heal"):
            row["note"] = "θ0 already misclassifies the whole deletion set (acc0 = 0), nothing to heal: θ0 kept"
    return row


def environment_info(command: str | None = None) -> dict:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.is_available()
    return {
        "command": command if command is not None else shlex.join(["potion", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cores": cores,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(path: Path, rows: list[dict], meta: dict) -> Path:
    """One row per cell, schema fixed (so an all-failed grid still has typed columns)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_meta(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
