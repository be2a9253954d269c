"""What the Ray Tune PTN search costs against the local linear scan, on the same inputs.

A tiny poisoned ResNet-9 on digits: one evaluation of a step k takes milliseconds, so
this measures Ray Tune's per-trial overhead and how many Sf evaluations each strategy
needs (the sliding window runs up to ``window - 1`` steps past k*, bisect needs about
log2(k*) rounds). On a real model one evaluation is a pass over Sf and the overhead is
amortised; there the window's parallelism pays off.

    python benchmarks/search_overhead.py            # ~2 min on 2 CPUs
    python benchmarks/search_overhead.py --smoke    # fewer training steps, window 2
    python benchmarks/search_overhead.py --num-cpus 4 --window 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


def tiny_problem(iterations: int, step: float, max_steps: int, seed: int = 0):
    """A poisoned digits model, its XLF importances and Sf: the inputs of a PTN search."""
    from potion.datasets import draw_deletion_set, load_dataset, make_manifest, make_trigger, train_view
    from potion.models import create_model
    from potion.training import TrainRecipe, train_model
    from potion.unlearning.importances import compute_importances
    from potion.unlearning.evaluator import StepEvaluator
    from potion.unlearning.ptn import PTNConfig

    torch.manual_seed(seed)
    splits = load_dataset("digits")
    trigger = make_trigger("badnet")
    manifest = make_manifest(splits.train.labels, 100, 0, trigger, seed)
    view = train_view(splits, manifest, trigger)
    kwargs = dict(num_classes=10, in_channels=1, image_size=view.image_shape[1], width=0.125)
    model = create_model("resnet9", **kwargs)
    recipe = TrainRecipe(iterations=iterations, batch_size=64, lr=0.05, amp=False, seed=seed)
    model = train_model(model, view, recipe, progress=False)
    deletion = draw_deletion_set(manifest, share=0.5, seed=seed)
    retain = np.setdiff1d(np.arange(len(view)), deletion)
    forget = list(view.subset(deletion).batches(32))
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    imp_f = compute_importances(model, forget, "xlf")
    imp_r = compute_importances(model, view.subset(retain).batches(256), "xlf")
    cfg = PTNConfig(step=step, max_steps=max_steps)

    def evaluator():
        return StepEvaluator(create_model("resnet9", **kwargs), state0, imp_f, imp_r, forget, len(deletion),
                             len(view), cfg)

    return evaluator, cfg, kwargs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a quick run (fewer training steps, window 2)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--window", type=int, default=None, help="trials in flight (default: --num-cpus)")
    ap.add_argument("--step", type=float, default=1.5, help="PTN step c (larger: smaller k*)")
    ap.add_argument("--iterations", type=int, default=None, help="training steps of the tiny model")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    iterations = args.iterations or (100 if args.smoke else 200)
    window = args.window or (2 if args.smoke else args.num_cpus)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from potion.distributed import runtime as ray_runtime
    from potion.distributed.search import make_ray_search
    from potion.unlearning.ptn import ptn_search

    t0 = time.perf_counter()
    make_evaluator, cfg, kwargs = tiny_problem(iterations, args.step, max_steps=80)
    print(f"problem built in {time.perf_counter() - t0:.1f}s (resnet9 width 1/8, {iterations} training steps)")

    rows = []
    t0 = time.perf_counter()
    local = ptn_search(make_evaluator(), cfg)
    rows.append(("local linear", local, time.perf_counter() - t0))

    t0 = time.perf_counter()
    ray_runtime.connect(None, num_cpus=args.num_cpus)
    t_init = time.perf_counter() - t0
    storage = tempfile.mkdtemp(prefix="potion-bench-")  # Tune's experiment files; removed below
    try:
        for strategy in ("waves", "bisect"):
            search = make_ray_search(model_name="resnet9", model_kwargs=kwargs, window=window, strategy=strategy,
                                     storage_path=storage)
            t0 = time.perf_counter()
            got = search(make_evaluator(), cfg)
            rows.append((f"ray {strategy} (W={window})", got, time.perf_counter() - t0))
    finally:
        ray_runtime.shutdown_if_owned()
        shutil.rmtree(storage, ignore_errors=True)

    print(f"ray.init: {t_init:.1f}s (not included below)")
    print(f"{'search':<22}{'k*':>5}{'Sf evals':>10}{'wall s':>9}{'s/eval':>9}  same k*/weights as local")
    out = []
    for name, res, wall in rows:
        same = res.k_star == local.k_star and all(torch.equal(res.state_dict[n], local.state_dict[n])
                                                  for n in local.state_dict)
        print(f"{name:<22}{res.k_star:>5}{res.evaluations:>10}{wall:>9.2f}{wall / res.evaluations:>9.3f}  {same}")
        out.append({"search": name, "k_star": res.k_star, "evaluations": res.evaluations, "wall_s": round(wall, 3),
                    "same_as_local": same})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ray_init_s": round(t_init, 3), "window": window, "results": out}, f, indent=2)
    # waves must agree with linear exactly; bisect only promises it for non-increasing a_k
    return 0 if out[1]["same_as_local"] else 1


if __name__ == "__main__":
    sys.exit(main())
