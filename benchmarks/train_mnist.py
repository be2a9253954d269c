"""Train a poisoned MNIST model (1 % badnet) from $POTION_DATA/mnist (default data/mnist) and print its metrics.

    POTION_DATA=/path/to/data python benchmarks/train_mnist.py --out runs/mnist-badnet1   # about 2 epochs on CPU
    python benchmarks/train_mnist.py --smoke                     # a 3 000-image subset

The run folder it writes is what ``benchmarks/heal_mnist.py --run`` heals.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _common import mnist_train_job  # noqa: E402

from potion.jobs.train import run_train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/mnist-badnet1")
    ap.add_argument("--iterations", type=int, default=470, help="470 × 256 ≈ 2 epochs of MNIST")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    iterations = 60 if args.smoke else args.iterations
    job = mnist_train_job(iterations, smoke=args.smoke)
    t0 = time.perf_counter()
    m = run_train(job, args.out, overwrite=args.overwrite, progress=True)
    print(json.dumps({"clean_acc": m["clean_acc"], "ra": m["ra"], "asr": m["asr"], "n_poison": m["n_poison"],
                      "train_seconds": m["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                      "iterations": iterations, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"},
                     indent=2))


if __name__ == "__main__":
    main()
