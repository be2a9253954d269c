"""The paper's heal procedure vs Potion's default heal, in one process, same model and deletion sets.

    POTION_DATA=/path/to/data python benchmarks/heal_speed.py --case mnist --run runs/mnist
    POTION_DATA=/path/to/data python benchmarks/heal_speed.py --case cifar --run runs/cifar
    python benchmarks/heal_speed.py --case digits
    python benchmarks/heal_speed.py --smoke            # seconds: a tiny digits run

paper   = xlf_ptn with the full retain pass (``retain_sample=1.0``), the linear search, no
          importance cache, θ0's metrics measured again, evaluation at batch 512, fp32.
default = ``HealJob()`` as ``potion heal`` runs it, only with the cache off (``cache_dir=none``)
          so that no pass is reused. ``--variant NAME:KEY=VALUE`` heals with the default
          changed so as well, in the same run (e.g. ``s10:retain_sample=0.1``).

For every discovery share the deletion set is drawn once (seed 0) and healed once with the
paper's procedure and once per retain-sample seed with the default. Every heal is timed
end to end (``run_heal``: loading the run, decoding the data, importances, search,
evaluation, writing the outputs). Per case it prints the cells and stage times, then
``case NAME: speedup ...``; the LAST line is ``speedup X healed_delta Y damage_delta Z``
for the cases run (the smallest speedup and the most negative deltas over cases; deltas
are default minus paper in points, each the mean over shares × seeds).

A case's run folder is trained when missing (``--run`` or WORK/<case>/model). The data
root comes from ``--data-root``, else ``POTION_DATA``, else ``data/`` in the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import REPO, data_root, mnist_train_job  # noqa: E402

from potion.config import from_dict  # noqa: E402
from potion.runs.configs import DataConfig, HealJob, ModelConfig, PoisonConfig, TrainJob  # noqa: E402
from potion.heal.run import run_heal  # noqa: E402
from potion.heal.report import format_table  # noqa: E402
from potion.jobs.train import run_train  # noqa: E402
from potion.training import TrainRecipe  # noqa: E402
from potion.unlearning.batch_size import MAX_BATCH  # noqa: E402
from potion.unlearning.ptn import PTNConfig  # noqa: E402
from potion.unlearning.sampling import parse_retain_sample  # noqa: E402

PAPER_METHOD = "xlf_ptn"


def cifar_train_job(root) -> TrainJob:
    """The cifar10-cpu suite's sine model: 20,000 CIFAR-10-jpeg images, quarter-width ResNet-9,
    10 epochs, 1 % sine to class 0 (clean_acc 0.728, asr 0.90 measured; ~7 min on 2 cores).
    A shorter recipe (8,000 images, 200 iterations) learned no backdoor (asr 0.08)."""
    return TrainJob(
        data=DataConfig(dataset="parquet", args={"root": str(data_root("cifar10-jpeg", root)), "train_limit": 20000,
                                                 "test_limit": 5000, "seed": 0}),
        poison=PoisonConfig(trigger="sine", share=0.01, target=0, seed=0),
        model=ModelConfig(name="resnet9", args={"width": 0.25}),
        recipe=TrainRecipe(iterations=780, batch_size=256, lr=0.05, seed=0),
        device="cpu",
    )


def digits_train_job(smoke: bool) -> TrainJob:
    return TrainJob(
        poison=PoisonConfig(trigger="badnet", share=0.05, target=0, seed=0),
        model=ModelConfig(name="small_cnn" if smoke else "resnet9", args={} if smoke else {"width": 0.25}),
        recipe=TrainRecipe(iterations=150 if smoke else 300, batch_size=128, lr=0.05, seed=0),
        device="cpu",
    )


def paper_job(batch_size: int) -> HealJob:
    return HealJob(method=PAPER_METHOD, retain_sample="1.0", ptn=PTNConfig(strategy="linear"), cache_dir="none",
                   tracking_uri="none", remeasure=True, eval_batch_size=512, fast_eval=False,
                   importance_batch_size=batch_size, on_no_crossing="keep")


def default_job(batch_size: int | None, sample_seed: int, overrides: dict | None = None) -> HealJob:
    """``potion heal``'s defaults (cache off), with ``--default KEY=VALUE`` overrides for variants."""
    job = from_dict(HealJob, {"cache_dir": "none", "tracking_uri": "none", "retain_sample_seed": sample_seed,
                              "on_no_crossing": "keep", **(overrides or {})})
    if batch_size is not None:
        job.importance_batch_size = batch_size
    return job


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in HealJob.__dataclass_fields__:
            raise SystemExit(f"--default {item!r}: expected KEY=VALUE with KEY a HealJob field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def heal_cell(run: Path, job: HealJob, out: Path, share: float) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    rep = run_heal(run, job, out, share=share, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t = rep["timings"]
    sample = rep.get("retain_sample") or {}
    return {"|Sf|": rep["deletion_set"]["size"], "Dr used": sample.get("share_used"), "k*": rep["k_star"],
            "evals": rep["info"].get("evaluations"), "healed": rep["after"]["poison_healed"],
            "damage": rep["after"]["model_damage"], "imp_f_s": t.get("importance_forget_s"),
            "imp_r_s": t.get("importance_retain_s"), "search_s": t.get("search_s"),
            "other_s": wall - sum(t.get(k) or 0.0 for k in ("importance_forget_s", "importance_retain_s", "search_s")),
            "wall_s": wall, "cpu_s": cpu, "failed": any(k in rep["info"] for k in ("no_crossing", "nothing_to_heal"))}


def method_none_cli(run: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``potion heal --method none`` as a user runs it (a fresh process)."""
    cmd = [sys.executable, "-m", "potion.cli", "heal", "--run", str(run), "--discovery-share", "0.1",
           "--method", "none", "--tracking-uri", "none", "--cache-dir", "none", "--out", str(out),
           "--overwrite", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0, c0 = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, _children_cpu() - c0


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def aggregate(per_share: list[dict]) -> dict:
    """One procedure over the shares: the summed-wall-time speedup and the mean deltas."""
    return {"speedup": sum(p["paper_s"] for p in per_share) / sum(p["default_s"] for p in per_share),
            "healed_delta": statistics.mean(p["healed_delta"] for p in per_share),
            "damage_delta": statistics.mean(p["damage_delta"] for p in per_share),
            "cpu_speedup": sum(p["paper_cpu_s"] for p in per_share) / sum(p["default_cpu_s"] for p in per_share)}


def run_case(name: str, run: Path, work: Path, shares: list[float], seeds: list[int], batch_size: int | None,
             none_cli: bool, overrides: dict | None = None, variants: dict[str, dict] | None = None) -> dict:
    rows = []
    if none_cli:
        t_none, c_none = method_none_cli(run, work / "none")
        print(f"case {name}: potion heal --method none: {t_none:.1f} s wall, {c_none:.1f} s CPU (CLI, fresh process)",
              flush=True)
    else:
        t_none = None
    paper_bs = batch_size or MAX_BATCH  # SPEC §5's B; the default chooses its own unless --batch-size
    procs = {"default": overrides or {}, **(variants or {})}

    def proc_seeds(ov: dict) -> list[int]:
        # the full pass does not depend on the sample seed
        return seeds[:1] if parse_retain_sample(default_job(None, 0, ov).retain_sample).is_full else seeds

    for share in shares:
        cells = [("paper", paper_job(paper_bs), None)] + [(proc, default_job(batch_size, s, ov), s)
                                                          for proc, ov in procs.items() for s in proc_seeds(ov)]
        for proc, job, seed in cells:
            r = heal_cell(run, job, work / f"{proc}-{share:g}-{seed}", share)
            rows.append({"share": f"{share:.0%}", "procedure": proc, "seed": seed, **r})
            print(f"{name} {share:>5.0%} {proc:>7} seed {seed}: healed {r['healed']:.2f} damage {r['damage']:+.2f} "
                  f"k* {r['k*']} Dr used {r['Dr used'] or 0:.3f} wall {r['wall_s']:.1f} s", flush=True)
    cols = ["share", "procedure", "seed", "|Sf|", "Dr used", "k*", "evals", "healed", "damage", "imp_f_s",
            "imp_r_s", "search_s", "other_s", "wall_s", "cpu_s"]
    print(f"\n## case {name}\n")
    print(format_table(rows, cols))

    # Paired per share: each procedure's mean over seeds against the paper's cell of that share.
    per_share = []
    for share in shares:
        lab = f"{share:.0%}"
        paper = [r for r in rows if r["share"] == lab and r["procedure"] == "paper"][0]
        for proc in procs:
            dflt = [r for r in rows if r["share"] == lab and r["procedure"] == proc]
            per_share.append({"share": lab, "procedure": proc, "paper_s": paper["wall_s"],
                              "default_s": statistics.mean(r["wall_s"] for r in dflt),
                              "paper_cpu_s": paper["cpu_s"],
                              "default_cpu_s": statistics.mean(r["cpu_s"] for r in dflt),
                              "healed_delta": statistics.mean(r["healed"] for r in dflt) - paper["healed"],
                              "damage_delta": statistics.mean(r["damage"] for r in dflt) - paper["damage"]})
    for p in per_share:
        p["speedup"] = p["paper_s"] / p["default_s"]
        p["cpu_speedup"] = p["paper_cpu_s"] / p["default_cpu_s"]
    print()
    print(format_table(per_share, ["share", "procedure", "paper_s", "default_s", "speedup", "paper_cpu_s",
                                   "default_cpu_s", "cpu_speedup", "healed_delta", "damage_delta"]))
    for proc in list(variants or {}):
        v = aggregate([p for p in per_share if p["procedure"] == proc])
        print(f"case {name} variant {proc}: speedup {v['speedup']:.1f} healed_delta {v['healed_delta']:+.2f} "
              f"damage_delta {v['damage_delta']:+.2f}", flush=True)
    summary = {**aggregate([p for p in per_share if p["procedure"] == "default"]), "method_none_s": t_none,
               "failed_cells": sum(r["failed"] for r in rows)}
    print(f"\ncase {name}: speedup {summary['speedup']:.1f} healed_delta {summary['healed_delta']:+.2f} "
          f"damage_delta {summary['damage_delta']:+.2f} cpu_speedup {summary['cpu_speedup']:.1f}"
          + (f" method_none_s {t_none:.1f}" if t_none is not None else ""), flush=True)
    (work / "results.json").write_text(json.dumps({"rows": rows, "per_share": per_share, "summary": summary},
                                                  indent=2, default=str))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["mnist", "cifar", "digits"],
                    help="repeatable; default: digits with --smoke, else mnist and cifar")
    ap.add_argument("--run", action="append", default=[], help="run folder of each --case, in order")
    ap.add_argument("--data-root", help="folder holding mnist/ and cifar10-jpeg/ (default: $POTION_DATA)")
    ap.add_argument("--work", default="benchmarks/work/heal_speed")
    ap.add_argument("--shares", default="0.1,0.5,1.0", help="discovery shares")
    ap.add_argument("--seeds", default="0,1,2", help="retain-sample seeds of the default heal")
    ap.add_argument("--batch-size", type=int, help="importance batch size of both procedures (default: the job's)")
    ap.add_argument("--no-none", action="store_true", help="skip timing `potion heal --method none`")
    ap.add_argument("--smoke", action="store_true", help="a tiny digits run, one share, one seed (seconds)")
    ap.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                    help="change one HealJob field of the default heal, e.g. retain_sample=0.1")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="also heal with the default changed so, in the same run, e.g. s10:retain_sample=0.1")
    args = ap.parse_args()
    cases = args.case or (["digits"] if args.smoke else ["mnist", "cifar"])
    shares = [0.5] if args.smoke else [float(s) for s in args.shares.split(",")]
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    overrides = parse_overrides(args.default)
    variants = {}
    for v in args.variant:
        name, sep, items = v.partition(":")
        if not sep or not name or name in ("paper", "default"):
            raise SystemExit(f"--variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE] (NAME not paper/default)")
        variants[name] = {**overrides, **parse_overrides(items.split(","))}
    print(f"# heal_speed: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)

    summaries = {}
    for i, case in enumerate(cases):
        run = Path(args.run[i]) if i < len(args.run) else work / case / "model"
        if not (run / "model.pt").is_file():
            job = {"mnist": lambda: mnist_train_job(470, root=args.data_root),
                   "cifar": lambda: cifar_train_job(args.data_root),
                   "digits": lambda: digits_train_job(args.smoke)}[case]()
            t0 = time.perf_counter()
            run_train(job, run, progress=False)
            print(f"trained {run} in {time.perf_counter() - t0:.0f} s", flush=True)
        asr = json.loads((run / "metrics.json").read_text()).get("asr")
        if asr is not None and asr < 0.5:
            raise SystemExit(f"{run}: the model's attack success rate is {asr:.2f}; it learned no backdoor to "
                             "heal, so a speed comparison would time no healing. Train it longer or pass --run")
        bs = 64 if case == "digits" else args.batch_size
        summaries[case] = run_case(case, run, work / case, shares, seeds, bs, none_cli=not args.no_none and not args.smoke,
                                   overrides=overrides, variants=variants)

    worst = {k: min(s[k] for s in summaries.values()) for k in ("speedup", "healed_delta", "damage_delta")}
    print(f"speedup {worst['speedup']:.1f} healed_delta {worst['healed_delta']:+.2f} "
          f"damage_delta {worst['damage_delta']:+.2f}")


if __name__ == "__main__":
    main()
