"""Study the damage guard and the importance batch size on one trained run (ground truth
allowed here: this is a benchmark, not the method).

For each importance batch size B and deletion share it computes XLF importances, finds the
paper's k* (linear), then measures every step of a window around it: a_k on Sf, the clean
proxy (all / target-labelled / other), the test set's clean accuracy and ra, and how many
of the undiscovered poison in the proxy are healed. It prints the paper's pick and the
guard's pick for several δ and writes everything as JSON.

    python benchmarks/guard_study.py --run runs/mnist2 --shares 0.1,0.5,one --batch-sizes 64,512 \\
        --out benchmarks/results/guard_study/mnist2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from potion.datasets import draw_deletion_set
from potion.metrics import model_damage, poison_healed
from potion.heal.sets import draw_proxy
from potion.runs.folder import load_run
from potion.unlearning.guard import GuardConfig, guard_choose
from potion.unlearning.importances import compute_importances
from potion.unlearning.evaluator import StepEvaluator
from potion.unlearning.ptn import PTNConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--shares", default="0.1,0.5")
    ap.add_argument("--batch-sizes", default="512")
    ap.add_argument("--proxy-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--before", type=int, default=30, help="steps measured below the paper's k*")
    ap.add_argument("--after", type=int, default=20, help="steps measured above the paper's k*")
    ap.add_argument("--deltas", default="0.5,1,2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)

    run = load_run(args.run)
    model = run.model.eval()
    m = run.manifest
    n_total = m.table.num_rows
    view = run.train_view()
    clean, trig = run.test_views(seed=run.job.poison.seed)
    # A seeded random slice, not the first rows: CIFAR-10-jpeg is stored sorted by class, and its
    # first 1,000 test images are classes 0 and 1 only (half of them the target class, where the
    # damage concentrates): they read −18 points where the whole test split read −3.
    pos = np.sort(np.random.default_rng(0).choice(len(clean), size=min(args.test_size, len(clean)), replace=False))
    clean_b = list(clean.subset(pos).batches(512))
    trig_b = list(trig.subset(pos).batches(512))
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = m.poisoned_mask
    out: list[dict] = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for share in args.shares.split(","):
            kw = {"count": 1} if share == "one" else {"share": float(share)}
            deletion = np.unique(draw_deletion_set(m, seed=0, **kw))
            retain = np.setdiff1d(np.arange(n_total), deletion)
            proxy = draw_proxy(retain, args.proxy_size, 0)
            t0 = time.perf_counter()
            model.load_state_dict(state0)
            fb = list(view.subset(deletion).batches(bs))
            imp_f = compute_importances(model, fb, "xlf")
            imp_r = compute_importances(model, view.subset(retain).batches(bs), "xlf")
            t_imp = time.perf_counter() - t0
            ev = StepEvaluator(model, state0, imp_f, imp_r, fb, len(deletion), n_total, PTNConfig(),
                               proxy_batches=list(view.subset(proxy).batches(512)))
            acc0 = ev.acc0
            base = ev.proxy_base
            thr = 0.2 * acc0
            k_star = None
            for k in range(501):  # a_k alone first (cheap), to place the window
                ev.model.load_state_dict(ev.healed_state(k))
                if ev._accuracy(ev.forget_batches) <= thr:
                    k_star = k
                    break
            lo = 0 if k_star is None else max(0, k_star - args.before)
            hi = 500 if k_star is None else k_star + args.after
            ev.model.load_state_dict(state0)
            clean0, ra0 = ev._accuracy(clean_b), ev._accuracy(trig_b)
            proxy_poison = proxy[poisoned[proxy]]
            rows = []
            for k in range(lo, hi + 1):
                r = ev.evaluate(k)
                c, ra = ev._accuracy(clean_b), ev._accuracy(trig_b)
                rows.append({**r.to_dict(), "test_clean": c, "test_ra": ra,
                             "healed": poison_healed(ra, c), "damage": model_damage(c, clean0)})
            cell = {"batch_size": bs, "share": share, "n_forget": int(len(deletion)), "n_retain": int(len(retain)),
                    "acc0": acc0, "threshold": thr, "k_star": k_star, "window": [lo, hi], "proxy0": base.to_dict(),
                    "proxy_poison": int(len(proxy_poison)), "test_clean0": clean0, "test_ra0": ra0,
                    "importance_s": round(t_imp, 1), "rows": rows}
            # the guard, replayed on the measured window as if the steps below lo repeated a_k = acc0
            from potion.unlearning.ptn import StepResult

            pad = [StepResult(k=k, s=0, alpha=0, lam=1, n_selected=0, acc_forget=acc0, acc_proxy=base.acc,
                              acc_proxy_target=base.acc_target, acc_proxy_other=base.acc_other) for k in range(lo)]
            steps = pad + [StepResult(**{f: r[f] for f in StepResult.__dataclass_fields__}) for r in rows]
            picks = {}
            for d in [float(x) for x in args.deltas.split(",")]:
                for ahead in (0, 5, 10):
                    kp = next((r.k for r in steps if r.acc_forget <= thr), None)
                    dec, _ = guard_choose(steps if kp is None else steps[:kp + 1], kp, lambda k: steps[k],
                                          threshold=thr, acc0=acc0, base=base,
                                          cfg=GuardConfig(max_damage=d, ahead=ahead), max_steps=hi)
                    row = next((r for r in rows if dec.choice is not None and r["k"] == dec.choice.k), None)
                    picks[f"delta={d:g},ahead={ahead}"] = {
                        "k": None if dec.choice is None else dec.choice.k, "status": dec.status,
                        "poison_share": round(dec.poison_share, 4),
                        "healed": None if row is None else round(row["healed"], 2),
                        "damage": None if row is None else round(row["damage"], 2),
                        "proxy_damage": None if dec.choice is None else round(dec.damage[dec.choice.k], 2)}
            cell["picks"] = picks
            ks = next((r for r in rows if r["k"] == k_star), None)
            paper = "no crossing" if ks is None else f"k*={k_star} healed {ks['healed']:.1f} damage {ks['damage']:+.2f}"
            print(f"B={bs} share={share} |Sf|={len(deletion)} proxy poison={len(proxy_poison)} "
                  f"imp {t_imp:.0f}s: paper {paper}", flush=True)
            for name, p in picks.items():
                print(f"    {name}: {p}", flush=True)
            out.append(cell)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "cells": out}, indent=1))


if __name__ == "__main__":
    main()
