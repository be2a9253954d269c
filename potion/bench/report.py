"""``potion report RESULTS``: a benchmark table → ``summary.md`` and per-scenario PNG plots.

The summary follows the paper's Table 1: per method, mean ± standard deviation of poison
healed and model damage over the discovery shares 10–100 % (every share except one-shot),
and separately for one-shot healing (|Sf| = 1). Only cells with status "ok" enter the
statistics; failed cells are listed with their errors.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow.parquet as pq

from potion.errors import PotionError
from potion.io import atomic_write, atomic_write_text
from potion.bench.grid import RESULTS_FILE
from potion.bench.results import read_meta

SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"
# The paper's row order: the method first, the baselines after it.
PAPER_ORDER = ["xlf_ptn_guard", "xlf_ptn_guard_autob", "xlf_ptn", "lf_ptn", "ssd_ptn", "ssd_grid", "ssd", "eu", "none"]
# SPEC §4: the paper's headline numbers (CIFAR10 ResNet-9 + CIFAR100 WRN-28x10, Goel grid).
PAPER_TABLE = {
    "xlf_ptn": ("93.72 ± 1.99", "-1.41 ± 0.92", "68.01 ± 14.61", "-1.34 ± 1.50"),
    "lf_ptn": ("92.49 ± 3.58", "-2.62 ± 4.01", "60.60 ± 4.13", "-5.94 ± 7.80"),
    "ssd_ptn": ("87.52 ± 11.18", "-3.76 ± 5.98", "18.24 ± 7.19", "0.00"),
    "ssd_grid": ("83.41 ± 14.07", "-5.68 ± 4.42", "18.24 ± 7.19", "0.00"),
    "eu": ("40.68 ± 32.16", "+0.04 ± 0.33", "19.49 ± 8.85", "+0.11 ± 0.20"),
    "none": ("18.24 ± 6.85", "0", "18.24 ± 6.85", "0"),
}


# ---------------------------------------------------------------- pure statistics
def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n − 1; 0 for a single value), NaNs dropped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var), n


def method_order(methods: list[str]) -> list[str]:
    seen = list(dict.fromkeys(methods))
    return [m for m in PAPER_ORDER if m in seen] + [m for m in seen if m not in PAPER_ORDER]


def summarize(rows: list[dict], one_shot: bool) -> list[dict]:
    """Per method: mean ± std of poison_healed and model_damage over the ok cells of one
    regime (one-shot, or every other share)."""
    ok = [r for r in rows if r["status"] == "ok" and bool(r["one_shot"]) == one_shot]
    out = []
    for m in method_order([r["method"] for r in ok]):
        sel = [r for r in ok if r["method"] == m]
        h = mean_std([r["poison_healed"] for r in sel])
        d = mean_std([r["model_damage"] for r in sel])
        out.append({"method": m, "healed_mean": h[0], "healed_std": h[1], "damage_mean": d[0],
                    "damage_std": d[1], "cells": h[2]})
    return out


def pm(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def share_text(share: float | None, label: str) -> str:
    if label == "one":
        return "1 sample"
    if label.startswith("c"):
        return f"{label[1:]} samples"
    return f"{100 * share:g} %"


def n_text(n: float) -> str:
    return f"{100 * n:g} % of D" if n < 1 else f"{int(n)}"


# ---------------------------------------------------------------- markdown
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _scenarios(rows: list[dict]) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r["poison"], r["n"]) for r in rows))


def _share_columns(rows: list[dict]) -> list[str]:
    labels = {r["share_label"]: (r["one_shot"], r["share"] if r["share"] is not None else math.inf) for r in rows}
    return sorted(labels, key=lambda k: (not labels[k][0], labels[k][1]))


def render_summary(rows: list[dict], meta: dict, plots: list[tuple[str, str]]) -> str:
    suite = meta.get("suite") or (rows[0]["suite"] if rows else "?")
    parts = [f"# Benchmark `{suite}`", ""]
    if meta.get("description"):
        parts += [meta["description"].strip(), ""]
    info = []
    if meta.get("command"):
        info.append(f"- command: `{meta['command']}`")
    if meta.get("date"):
        first = meta.get("first_date")
        info.append(f"- date: {meta['date']}" + (f" (first cells computed {first})" if first and first != meta["date"] else ""))
    if meta.get("last_rerun"):
        info.append(f"- rerun with every cell reused: {meta['last_rerun']} (`{meta.get('last_rerun_command', '')}`)")
    if "host_cores" in meta:
        gpu = meta.get("gpu") or "no GPU"
        cluster = ""
        if meta.get("cluster_cpus") is not None:
            cluster = f"; Ray cluster: {meta['cluster_cpus']:g} CPUs, {meta.get('cluster_gpus') or 0:g} GPUs"
        info.append(f"- machine: {meta['host_cores']} cores, {gpu}{cluster} ({meta.get('platform', '')}, "
                    f"Python {meta.get('python', '?')}, torch {meta.get('torch', '?')})")
    if meta.get("data"):
        info.append(f"- data: `{meta['data'].get('dataset')}` {meta['data'].get('args') or ''}")
    if meta.get("model"):
        info.append(f"- model: `{meta['model'].get('name')}` {meta['model'].get('args') or ''}")
    if meta.get("recipe"):
        r = meta["recipe"]
        info.append(f"- training: {r.get('iterations')} iterations, batch {r.get('batch_size')}, lr {r.get('lr')}")
    if meta.get("notes"):
        info.append(f"- **note**: {meta['notes'].strip()}")
    parts += info + [""]
    parts += ["Poison healed = 100 · ra / clean_acc of the healed model (%); model damage = 100 · (clean_acc "
              "after − before) in percentage points, negative is damage (SPEC §4). Mean ± sample standard "
              "deviation over the cells (scenarios × shares × seeds); failed cells are left out.", ""]

    scen_rows = []
    for poison, n in _scenarios(rows):
        ok = [r for r in rows if r["poison"] == poison and r["n"] == n and r["status"] == "ok"]
        if not ok:
            scen_rows.append([poison, n_text(n), "–", "–", "–", "–"])
            continue
        r0 = ok[0]
        scen_rows.append([poison, n_text(n), str(r0["n_poison"]), f"{100 * mean_std([r['clean_acc_before'] for r in ok])[0]:.2f}",
                          f"{100 * mean_std([r['asr_before'] for r in ok])[0]:.2f}",
                          f"{mean_std([r['poison_healed_before'] for r in ok])[0]:.2f}"])
    parts += ["## Poisoned models (θ0)", "",
              _md_table(["poison", "n", "poisoned samples", "clean acc %", "asr %", "poison healed %"], scen_rows), ""]

    multi = sorted({r["share"] for r in rows if not r["one_shot"] and r["share"] is not None})
    shares = ", ".join(f"{100 * s:g} %" for s in multi) or "none"
    for title, one in ((f"## Discovery shares 10–100 % (here: {shares})", False), ("## One-shot healing (|Sf| = 1)", True)):
        summ = summarize(rows, one)
        parts += [title, ""]
        if not summ:
            parts += ["No finished cells.", ""]
            continue
        parts += [_md_table(["method", "poison healed", "model damage", "cells"],
                            [[s["method"], pm(s["healed_mean"], s["healed_std"]),
                              pm(s["damage_mean"], s["damage_std"], signed=True), str(s["cells"])] for s in summ]), ""]

    parts += ["## Per scenario: poison healed % / model damage pp (mean over seeds)", ""]
    cols = _share_columns(rows)
    for poison, n in _scenarios(rows):
        sel = [r for r in rows if r["poison"] == poison and r["n"] == n and r["status"] == "ok"]
        if not sel:
            continue
        table = []
        for m in method_order([r["method"] for r in sel]):
            line = [m]
            for c in cols:
                cs = [r for r in sel if r["method"] == m and r["share_label"] == c]
                if not cs:
                    line.append("")
                    continue
                h, d = mean_std([r["poison_healed"] for r in cs])[0], mean_std([r["model_damage"] for r in cs])[0]
                line.append(f"{h:.1f} / {d:+.2f}")
            table.append(line)
        some = next(r for r in sel)
        head = [share_text(next((r["share"] for r in sel if r["share_label"] == c), None), c) for c in cols]
        parts += [f"### {poison}, n = {n_text(n)} ({some['n_poison']} poisoned)", "", _md_table(["method", *head], table), ""]

    timing = []
    for m in method_order([r["method"] for r in rows if r["status"] == "ok"]):
        sel = [r for r in rows if r["method"] == m and r["status"] == "ok"]
        timing.append([m, *(f"{mean_std([r[k] for r in sel])[0]:.1f}" for k in ("importance_s", "search_s", "total_s", "wall_s"))])
    if timing:
        parts += ["## Seconds per cell (mean)", "",
                  "Cells that need the same importances (ssd and ssd_ptn both use fisher) share one pass per model "
                  "and share: the first computes it, the other reads the importance cache and shows about 0 s.", "",
                  _md_table(["method", "importances", "search", "heal total", "cell wall"], timing), ""]

    failed = [r for r in rows if r["status"] != "ok"]
    parts += [f"## Failed cells ({len(failed)})", ""]
    parts += [_md_table(["cell", "error"], [[r["cell_id"], (r["error"] or "").replace("|", "\\|")] for r in failed])
              if failed else "None.", ""]

    kept = [r for r in rows if r["status"] == "ok" and r.get("note")]
    if kept:
        parts += [f"## Cells scored as the unchanged model ({len(kept)})", "",
                  "PTN found no crossing within max_steps, or θ0 already misclassified the whole deletion set "
                  "(acc0 = 0); SPEC §8 reports both as failures. The cell keeps θ0, as the paper scores such cases.", "",
                  _md_table(["cell", "note"], [[r["cell_id"], r["note"]] for r in kept]), ""]

    if plots:
        parts += ["## Plots", ""] + [f"![{title}]({path})" for title, path in plots] + [""]
    parts += ["## For reference: the paper's Table 1 (CIFAR10 ResNet-9 + CIFAR100 WRN-28x10, Goel grid)", "",
              "Different data and models: compare orderings, not numbers.", "",
              _md_table(["method", "poison healed", "model damage", "one-shot healed", "one-shot damage"],
                        [[m, *v] for m, v in PAPER_TABLE.items()]), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def plot_scenarios(rows: list[dict], folder: Path) -> list[tuple[str, Path]]:
    """One PNG per (poison, n): healed and damage against the discovery share, a line per method.
    One-shot healing sits at x = 0 (labelled "1")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for poison, n in _scenarios(rows):
        sel = [r for r in rows if r["poison"] == poison and r["n"] == n and r["status"] == "ok"]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        xs_all = set()
        for m in method_order([r["method"] for r in sel]):
            pts = {}
            for r in sel:
                if r["method"] != m:
                    continue
                x = 0.0 if r["one_shot"] else 100 * r["share"]
                pts.setdefault(x, []).append(r)
            xs = sorted(pts)
            xs_all.update(xs)
            for ax, key in zip(axes, ("poison_healed", "model_damage")):
                stats = [mean_std([r[key] for r in pts[x]]) for x in xs]
                ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", ms=4,
                            capsize=2, label=m)
        ticks = sorted(xs_all)
        for ax, ylabel in zip(axes, ("poison healed (%)", "model damage (pp)")):
            ax.set_xticks(ticks, ["1" if t == 0 else f"{t:g}%" for t in ticks], fontsize=8)
            ax.set_xlabel("discovery share (1 = one sample)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{sel[0]['suite']}: {poison}, n = {n_text(n)} ({sel[0]['n_poison']} poisoned)")
        fig.tight_layout()
        path = folder / f"{_slug(poison)}-n{n:g}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        made.append((f"{poison}, n = {n_text(n)}", path))
    return made


