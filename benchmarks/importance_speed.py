"""Throughput of the importance pass against a plain forward+backward pass.

The importance pass over Dr dominates the cost of the method (SPEC §5). It should cost
little more than the forward+backward it is built on: this script times both on the same
random batches and the same model, and reports the ratio (floor 0.8).

    python benchmarks/importance_speed.py            # resnet9 width 0.25, CPU, < 1 min
    python benchmarks/importance_speed.py --smoke    # a few tiny batches
    python benchmarks/importance_speed.py --device cuda --width 1 --batch-size 512 --batches 20
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from potion.unlearning.importances import importance_sums

FLOOR = 0.8


def build_model(width: float, num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    try:
        from potion.models import create_model

        model = create_model("resnet9", num_classes=num_classes, in_channels=3, image_size=image_size, width=width)
        return model, f"resnet9(width={width})"
    except ImportError:
        c = max(8, int(64 * width))
        model = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes),
        )
        return model, f"local conv net (c={c})"


def plain_pass(model: nn.Module, batches, device: torch.device) -> None:
    """The reference: forward, mean CE, backward into .grad — what a training step costs minus the update."""
    model.eval()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--estimators", default="xlf,fisher")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: checks the script, not the speed")
    args = ap.parse_args(argv)
    if args.smoke:
        args.width, args.batch_size, args.batches, args.repeats, args.image_size = 0.125, 8, 2, 2, 16

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, desc = build_model(args.width, 10, args.image_size)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
         torch.randint(0, 10, (args.batch_size,), generator=g).to(device))
        for _ in range(args.batches)
    ]
    n_images = args.batch_size * args.batches
    print(f"model: {desc}, {sum(q.numel() for q in model.parameters()):,} parameters; device {device}, "
          f"{torch.get_num_threads()} threads; {args.batches} batches of {args.batch_size} "
          f"({args.image_size}px), best of {args.repeats}")

    estimators = args.estimators.split(",")
    plain_pass(model, batches[:1], device)  # warm-up (allocator, kernels)
    for est in estimators:
        importance_sums(model, batches[:1], est, device=device)
    # Rounds interleave the passes so that load from other processes hits them alike;
    # the best round of each is reported.
    best = {name: float("inf") for name in ["plain", *estimators]}
    for _ in range(args.repeats):
        best["plain"] = min(best["plain"], timed(lambda: plain_pass(model, batches, device), device))
        for est in estimators:
            t = timed(lambda: importance_sums(model, batches, est, device=device), device)
            best[est] = min(best[est], t)
    print(f"plain forward+backward : {n_images / best['plain']:10.1f} images/s")
    worst = float("inf")
    for est in estimators:
        ratio = best["plain"] / best[est]
        worst = min(worst, ratio)
        print(f"importances ({est:7s})  : {n_images / best[est]:10.1f} images/s   ratio {ratio:.3f}")
    ok = worst >= FLOOR
    verdict = "not judged (--smoke: batches too small to time)" if args.smoke else ("OK" if ok else "BELOW FLOOR")
    print(f"worst ratio {worst:.3f} (floor {FLOOR}): {verdict}")
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
