"""Every heal method on one case, side by side: healed %, damage and wall time per discovery
share, and the Pareto picture (healed % against damage, one marker per method and share).

    POTION_DATA=/path/to/data python benchmarks/heal_more.py --suite mnist-cpu --num-cpus 2
    POTION_DATA=/path/to/data python benchmarks/heal_more.py --suite cifar10-cpu --n 0.01 --shares one,0.1,0.5,1.0
    python benchmarks/heal_more.py --smoke          # digits, about a minute on 2 cores

A case is a benchmark suite (benchmarks/suites/NAME.yaml or a YAML path): its data, model,
recipe, poisons, n, shares and seeds, with the methods replaced by ``--methods`` (default:
none, xlf_ptn, xlf_ptn_guard, potion heal's default method, task_vector, finetune, eu).
The cells run through ``potion benchmark`` (Ray tasks; trained models and finished cells in
``--out`` are reused), so every number below is read from a cell's heal report.

How each method is healed: ``xlf_ptn`` is the paper's method at the suite's importance batch
size B (512, SPEC §5); every other method runs as ``potion heal`` runs it (B chosen from |Dr|);
``eu`` (a full retraining per cell) only where the suite's own eu entry allows it.

Prints one table per case (the mean over 10–100 % discovery, one-shot separately, then per
scenario and share: healed % / damage pp / wall s) and writes the figure to
``--figures``/heal_more-SUITE.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

from potion.bench.grid import MethodSpec, SuiteConfig, expand, load_suite
from potion.bench.run import benchmark
from potion.config import from_dict, to_dict
from potion.errors import PotionError
from potion.runs.configs import HealJob

REPO = Path(__file__).resolve().parent.parent
BASELINES = ("task_vector", "finetune")
AT_SUITE_B = ("none", "xlf_ptn")  # the paper's B; none does not care


def default_methods() -> list[str]:
    """none, the paper, today's guarded method, potion heal's default (whatever it is now), the baselines, eu."""
    return list(dict.fromkeys(["none", "xlf_ptn", "xlf_ptn_guard", HealJob().method, *BASELINES, "eu"]))


def method_specs(base: SuiteConfig, methods: list[str]) -> list[MethodSpec]:
    """The suite's methods replaced by ``methods``; eu keeps the suite's own n / shares limits."""
    limits = {m.method: m for m in (x if isinstance(x, MethodSpec) else MethodSpec(x) for x in base.methods)
              if m.method == "eu" and m.name is None}
    specs = []
    for name in methods:
        heal = {} if name in AT_SUITE_B else {"importance_batch_size": None}
        lim = limits.get(name)
        specs.append(MethodSpec(method=name, heal=heal, n=lim.n if lim else None, shares=lim.shares if lim else None))
    return specs


def build_suite(base: SuiteConfig, methods: list[str], *, n=None, shares=None, seeds=None,
                poisons=None) -> SuiteConfig:
    d = to_dict(base)
    d["methods"] = [to_dict(m) for m in method_specs(base, methods)]
    if poisons:
        d["poisons"] = [p for p in d["poisons"] if (p.get("name") or p["trigger"]) in poisons]
        if not d["poisons"]:
            raise PotionError(f"--poisons {','.join(poisons)} names none of the suite's poisons")
    for key, value in (("n", n), ("shares", shares), ("seeds", seeds)):
        if value:
            d[key] = value
    for m in list(d["methods"]):  # a method's limits stay inside the narrowed grid, or it goes
        for key in ("n", "shares"):
            if m.get(key):
                m[key] = [v for v in m[key] if str(v) in {str(x) for x in d[key]}]
                if not m[key]:
                    d["methods"].remove(m)
                    break
    return from_dict(SuiteConfig, d)


def smoke_suite() -> SuiteConfig:
    """Digits (no download), a small CNN, badnet at 5 %: every method at 50 % discovery and one-shot."""
    return from_dict(SuiteConfig, {
        "name": "digits-heal-more-smoke", "description": "heal_more smoke: digits, small_cnn, badnet 5 %",
        "data": {"dataset": "digits", "args": {"upscale": 2}}, "model": {"name": "small_cnn", "args": {}},
        "recipe": {"iterations": 150, "batch_size": 128, "lr": 0.05}, "device": "cpu",
        "poisons": [{"trigger": "badnet"}], "n": [0.05], "shares": ["one", 0.5],
        "methods": ["none", {"method": "eu", "shares": [0.5]}], "seeds": [0],
        "heal": {"importance_batch_size": 128},
    })


def finished_rows(suite: SuiteConfig, out: Path) -> list[dict]:
    """The rows of the suite's cells already finished in ``out`` (each as its heal task recorded it)."""
    plan = expand(suite, out, None)
    rows = []
    for c in plan.cells:
        path = out / "cells" / f"{c.cell_id}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        if rec and rec.get("key") == c.key:
            rows.append(rec["row"])
    return rows


