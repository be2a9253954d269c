"""Redo one benchmark cell with an implementation of its own, and compare.

A surprising benchmark number is only a finding once the harness — and the method's code —
is ruled out. This script shares nothing with the code under test but the trained model and
the data (``load_run``: the checkpoint, the training set and the test sets as ``potion``
loads them) and the cell's deletion set, which it checks against ``poison.parquet`` itself.
Everything else is written out below, straight from SPEC.md: the importances (§5, batch-mean
gradients through ``torch.autograd`` summed in float64), the ratios, percentiles and α
(§7, ``np.percentile``), the dampening (§6), a linear scan over k (§8), and the accuracy,
ra and asr loops (§4). It prints both results side by side and exits 1 if they disagree.
A cell that kept θ0 (no crossing, or nothing to heal) is checked the same way: both sides
must say so. Cells of ``ssd`` (fixed α, λ) are checked without the scan.

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
import torch.nn.functional as F

from potion.runs.folder import load_run

ESTIMATOR = {"ssd": "fisher", "ssd_ptn": "fisher", "lf_ptn": "lf", "xlf_ptn": "xlf"}
EVAL_BS = 256


# ---------------------------------------------------------------- SPEC §5
def importances(model, batches, estimator: str) -> dict[str, torch.Tensor]:
    """I = (1/K) Σ_b G(b), G from the gradient of the batch mean, in eval mode."""
    model.eval()
    named = list(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    k = 0
    for x, y in batches:
        logits = model(x.float())
        if estimator == "fisher":
            objective = F.cross_entropy(logits, y)
        elif estimator == "lf":
            objective = (logits * logits).sum(dim=1).mean()
        else:  # xlf: the mean of the logits' Euclidean norms
            objective = torch.sqrt((logits * logits).sum(dim=1)).mean()
        grads = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
        for (n, p), g in zip(named, grads):
            g = torch.zeros_like(p) if g is None else g.detach()
            sums[n] += (g * g if estimator == "fisher" else g.abs()).double()
        k += 1
    return {n: s / k for n, s in sums.items()}


# ---------------------------------------------------------------- SPEC §6, §7
def ratios(imp_f, imp_r) -> np.ndarray:
    r = np.concatenate([(imp_f[n] / imp_r[n]).reshape(-1).numpy() for n in imp_f])
    return r[np.isfinite(r)]


def alpha_for(r: np.ndarray, s: float) -> float:
    q = min(100.0, max(0.0, 100.0 - math.log(1.0 + 100.0 * s)))
    return float(np.percentile(r, q))


def dampened(theta0, imp_f, imp_r, alpha: float, lam: float) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in theta0.items():
        if n not in imp_f:
            out[n] = t.clone()
            continue
        f, r, w = imp_f[n], imp_r[n], t.double()
        beta = torch.clamp(lam * r / f, max=1.0)  # inf/NaN only where f = 0, never selected
        out[n] = torch.where(f > alpha * r, w * beta, w).to(t.dtype)
    return out


# ---------------------------------------------------------------- SPEC §4
@torch.no_grad()
def predictions(model, view) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    pred, lab = [], []
    for x, y in view.batches(EVAL_BS):
        pred.append(model(x.float()).argmax(dim=1))
        lab.append(y)
    return torch.cat(pred).numpy(), torch.cat(lab).numpy()


def acc_on(model, view) -> float:
    p, y = predictions(model, view)
    return float((p == y).mean())


def attack(model, clean, triggered, target: int) -> dict:
    clean_acc = acc_on(model, clean)
    p, y = predictions(model, triggered)
    other = y != target
    return {"clean_acc": clean_acc, "ra": float((p == y).mean()), "asr": float((p[other] == target).mean())}


# ---------------------------------------------------------------- the cell
def check_deletion(model_dir: Path, deletion: np.ndarray, n_forget: int) -> str | None:
    """The deletion set is an input here; check it against the poison table directly."""
    table = pq.read_table(model_dir / "poison.parquet").to_pydict()
    poisoned = {i for i, p in zip(table["index"], table["poisoned"]) if p}
    if len(set(deletion.tolist())) != len(deletion):
        return "has repeated indices"
    if not set(deletion.tolist()) <= poisoned:
        return "holds samples that are not poisoned"
    if len(deletion) != n_forget:
        return f"has {len(deletion)} samples, the row says {n_forget}"
    return None


def recompute(model_dir: Path, method: str, deletion: np.ndarray, bs: int, heal: dict) -> dict:
    run = load_run(model_dir)
    model = run.model.float().eval()
    n_total = run.manifest.table.num_rows
    retain = np.setdiff1d(np.arange(n_total), deletion)
    view = run.train_view()
    forget_view = view.subset(deletion)
    est = ESTIMATOR[method]
    t0 = time.perf_counter()
    imp_f = importances(model, forget_view.batches(bs), est)
    imp_r = importances(model, view.subset(retain).batches(bs), est)
    imp_s = time.perf_counter() - t0

    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    k_star = alpha_star = None  # no crossing (or acc0 = 0): the benchmark keeps θ0
    if method == "ssd":
        alpha_star = float(heal["ssd_alpha"])
        model.load_state_dict(dampened(theta0, imp_f, imp_r, alpha_star, float(heal["ssd_lambda"])))
    else:
        ptn = heal["ptn"]
        r = ratios(imp_f, imp_r)
        acc0 = acc_on(model, forget_view)
        for k in range(ptn["max_steps"] + 1 if acc0 > 0 else 0):
            s = (len(deletion) / n_total) / ptn["buffer"] * ptn["step"] ** k
            alpha = alpha_for(r, s)
            model.load_state_dict(dampened(theta0, imp_f, imp_r, alpha, 1.0))
            if acc_on(model, forget_view) <= ptn["rho"] * acc0:
                k_star, alpha_star = k, alpha
                break
        else:
            model.load_state_dict(theta0)
    clean, triggered = run.test_views(seed=run.job.poison.seed)
    target = run.manifest.target
    after = attack(model, clean, triggered, target)
    model.load_state_dict(theta0)
    before = attack(model, clean, triggered, target)
    healed = 100.0 * after["ra"] / after["clean_acc"] if after["clean_acc"] else math.nan
    return {"k_star": k_star, "alpha": alpha_star, "clean_acc_after": after["clean_acc"], "ra_after": after["ra"],
            "asr_after": after["asr"], "poison_healed": healed,
            "model_damage": 100.0 * (after["clean_acc"] - before["clean_acc"]), "importance_s": imp_s}


# A single prediction may flip where float rounding differs; one test image moves an accuracy by 1/|T|.
TOLERANCES = [("k_star", 0), ("alpha", 1e-4), ("clean_acc_after", 1e-4), ("ra_after", 1e-4),
              ("asr_after", 1e-4), ("poison_healed", 1e-2), ("model_damage", 1e-2)]


def check(results: Path, cell: str) -> tuple[bool, list[str]]:
    """Recompute ``cell`` of the benchmark in ``results``; (agree, printable lines)."""
    rows = [r for r in pq.read_table(results / "results.parquet").to_pylist() if r["cell_id"] == cell]
    if not rows:
        raise SystemExit(f"no cell '{cell}' in {results / 'results.parquet'}")
    row = rows[0]
    if row["status"] != "ok" or row["method"] not in ESTIMATOR:
        raise SystemExit(f"cell {cell} is {row['status']} / {row['method']}: pick a finished "
                         f"{', '.join(ESTIMATOR)} cell")
    heal = json.loads((results / "cells" / cell / "report.json").read_text())["config"]
    deletion = np.sort(pq.read_table(results / "cells" / cell / "deletion_set.parquet").column("index").to_numpy())
    bad = check_deletion(Path(row["model_dir"]), deletion, row["n_forget"])
    mine = recompute(Path(row["model_dir"]), row["method"], deletion, heal["importance_batch_size"], heal)
    lines = [f"cell {cell}: deletion set {'OK' if bad is None else 'BAD: ' + bad} ({len(deletion)} samples)",
             f"{'':18}{'benchmark':>14}{'direct':>14}"]
    ok = bad is None
    for key, tol in TOLERANCES:
        a, b = row[key], mine[key]
        if a is None or b is None or tol == 0:
            agree = a == b
        else:
            agree = math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        ok &= agree
        lines.append(f"{key:18}{'-' if a is None else f'{a:.6g}':>14}{'-' if b is None else f'{b:.6g}':>14}  "
                     f"{'ok' if agree else 'MISMATCH'}")
    lines.append(f"importance pass: benchmark {row['importance_s']:.1f} s, direct {mine['importance_s']:.1f} s")
    lines.append("agree" if ok else "DISAGREE")
    return ok, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the benchmark's output folder (holds results.parquet and cells/)")
    ap.add_argument("cell", help="a cell_id of a finished ssd / ssd_ptn / lf_ptn / xlf_ptn cell")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ok, lines = check(Path(args.results), args.cell)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
