"""potion_plus and its ingredients against the paper's method and the guard, on one run.

    python benchmarks/plus_ingredients.py --case digits
    POTION_DATA=/path/to/data python benchmarks/plus_ingredients.py --case mnist10k
    python benchmarks/plus_ingredients.py --run runs/mnist --ablations       # any run folder
    python benchmarks/plus_ingredients.py --smoke

Heals every discovery share (and one-shot, ``--counts 1``) with ``xlf_ptn`` (the paper),
``xlf_ptn_guard`` and ``potion_plus`` (and, with ``--ablations``, potion_plus with one
ingredient off at a time); prints per cell the healed share, the damage, the wall time, and
the expansion's precision and recall against the run's poison manifest, then per
procedure the means over cells. The run folder is trained when missing (WORK/<case>/run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import mnist_train_job  # noqa: E402

from potion.config import from_dict  # noqa: E402
from potion.heal.report import format_table  # noqa: E402
from potion.heal.run import run_heal  # noqa: E402
from potion.jobs.train import run_train  # noqa: E402
from potion.runs.configs import HealJob, ModelConfig, PoisonConfig, TrainJob  # noqa: E402
from potion.training import TrainRecipe  # noqa: E402

ABLATIONS = {"plus-no-expand": {"expand": False}, "plus-1-round": {"rounds": 1},
             "plus-no-repair": {"repair_steps": 0}, "plus-no-shuffle": {"shuffle_retain": False}}


def train_job(case: str, smoke: bool = False) -> TrainJob:
    if case == "digits":
        return TrainJob(poison=PoisonConfig(trigger="badnet", share=0.05, target=0, seed=0),
                        model=ModelConfig(name="small_cnn" if smoke else "resnet9",
                                          args={} if smoke else {"width": 0.25}),
                        recipe=TrainRecipe(iterations=150 if smoke else 300, batch_size=128, lr=0.05, seed=0),
                        device="cpu")
    job = mnist_train_job(iterations=400)  # mnist10k: 10,000 MNIST images, about 10 epochs
    job.data.args.update(train_limit=10000, test_limit=2000, seed=0)
    job.device = "cpu"
    return job


def heal_cell(run: Path, method: str, plus: dict, out: Path, share, count) -> dict:
    job = from_dict(HealJob, {"method": method, "cache_dir": "none", "tracking_uri": "none", "device": "cpu",
                              "on_no_crossing": "keep", "plus": plus})
    t0 = time.perf_counter()
    rep = run_heal(run, job, out, share=share, count=count, overwrite=True, progress=False)
    exp = ((rep["info"].get("plus") or {}).get("expansion")) or {}
    rounds = (rep["info"].get("plus") or {}).get("rounds") or []
    return {"|Sf|": rep["deletion_set"]["size"], "healed": rep["after"]["poison_healed"],
            "damage": rep["after"]["model_damage"], "wall_s": time.perf_counter() - t0,
            "found": exp.get("found"), "precision": exp.get("precision"), "recall": exp.get("recall"),
            "picked": ",".join(str(r.get("picked")) for r in rounds) or None,
            "failed": any(k in rep["info"] for k in ("no_crossing", "nothing_to_heal", "guard_no_safe_step"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["digits", "mnist10k"], default="digits")
    ap.add_argument("--run", help="an existing run folder (default: train WORK/<case>/run)")
    ap.add_argument("--work", default="benchmarks/work/plus_ingredients")
    ap.add_argument("--shares", default="0.1,0.5,1.0")
    ap.add_argument("--counts", default="1", help="discovery counts too (one-shot: 1); '' for none")
    ap.add_argument("--ablations", action="store_true", help="also potion_plus with one ingredient off at a time")
    ap.add_argument("--procs", help="only these procedures, e.g. paper,plus (default: all)")
    ap.add_argument("--smoke", action="store_true", help="a small CNN on digits, one share, no one-shot")
    args = ap.parse_args()
    if args.smoke:
        args.case, args.shares, args.counts, args.work = "digits", "0.5", "", args.work + "-smoke"
    work = Path(args.work) / args.case
    run = Path(args.run) if args.run else work / "run"
    if not run.exists():
        run_train(train_job(args.case, args.smoke), run, progress=False)
    procs = {"paper": ("xlf_ptn", {}), "guard": ("xlf_ptn_guard", {}), "plus": ("potion_plus", {})}
    if args.ablations:
        procs.update({name: ("potion_plus", ov) for name, ov in ABLATIONS.items()})
    if args.procs:
        procs = {k: v for k, v in procs.items() if k in args.procs.split(",")}
    cells = [(float(s), None) for s in args.shares.split(",") if s] + \
            [(None, int(c)) for c in args.counts.split(",") if c]
    rows = []
    for share, count in cells:
        for proc, (method, plus) in procs.items():
            what = f"{share:.0%}" if share is not None else f"n={count}"
            r = heal_cell(run, method, plus, work / f"{proc}-{what}", share, count)
            rows.append({"cell": what, "procedure": proc, **r})
            print(f"{args.case} {what:>5} {proc:>15}: healed {r['healed']:.2f} damage {r['damage']:+.2f} "
                  f"wall {r['wall_s']:.1f} s found {r['found']} precision {r['precision']} recall {r['recall']}",
                  flush=True)
    print(f"\n## {args.case}: cells\n")
    print(format_table(rows, ["cell", "procedure", "|Sf|", "healed", "damage", "wall_s", "found", "precision",
                              "recall", "picked", "failed"]))
    print(f"\n## {args.case}: means over the shares {args.shares} (one-shot apart)\n")
    summary = []
    for proc in procs:
        mine = [r for r in rows if r["procedure"] == proc and not r["cell"].startswith("n=")]
        paper = [r for r in rows if r["procedure"] == "paper" and not r["cell"].startswith("n=")]
        one = [r for r in rows if r["procedure"] == proc and r["cell"].startswith("n=")]
        summary.append({"procedure": proc, "healed": statistics.mean(r["healed"] for r in mine),
                        "damage": statistics.mean(r["damage"] for r in mine),
                        "worst_damage": min(r["damage"] for r in mine),
                        "time_vs_paper": (sum(r["wall_s"] for r in mine) / sum(r["wall_s"] for r in paper)
                                          if paper else None),
                        "one_shot_healed": one[0]["healed"] if one else None,
                        "one_shot_damage": one[0]["damage"] if one else None})
    print(format_table(summary, ["procedure", "healed", "damage", "worst_damage", "time_vs_paper",
                                 "one_shot_healed", "one_shot_damage"]))


if __name__ == "__main__":
    main()