# ---------------------------------------------------------------- the table
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def summarize(rows: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per method: means of healed %, damage pp and wall s over the 10–100 % shares and over
    one-shot cells (ok cells only), with their cell counts."""
    out = {}
    for m in methods:
        ok = [r for r in rows if r["method"] == m and r["status"] == "ok"]
        entry = {}
        for part, cells in (("shares", [r for r in ok if not r["one_shot"]]), ("one", [r for r in ok if r["one_shot"]])):
            entry[part] = {"healed": _mean(r["poison_healed"] for r in cells),
                           "damage": _mean(r["model_damage"] for r in cells),
                           "wall": _mean(r["wall_s"] for r in cells), "cells": len(cells)}
        entry["failed"] = sum(r["method"] == m and r["status"] != "ok" for r in rows)
        out[m] = entry
    return out


def markdown(rows: list[dict], methods: list[str]) -> str:
    summary = summarize(rows, methods)
    lines = ["| method | healed % (10–100 %) | damage pp | wall s | cells | one-shot healed % | one-shot damage pp "
             "| cells |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, e in summary.items():
        s, o = e["shares"], e["one"]
        lines.append(f"| {m} | {_fmt(s['healed'], '.1f')} | {_fmt(s['damage'], '+.2f')} | {_fmt(s['wall'], '.0f')} "
                     f"| {s['cells']} | {_fmt(o['healed'], '.1f')} | {_fmt(o['damage'], '+.2f')} | {o['cells']} |")
    failed = {m: e["failed"] for m, e in summary.items() if e["failed"]}
    if failed:
        lines.append(f"\nfailed cells (left out): {failed}")
    scenarios = list(dict.fromkeys((r["poison"], r["n"]) for r in rows))
    shares = list(dict.fromkeys(r["share_label"] for r in rows))
    for poison, n in scenarios:
        lines += ["", f"{poison}, n = {n:g}: healed % / damage pp / wall s", "",
                  "| method | " + " | ".join(shares) + " |", "| --- |" + " --- |" * len(shares)]
        for m in methods:
            cells = []
            for sh in shares:
                hit = [r for r in rows if (r["poison"], r["n"], r["method"], r["share_label"]) == (poison, n, m, sh)]
                ok = [r for r in hit if r["status"] == "ok"]
                cells.append("" if not hit else "failed" if not ok else
                             f"{_mean(r['poison_healed'] for r in ok):.1f} / {_mean(r['model_damage'] for r in ok):+.2f}"
                             f" / {_mean(r['wall_s'] for r in ok):.0f}" + (" ‡" if any(r.get("note") for r in ok) else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += [""] + [f"‡ {n}" for n in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- the figure
def figure(rows: list[dict], methods: list[str], path: Path, title: str) -> Path:
    """Healed % against damage: one marker per (method, share), the mean over scenarios and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from potion.io import atomic_write

    shares = list(dict.fromkeys(r["share_label"] for r in rows))
    markers = dict(zip(shares, "o^sDvP*X"))
    colours = dict(zip(methods, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in methods:
        for sh in shares:
            ok = [r for r in rows if r["method"] == m and r["share_label"] == sh and r["status"] == "ok"]
            if ok:
                ax.scatter(_mean(r["model_damage"] for r in ok), _mean(r["poison_healed"] for r in ok),
                           color=colours[m], marker=markers[sh], s=60, edgecolors="black", linewidths=0.5)
    for m in methods:
        ax.scatter([], [], color=colours[m], marker="o", label=m)
    for sh in shares:
        ax.scatter([], [], color="grey", marker=markers[sh], label=f"share {sh}")
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.axvline(-1, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("model damage (points of clean accuracy; right is better)")
    ax.set_ylabel("poison healed %")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main
def _list(text: str | None, kind=str) -> list | None:
    if not text:
        return None
    return [v if v == "one" else kind(v) for v in (x.strip() for x in text.split(",")) if v]


def _number(v: str):
    return float(v) if any(c in v for c in ".e") else int(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", help="the case: a suite name under benchmarks/suites or a YAML path")
    ap.add_argument("--smoke", action="store_true", help="a digits case that runs in about a minute")
    ap.add_argument("--methods", help=f"comma-separated (default: {','.join(default_methods())})")
    ap.add_argument("--n", help="poison sizes to keep, e.g. 0.01 (default: the suite's)")
    ap.add_argument("--shares", help="discovery shares, e.g. one,0.1,0.5,1.0 (default: the suite's)")
    ap.add_argument("--seeds", help="deletion-draw seeds, e.g. 0,1 (default: the suite's)")
    ap.add_argument("--poisons", help="poison names to keep, e.g. sine (default: the suite's)")
    ap.add_argument("--out", help="work folder (default benchmarks/work/heal_more/SUITE; models and cells reused)")
    ap.add_argument("--figures", default=str(REPO / "benchmarks" / "results" / "heal_more"), help="where the PNG goes")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: the table and figure from the cells finished in --out so far")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster it starts")
    ap.add_argument("--address", help="an existing Ray cluster")
    args = ap.parse_args(argv)
    if bool(args.suite) == bool(args.smoke):
        raise SystemExit("give --suite NAME or --smoke")
    try:
        methods = _list(args.methods) or default_methods()
        base = smoke_suite() if args.smoke else load_suite(args.suite)[0]
        suite = build_suite(base, methods, n=_list(args.n, _number), shares=_list(args.shares, _number),
                            seeds=_list(args.seeds, int), poisons=_list(args.poisons))
        out = Path(args.out or REPO / "benchmarks" / "work" / "heal_more" / suite.name)
        command = shlex.join(["python", "benchmarks/heal_more.py", *(sys.argv[1:] if argv is None else argv)])
        rows = (finished_rows(suite, out) if args.table_only else
                benchmark(suite, out, address=args.address, num_cpus=args.num_cpus, tracking_uri="none",
                          command=command))
    except PotionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    png = figure(rows, methods, Path(args.figures) / f"heal_more-{suite.name}.png",
                 f"{suite.name}: healed vs damage (mean over scenarios)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n## {suite.name}\n\n- command: `{command}`\n- seeds: {suite.seeds}; machine: {cores} cores, "
          f"{platform.machine()}, torch threads per cell: {int(suite.cell_resources.cpus)}\n- figure: {png}\n")
    print(markdown(rows, methods))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
