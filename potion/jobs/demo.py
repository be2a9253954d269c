"""``potion demo``: the whole pipeline on the embedded digits data, on one machine.

Poison ``digits`` with a badnet trigger, train a narrow ResNet-9, draw a deletion set of a
third of the poison, heal it with the default method (the deletion set grown; α searched with
Ray Tune on a local cluster under the damage guard where NegGrad+ is not kept), log
everything to MLflow and print the before/after table.
"""
from __future__ import annotations

import time
from pathlib import Path

from potion.io import check_output_dir
from potion.runs.configs import HealJob, TrainJob
from potion.heal.run import run_heal
from potion.heal.report import guard_lines, metric_table, plus_lines
from potion.tracking.store import ui_command
from potion.jobs.train import run_train


def run_demo(out: str | Path = "runs/demo", *, overwrite: bool = False, smoke: bool = False,
             backend: str = "ray", progress: bool = True) -> dict:
    out = check_output_dir(out, overwrite).resolve()
    t0 = time.perf_counter()
    db = out / "mlflow.db"
    # one store for both runs: the heal's run page links to the model it healed
    train_job = TrainJob(tracking_uri=f"sqlite:///{db}", experiment="potion-demo-train")
    if smoke:
        train_job.recipe.iterations = 150
    print(f"[1/2] training {train_job.model.name} on poisoned digits ({train_job.recipe.iterations} iterations)")
    metrics = run_train(train_job, out / "train", overwrite=overwrite, progress=progress)
    print(f"      clean_acc={metrics['clean_acc']:.4f}  asr={metrics['asr']:.4f}  ({metrics['train_seconds']:.0f} s)")

    heal_job = HealJob(backend=backend, val_size=200, num_cpus=2,
                       tracking_uri=f"sqlite:///{db}", experiment="potion-demo", cache_dir="none")
    print(f"[2/2] healing with {heal_job.method} (the deletion set grown, NegGrad+ or XLF + PTN under the damage "
          f"guard) on the {backend} backend (deletion set: 30 % of the poison)")
    report = run_heal(out / "train", heal_job, out / "heal", share=0.3, overwrite=overwrite, progress=progress)
    print()
    print(metric_table(report) + guard_lines(report) + plus_lines(report))
    step = (f"k*={report['k_star']}  alpha={report['alpha']:.4g}" if report.get("k_star") is not None
            else "NegGrad+ kept")
    print(f"\n{step}  PTN evaluations={len(report['trace'])}  total {time.perf_counter() - t0:.0f} s")
    print(f"healed model: {out / 'heal' / 'model.pt'}")
    mlf = report.get("mlflow") or {}
    command, url = ui_command(f"sqlite:///{db}", mlf.get("experiment_id"), mlf.get("parent_run_id"))
    print(f"MLflow UI:    {command}\n      then open {url}")
    return report
