"""Heal an image classifier poisoned with a backdoor when only part of the poison was found.

Typical use: `potion train` a (poisoned) model or bring your own run folder, then `potion heal`
it with XLF importances and the PTN search, and open the MLflow UI it prints. `potion demo`
runs the whole pipeline on embedded data; `potion data` converts downloaded datasets.
Run `potion COMMAND --help` for the flags of each command.
"""
# Developer note: flags become config overrides (potion.config); the work is in potion.jobs, potion.heal and potion.bench.
from __future__ import annotations

import argparse
import json
import os
import sys

from potion.config import apply_overrides, from_dict, load_yaml
from potion.errors import PotionError
from potion.runs.destination import resolve_out


def _base_dict(args) -> dict:
    return load_yaml(args.config) if args.config else {}


def _overrides(pairs: list[tuple[str, object]]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in pairs if v is not None]


COMMON_FLAGS = ("config", "set", "device", "overwrite", "quiet")


def _add_common(p: argparse.ArgumentParser, group=None, only: tuple[str, ...] = COMMON_FLAGS) -> None:
    """The flags every job command has; ``group``/``only``: these of them, in that help group."""
    g = group if group is not None else p
    if "config" in only:
        g.add_argument("--config", help="YAML file with the job config; flags override it (default: built-in config)")
    if "set" in only:
        g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set recipe.lr=0.05 (repeatable; default: none)")
    if "device" in only:
        g.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto, a GPU when there is one)")
    if "overwrite" in only:
        g.add_argument("--overwrite", action="store_true", help="replace an existing output folder (default: refuse)")
    if "quiet" in only:
        g.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


# ---------------------------------------------------------------- train
def cmd_train(args) -> int:
    from potion.runs.configs import TrainJob, with_model_recipe
    from potion.jobs.train import run_train

    data = _base_dict(args)
    pairs = [("data.dataset", args.dataset), ("data.args.root", args.data_root),
             ("poison.trigger", args.poison), ("poison.target", args.target),
             ("model.name", args.model), ("recipe.iterations", args.iterations),
             ("recipe.batch_size", args.batch_size), ("recipe.lr", args.lr), ("device", args.device),
             ("tracking_uri", args.tracking_uri), ("experiment", args.experiment)]
    if args.poison_share is not None:
        pairs += [("poison.share", args.poison_share), ("poison.count", None)]
    if args.poison_count is not None:
        pairs += [("poison.count", args.poison_count)]
    if args.seed is not None:
        pairs += [("poison.seed", args.seed), ("recipe.seed", args.seed)]
    data = apply_overrides(data, _overrides(pairs) + args.set)
    if args.poison_count is not None:
        data["poison"]["share"] = None
    if args.model and "args" not in data.get("model", {}):
        data["model"]["args"] = {}  # the default model's args belong to the default model
    job = from_dict(TrainJob, with_model_recipe(data))
    metrics = run_train(job, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("clean_acc", "ra", "asr")}, indent=2))
    print(f"run folder: {resolve_out(args.out)}")
    return 0


# ---------------------------------------------------------------- the model to heal / evaluate
OWNER_FLAGS = ("model", "weights", "dataset", "data_root", "model_args", "mean", "std", "image_size",
               "triggered_test", "target")


