"""Plain-text tables for the terminal."""
from __future__ import annotations

import math


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


METRIC_COLUMNS = ["model", "clean_acc", "ra", "asr", "poison_healed", "model_damage"]


def heal_rows(report: dict) -> list[dict]:
    """'none' (θ0) and the healed model, as rows of the before/after table."""
    b, a = report["before"], report["after"]
    return [
        {"model": "none (θ0)", **b, "poison_healed": report["before_poison_healed"], "model_damage": 0.0},
        {"model": report["method"], **a},
    ]


def heal_table(report: dict) -> str:
    total = report["deletion_set"].get("n_poison_total")
    of = f" of {total} poisoned" if total is not None else ""
    head = (f"method {report['method']} ({report['backend']}), deletion set {report['deletion_set']['size']}"
            f"{of}; k*={report.get('k_star')} alpha={fmt(report.get('alpha'))}")
    note = report["before"].get("note")
    return (head + "\n" + format_table(heal_rows(report), METRIC_COLUMNS) + (f"\n{note}" if note else "")
            + guard_lines(report))


def before_after_metrics(report: dict) -> dict[str, float]:
    """``before_<m>`` and ``after_<m>`` for every column of the before/after table: the
    numbers an MLflow parent run carries."""
    out = {}
    for row, prefix in zip(heal_rows(report), ("before_", "after_")):
        for key in METRIC_COLUMNS[1:]:
            if isinstance(row.get(key), (int, float)):
                out[prefix + key] = float(row[key])
    return out


def guard_lines(report: dict) -> str:
    """What the damage guard saw and why it chose its step (xlf_ptn_guard only)."""
    g = (report.get("info") or {}).get("guard")
    if not g:
        return ""
    p0, proxy = g.get("proxy0") or {}, report.get("proxy") or {}
    k = report.get("k_star")
    dmg = (g.get("damage") or {}).get(str(k))
    return (f"\ndamage guard: δ={fmt(g.get('max_damage'))} points on a clean proxy of {proxy.get('size', p0.get('n'))} "
            f"retain images, {p0.get('n_excluded', 0)} of them left out as poison-like (θ0: {fmt(p0.get('acc'))}); "
            f"chosen k={k} (proxy damage {fmt(dmg)}), paper's "
            f"k*={g.get('k_paper')}\n  why: {g.get('reason')}")
