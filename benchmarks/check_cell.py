"""Recompute one benchmark cell by calling the core functions directly, and compare.

A surprising benchmark number is only a finding once the harness is ruled out. This script
takes a finished PTN cell of ``potion benchmark`` and redoes it without the harness, the
heal pipeline, ``HealContext``, the importance cache or ``StepEvaluator``: it draws the
deletion set from the manifest, computes I_f and I_r with ``compute_importances``, scans
k = 0, 1, … with ``share_at_step``, ``alpha_from_share`` (``np.percentile``, not the
sorted-once quantiles the search uses), ``dampen`` and ``potion.metrics.accuracy``, then
measures the healed model. It prints both results side by side and exits 1 if they
disagree. A cell that kept θ0 (no crossing, or nothing to heal) is checked the same way:
both sides must say so.

    python benchmarks/check_cell.py benchmarks/work/mnist-cpu badnet-n0.01-0.1-xlf_ptn-seed0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from potion.datasets import draw_deletion_set
from potion.metrics import accuracy, attack_metrics, model_damage, poison_healed
from potion.pipeline.runs import load_run
from potion.unlearning.dampening import alpha_from_share, dampen, importance_ratios
from potion.unlearning.importances import compute_importances
from potion.unlearning.ptn import share_at_step

ESTIMATOR = {"ssd_ptn": "fisher", "lf_ptn": "lf", "xlf_ptn": "xlf"}


def recompute(model_dir: Path, method: str, share: float | None, count: int | None, seed: int, bs: int,
              rho: float, step: float, buffer: float, max_steps: int) -> dict:
    run = load_run(model_dir)
    model = run.model.eval()
    n_total = run.manifest.table.num_rows
    deletion = np.unique(draw_deletion_set(run.manifest, share=share, count=count, seed=seed))
    retain = np.setdiff1d(np.arange(n_total), deletion)
    view = run.train_view()
    forget_view = view.subset(deletion)
    t0 = time.perf_counter()
    est = ESTIMATOR[method]
    imp_f = compute_importances(model, forget_view.batches(bs), est)
    imp_r = compute_importances(model, view.subset(retain).batches(bs), est)
    imp_s = time.perf_counter() - t0

    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = importance_ratios(imp_f, imp_r)
    acc0 = accuracy(model, forget_view, bs)
    k_star = alpha_star = None  # no crossing (or acc0 = 0): the benchmark keeps θ0
    for k in range(max_steps + 1 if acc0 > 0 else 0):
        alpha = alpha_from_share(ratios, share_at_step(k, len(deletion), n_total, buffer, step))
        state, _ = dampen(theta0, imp_f, imp_r, alpha, 1.0)
        model.load_state_dict(state)
        if accuracy(model, forget_view, bs) <= rho * acc0:
            k_star, alpha_star = k, alpha
            break
    else:
        model.load_state_dict(theta0)
    clean, triggered = run.test_views(seed=run.job.poison.seed)
    target = run.manifest.target
    after = attack_metrics(model, clean, triggered, target)
    model.load_state_dict(theta0)
    before = attack_metrics(model, clean, triggered, target)
    return {"deletion": deletion, "k_star": k_star, "alpha": alpha_star, "clean_acc_after": after["clean_acc"],
            "ra_after": after["ra"], "asr_after": after["asr"],
            "poison_healed": poison_healed(after["ra"], after["clean_acc"]),
            "model_damage": model_damage(after["clean_acc"], before["clean_acc"]), "importance_s": imp_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the benchmark's output folder (holds results.parquet and cells/)")
    ap.add_argument("cell", help="a cell_id of a finished lf_ptn / xlf_ptn / ssd_ptn cell")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.results)
    rows = [r for r in pq.read_table(out / "results.parquet").to_pylist() if r["cell_id"] == args.cell]
    if not rows:
        raise SystemExit(f"no cell '{args.cell}' in {out / 'results.parquet'}")
    row = rows[0]
    if row["status"] != "ok" or row["method"] not in ESTIMATOR:
        raise SystemExit(f"cell {args.cell} is {row['status']} / {row['method']}: pick a finished PTN cell")
    report = json.loads((out / "cells" / args.cell / "report.json").read_text())
    heal = report["config"]
    ptn = heal["ptn"]
    count = row["n_forget"] if row["one_shot"] else None
    mine = recompute(Path(row["model_dir"]), row["method"], None if count else row["share"], count, row["seed"],
                     heal["importance_batch_size"], ptn["rho"], ptn["step"], ptn["buffer"], ptn["max_steps"])
    saved = pq.read_table(out / "cells" / args.cell / "deletion_set.parquet").column("index").to_numpy()
    same_set = np.array_equal(np.sort(saved), mine["deletion"])
    print(f"cell {args.cell}: deletion set {'identical' if same_set else 'DIFFERENT'} ({len(saved)} samples)")
    print(f"{'':18}{'benchmark':>14}{'direct':>14}")
    ok = same_set
    for key, tol in [("k_star", 0), ("alpha", 1e-6), ("clean_acc_after", 1e-4), ("ra_after", 1e-4),
                     ("asr_after", 1e-4), ("poison_healed", 1e-2), ("model_damage", 1e-2)]:
        a, b = row[key], mine[key]
        if a is None or b is None or tol == 0:
            agree = a == b
        else:
            agree = math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        ok &= agree
        print(f"{key:18}{'-' if a is None else f'{a:.6g}':>14}{'-' if b is None else f'{b:.6g}':>14}  "
              f"{'ok' if agree else 'MISMATCH'}")
    print(f"importance pass: benchmark {row['importance_s']:.1f} s, direct {mine['importance_s']:.1f} s")
    print("agree" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