def _add_owner_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own model and data (instead of --run)")
    g.add_argument("--model", help="path/to/file.py:Name, package.module:Name, timm:<name>, torchvision:<name> "
                                   "or a Potion model name (default: none, use --run)")
    g.add_argument("--model-args", help='JSON keyword arguments of the class/factory, e.g. \'{"num_classes": 10}\' (default: {})')
    g.add_argument("--weights", help="state_dict (.pt/.pth, loaded with weights_only=True), .safetensors, "
                                     "a Potion checkpoint, or a dict with 'state_dict'/'model' (default: the model's own init)")
    g.add_argument("--dataset", help="parquet, imagefolder, cifar10, cifar100 (used as stored: no trigger added; "
                                     "default: none)")
    g.add_argument("--data-root", help="folder of the dataset, e.g. data/mnist as `potion data` writes it (default: none)")
    g.add_argument("--mean", type=_floats, nargs="+", help="per-channel mean the model expects, e.g. 0.1307 or 0.485,0.456,0.406 "
                                              "(default 0: no normalisation)")
    g.add_argument("--std", type=_floats, nargs="+", help="per-channel std (default 1)")
    g.add_argument("--image-size", type=int, help="resize images to this size (default: as stored)")
    g.add_argument("--triggered-test", help="Parquet of test images carrying your trigger, true labels (needs --target; "
                   "default: none, ra and asr are not measured)")
    g.add_argument("--target", type=int, help="the attack's target class (needs --triggered-test; default: none)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _flat_floats(groups: list[list[float]] | None) -> list[float] | None:
    # --mean 0.485 0.456 0.406 and --mean 0.485,0.456,0.406 mean the same
    return None if groups is None else [v for g in groups for v in g]


def source_from_args(args):
    """The loader for ``--run`` (Potion's run folder) or the owner's pieces (``--model`` …)."""
    from potion.heal.inputs import OwnerSource, RunSource

    given = [f for f in OWNER_FLAGS if getattr(args, f, None) is not None]
    if args.run is not None:
        if given:
            raise PotionError(f"--run takes the model and data from the run folder; drop --{given[0].replace('_', '-')}")
        return RunSource(args.run, getattr(args, "checkpoint", None))
    if args.model is None:
        raise PotionError("give --run RUN_FOLDER, or your own model: --model FILE.py:Name --weights FILE "
                          "--dataset parquet --data-root DATA")
    if getattr(args, "checkpoint", None):
        raise PotionError("--checkpoint goes with --run; with --model give the weights as --weights")
    model_args = {}
    if args.model_args:
        try:
            model_args = json.loads(args.model_args)
        except ValueError as e:
            raise PotionError(f"--model-args is not valid JSON ({e}); e.g. '{{\"num_classes\": 10}}'") from None
        if not isinstance(model_args, dict):
            raise PotionError("--model-args must be a JSON object, e.g. '{\"num_classes\": 10}'")
    data_args = {"root": args.data_root} if args.data_root is not None else {}
    return OwnerSource(model=args.model, weights=args.weights, dataset=args.dataset, data_args=data_args,
                       model_args=model_args, mean=_flat_floats(args.mean), std=_flat_floats(args.std), image_size=args.image_size,
                       triggered_test=args.triggered_test, target=args.target)


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from potion.jobs.evaluate import evaluate_owner, run_evaluate
    from potion.heal.inputs import RunSource

    source = source_from_args(args)
    if isinstance(source, RunSource):
        metrics = run_evaluate(args.run, args.checkpoint, device=args.device or "auto", out=args.out,
                               overwrite=args.overwrite)
    else:
        metrics = evaluate_owner(source, device=args.device or "auto", out=args.out, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2))
    return 0


# ---------------------------------------------------------------- heal
def heal_job_from_args(args):
    from potion.runs.configs import HealJob

    backend = args.backend or ("ray" if (args.address or os.environ.get("RAY_ADDRESS")) else "local")
    pairs = [("method", args.method), ("backend", backend), ("ptn.rho", args.rho), ("ptn.step", args.step),
             ("ptn.buffer", args.buffer), ("ptn.max_steps", args.max_steps), ("ptn.strategy", args.strategy),
             ("ptn.window", args.window), ("importance_batch_size", args.batch_size), ("val_size", args.val_size),
             ("address", args.address), ("num_cpus", args.num_cpus), ("tracking_uri", args.tracking_uri),
             ("experiment", args.experiment), ("cache_dir", args.cache_dir), ("seed", args.seed),
             ("register_model", getattr(args, "register_model", None)),
             ("device", args.device), ("retain_sample", args.retain_sample),
             ("remeasure", True if args.remeasure else None),
             ("guard.max_damage", args.max_damage), ("proxy_size", args.proxy_size),
             ("allow_damage", True if args.allow_damage else None)]
    return from_dict(HealJob, apply_overrides(_base_dict(args), _overrides(pairs) + args.set))


