"""Probe of potion_plus's NegGrad+ step with and without the trigger transplant
(potion.unlearning.transplant), on a run folder, with Sf given from the poison manifest and
no guard: healed % and test damage after a fixed number of updates.

It asks how much the transplant heals beyond NegGrad+ alone and what the clean batch size
and the number of updates cost, without the expansion, the held-out checks or the proxy.
Sf is a seeded share of the poison (``--share 0.76``: about what potion_plus updates on once
its expansion found nearly all of it and a fifth is held out); the unfound poison stays in Dr.

    POTION_DATA=/path/to/data python benchmarks/transplant_probe.py RUN_DIR --paste 48
    POTION_DATA=/path/to/data python benchmarks/transplant_probe.py RUN_DIR --paste 0   # NegGrad+ alone

Results and commands: benchmarks/results/heal_more.md ("The trigger transplant").
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from negrad_probe import load_case, print_outcome
from potion.unlearning.neggrad import neggrad_steps
from potion.unlearning.plus_config import PlusConfig
from potion.unlearning.transplant import clean_stats, estimate_trigger, paste


def main(argv=None) -> None:
    d = PlusConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a Potion run folder (it holds the poison manifest)")
    ap.add_argument("--share", type=float, default=0.76, help="share of the poison given as Sf (default 0.76)")
    ap.add_argument("--paste", type=int, default=d.neggrad_transplant,
                    help=f"rows per update with the estimated trigger pasted on; 0 = off (default {d.neggrad_transplant})")
    ap.add_argument("--batch", type=int, default=d.repair_batch_size,
                    help=f"clean rows per update (default {d.repair_batch_size})")
    ap.add_argument("--steps", type=int, default=d.neggrad_steps, help=f"updates (default {d.neggrad_steps})")
    ap.add_argument("--lr", type=float, default=d.neggrad_lr, help=f"learning rate (default {d.neggrad_lr})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clean batches' draw (default 0)")
    args = ap.parse_args(argv)
    inp, poison, sf, dr, before, (xf, yf) = load_case(args.run, args.share)
    rng = np.random.default_rng(args.seed)
    ref = np.sort(rng.choice(dr, 2000, replace=False))
    stats = clean_stats(x for x, _ in inp.train.subset(ref).batches(500))
    trigger = estimate_trigger(xf, stats)

    def fresh():  # one random batch of Dr per update, in random order as potion_plus's shuffled passes
        while True:
            # subset() reads rows in index order, and CIFAR-10-jpeg is stored sorted by class: the
            # rows pasted next (the first of the batch) would all be of the lowest classes
            x, y = next(iter(inp.train.subset(np.sort(rng.choice(dr, args.batch, replace=False))).batches(args.batch)))
            order = torch.from_numpy(rng.permutation(len(y)))
            yield x[order], y[order]

    model = copy.deepcopy(inp.model)
    t = time.time()
    for _ in neggrad_steps(model, fresh(), xf, yf, steps=args.steps, lr=args.lr, ascent=d.neggrad_ascent,
                           cap=d.neggrad_cap, forget_batch=d.neggrad_forget_batch, check_every=args.steps,
                           paste=(lambda x: paste(x, trigger, stats)) if args.paste else None,
                           paste_rows=args.paste):
        pass
    print_outcome(inp, model, before, f"Sf {len(sf)} of {len(poison)} poisoned; paste {args.paste}, batch "
                  f"{args.batch}, {args.steps} updates", time.time() - t)

if __name__ == "__main__":
    main()