# ---------------------------------------------------------------- entry points
def results_path(arg: str | Path) -> Path:
    p = Path(arg)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise PotionError(f"results table {p} does not exist; run `potion benchmark --suite NAME` first "
                          "(it writes <out>/results.parquet)")
    return p


def report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``summary.md`` and ``plots/*.png``; returns the summary's path."""
    path = results_path(results)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's input problem
        raise PotionError(f"cannot read {path} as a Parquet results table: {e}") from None
    missing = {"cell_id", "method", "status", "share", "share_label", "one_shot", "poison_healed",
               "model_damage"} - set(table.column_names)
    if missing:
        raise PotionError(f"{path} is not a benchmark results table: no column(s) {', '.join(sorted(missing))}")
    rows = table.to_pylist()
    folder = Path(out) if out else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_scenarios(rows, folder / PLOTS_DIR)
    rel = [(t, str(p.relative_to(folder))) for t, p in plots]
    summary = folder / SUMMARY_FILE
    atomic_write_text(summary, render_summary(rows, read_meta(table), rel))
    return summary


def run_report(args) -> int:
    summary = report(args.results, getattr(args, "out", None))
    print(summary.read_text())
    print(f"summary: {summary}")
    return 0


__all__ = ["mean_std", "summarize", "render_summary", "plot_scenarios", "report", "run_report"]