def cmd_heal(args) -> int:
    from potion.heal.run import run_heal
    from potion.heal.report import heal_table

    source = source_from_args(args)
    job = heal_job_from_args(args)
    report = run_heal(source, job, args.out, share=args.discovery_share, count=args.discovery_count,
                      identified=args.identified, overwrite=args.overwrite, progress=not args.quiet)
    print(heal_table(report))
    from potion.tracking.store import where_to_look

    dest, mlf = resolve_out(args.out), report.get("mlflow") or {}
    print(f"healed model: {dest.child('model.pt')}\nreport: {dest.child('report.json')}")
    print(where_to_look(mlf.get("tracking_uri"), mlf.get("experiment_id"), mlf.get("parent_run_id")) or "", end="")
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from potion.jobs.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, smoke=args.smoke, backend=args.backend, progress=not args.quiet)
    return 0


# ---------------------------------------------------------------- data
def cmd_data(args) -> int:
    from potion.jobs.data import prepare_data

    summary = prepare_data(args.source, args.src, args.out, data_root_flag=args.data_root,
                           jpeg_quality=args.jpeg_quality, overwrite=args.overwrite,
                           image_column=args.image_column, label_column=args.label_column)
    print(f"wrote {summary['out']}: {summary['train']} train + {summary['test']} test images, "
          f"{summary['classes']} classes")
    print(f"use it with: --dataset parquet --data-root {summary['out']}")
    return 0


# ---------------------------------------------------------------- benchmark / report
def cmd_benchmark(args) -> int:
    from potion.bench.run import run_benchmark

    return run_benchmark(args)


def cmd_report(args) -> int:
    from potion.bench.report import run_report

    return run_report(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="poison a dataset and train a model on it")
    p.add_argument("--dataset", help="registered dataset: digits (default), parquet, cifar10, cifar100, imagefolder")
    p.add_argument("--data-root", help="folder of the dataset, e.g. data/mnist as `potion data` writes it "
                   "(data.args.root; default: none, digits is embedded)")
    p.add_argument("--poison", help="trigger: badnet (default), sine, moving")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--poison-share", type=float,
                   help="share of the training set to poison, 0.02 = 2 %% (default 0.02)")
    g.add_argument("--poison-count", type=int, help="number of training samples to poison (default: use --poison-share)")
    p.add_argument("--target", type=int, help="target class of the attack (default 0)")
    p.add_argument("--model", help="registered model: resnet9 (default), wrn, vit, small_cnn")
    p.add_argument("--iterations", type=int, help="optimizer updates (default 500; vit from scratch: 2000)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 128; vit from scratch: 64)")
    p.add_argument("--lr", type=float, help="peak learning rate after warm-up (default 0.05; vit: AdamW at 2e-3, at the paper's 2.5e-4 with model.init)")
    p.add_argument("--seed", type=int, help="seed of the poison draw and of training (default 0)")
    p.add_argument("--out", required=True, help="run folder to create (required)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, 'none' to disable (default: $POTION_TRACKING_URI, "
                   "else $MLFLOW_TRACKING_URI, else sqlite OUT/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default potion-train)")
    _add_common(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="clean_acc, ra and asr of a run's model (or another checkpoint, or your own model)")
    p.add_argument("--run", help="run folder written by `potion train` (this or your own model, --model ..., is required)")
    p.add_argument("--checkpoint", help="evaluate this checkpoint against the run's data (default: the run's model)")
    _add_owner_flags(p)
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--out", help="also write the metrics to this JSON file (default: print them only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("heal", help="unlearn a partly identified poison from a trained run or your own model")
    g = p.add_argument_group("input: the model and the poison you found")
    g.add_argument("--run", help="run folder written by `potion train` (this or your own model, --model ..., is required)")
    d = g.add_mutually_exclusive_group(required=True)
    one_of = "(one of --identified, --discovery-share, --discovery-count is required)"
    d.add_argument("--identified", help=f"CSV/Parquet of the training-set indices you identified as poison {one_of}")
    d.add_argument("--discovery-share", type=float,
                   help=f"benchmark: draw this share of the known poison as the deletion set {one_of}")
    d.add_argument("--discovery-count", type=int,
                   help=f"benchmark: draw this many poisoned samples (1 = one-shot) {one_of}")
    g.add_argument("--seed", type=int, help="seed of the deletion-set draw and of the retain sample (default 0)")
    g.add_argument("--remeasure", action="store_true",
                   help="measure the model's metrics before healing again "
                        "(default: read them from the run's metrics.json)")
    _add_owner_flags(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", help="potion_plus (default: the deletion set grown, then a NegGrad+ step kept "
                   "only within the damage guard's bound, else the guarded dampening on the grown set; --set "
                   "plus.expand=false --set plus.neggrad_steps=0 make it xlf_ptn_guard; plus.rounds=N, "
                   "plus.repair_steps=N, plus.shuffle_retain=true add ingredients), xlf_ptn_guard (importance "
                   "dampening, searched, with a damage guard), xlf_ptn (the paper's method, no guard), "
                   "lf_ptn, ssd_ptn, ssd, ssd_grid, eu, none; baselines "
                   "task_vector (CUTS-style task-vector negation), finetune (SGD on the retain set alone)")
    g.add_argument("--batch-size", type=int, help="images per importance batch (default: chosen from the size "
                   "of the retain set; an explicit value wins)")
    g.add_argument("--retain-sample",
                   help="how much of the retain set the importances read: a share in (0, 1] (default 1.0: all, as "
                        "the paper), a sample count, or auto (experimental: stop once the estimate has settled)")
    g.add_argument("--cache-dir", help="importance cache folder, 'none' to disable "
                   "(default: $POTION_CACHE/importances, else ~/.cache/potion/importances)")
    _add_common(p, g, only=("config", "set", "device"))
    g = p.add_argument_group("search: how far to dampen (PTN)")
    g.add_argument("--rho", type=float, help="stop once the deletion-set accuracy falls to this share of where "
                   "it started (ρ; default 0.2)")
    g.add_argument("--step", type=float, help="how much stronger each search step dampens (c; default 1.1)")
    g.add_argument("--buffer", type=float, help="how far below the deletion set's share of the data the search "
                   "starts (b; default 25)")
    g.add_argument("--max-steps", type=int, help="give up after this many search steps (default 500)")
    g.add_argument("--strategy", choices=["linear", "waves", "bisect", "bracket"],
                   help="order of the search steps: linear (default: every step in turn, as the paper), bracket "
                        "(gallop, then scan up from the last gallop step that did not cross), waves, bisect "
                        "(assumes the accuracy falls with every step); the guarded methods always scan")
    g.add_argument("--val-size", type=int, help="clean test images measured at every step, for the trade-off "
                   "plot (default 0)")
    g = p.add_argument_group("damage guard (potion_plus, xlf_ptn_guard)")
    g.add_argument("--max-damage", type=float, help="largest accuracy loss, in points, the healed model may show "
                   "on clean training images set aside (δ; default 1.0)")
    g.add_argument("--proxy-size", type=int, help="clean training images the guard measures the loss on "
                   "(default 2000)")
    g.add_argument("--allow-damage", action="store_true", help="when no step heals within --max-damage, keep "
                   "the unguarded search's step anyway (default: write no model)")
    g = p.add_argument_group("Ray")
    g.add_argument("--backend", choices=["local", "ray"],
                   help="local, or ray (default when --address or RAY_ADDRESS is given)")
    g.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    g.add_argument("--num-cpus", type=int, help="CPUs of a local Ray cluster (default: all)")
    g.add_argument("--window", type=int, help="search steps run at once on Ray (default 4)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder to create (required)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI, 'none' to disable "
                   "(default: $POTION_TRACKING_URI, else $MLFLOW_TRACKING_URI, else sqlite OUT/mlflow.db)")
    g.add_argument("--experiment", help="MLflow experiment name (default potion-heal)")
    g.add_argument("--register-model", metavar="NAME",
                   help="also register the healed model in the MLflow model registry as NAME (default: not registered)")
    _add_common(p, g, only=("overwrite", "quiet"))
    p.set_defaults(fn=cmd_heal)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded digits data")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--smoke", action="store_true", help="a smaller, faster run (default: the full demo)")
    p.add_argument("--backend", choices=["local", "ray"], default="ray", help="search backend (default ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("data", help="convert a downloaded dataset (MNIST, CIFAR, Hugging Face Parquet) "
                       "into the Parquet layout Potion reads")
    p.add_argument("source", choices=["mnist", "cifar10", "cifar100", "hf"],
                   help="what --from holds: torchvision's MNIST raw idx files, the CIFAR python archive or "
                   "folder, or a Hugging Face Parquet export")
    p.add_argument("--from", dest="src", required=True, metavar="PATH",
                   help="the downloaded file or folder (required; nothing is downloaded)")
    p.add_argument("--out", help="folder to write (default: DATA_ROOT/<name>, e.g. data/mnist)")
    p.add_argument("--data-root", help="where datasets live (default: $POTION_DATA, else data/ here)")
    p.add_argument("--jpeg-quality", type=int, help="store JPEG at this quality, e.g. 75 for the cifar10-jpeg "
                   "suites (default: lossless PNG)")
    p.add_argument("--image-column", help="hf: the image column (default: image, else img)")
    p.add_argument("--label-column", default="label", help="hf: the label column (default label)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (default: refuse)")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("benchmark", help="run a benchmark suite (benchmarks/suites/*.yaml)")
    p.add_argument("--suite", required=True, help="suite name or YAML path (required)")
    p.add_argument("--out", help="results folder (default benchmarks/work/<suite>)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and check the config (default: run)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray cluster (default: all)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, 'none' to disable (default: $POTION_TRACKING_URI, "
                   "else $MLFLOW_TRACKING_URI, else sqlite OUT/mlflow.db)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: show it)")
    p.set_defaults(fn=cmd_benchmark)

    p = sub.add_parser("report", help="markdown summary and plots of a benchmark results table")
    p.add_argument("results", help="results.parquet or its folder (required)")
    p.add_argument("--out", help="folder for summary.md and the plots (default: beside the table)")
    p.set_defaults(fn=cmd_report)
    for p in sub.choices.values():  # after the command, beside its other flags
        p.add_argument("--debug", action="store_true", help="on an error, also print what the library "
                       "behind it said (default: one line)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Stage headings go to stdout, progress to stderr: line by line, a pipe or log file keeps their order.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # MLflow announces routine database set-up at INFO; the user asked for none of it.
    # It reads this variable when it configures its loggers on import.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from potion.interrupts import describe, exit_status, handle_signals

    with handle_signals():  # the status is read inside: it needs the signal that arrived
        try:
            return args.fn(args)
        except PotionError as e:
            if e.detail and args.debug:  # before the message: the last line stays the one that matters
                print(f"potion: detail: {e.detail}", file=sys.stderr)
            hint = "; --debug shows the detail" if e.detail and not args.debug else ""
            print(f"potion: error: {e}{hint}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            # a command whose finished parts survive says which (`kept`); the staged ones wrote nothing
            kept = getattr(e, "kept", "nothing was written, earlier outputs were left as they were")
            print(f"potion: interrupted by {describe(e)}; {kept}", file=sys.stderr)
            return exit_status(e)


if __name__ == "__main__":
    sys.exit(main())
