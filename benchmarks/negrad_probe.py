"""Probe for issue 20's next step (not a Potion method): with the deletion set Sf given, a
short fine-tune that descends the loss on Dr and ascends it on Sf (NegGrad+), no guard.

It asks whether, once the expansion has found the poison, a different unlearning step heals
more than dampening within 1 point. Sf here is the run's poison manifest, all of it
(``--share 1``, what potion_plus's expansion found on mnist-cpu, at precision 1.00) or a
seeded share of it; the unfound poison stays in Dr, as in a real heal.

    POTION_DATA=/path/to/data python benchmarks/negrad_probe.py RUN_DIR --share 1.0
    # prints before/after clean_acc, ra, asr, poison healed % and damage (points)

Results and commands: benchmarks/results/heal_more.md, "The next step, probed".
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from potion.heal.inputs import RunSource, measure
from potion.metrics import model_damage, poison_healed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a Potion run folder (it holds the poison manifest)")
    ap.add_argument("--share", type=float, default=1.0, help="share of the poison given as Sf (default 1.0)")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01, momentum 0.9)")
    ap.add_argument("--steps", type=int, default=100, help="updates of 128 Dr and 64 Sf images (default 100)")
    ap.add_argument("--ascent", type=float, default=0.5, help="weight of Sf's loss, ascended (default 0.5)")
    ap.add_argument("--bn", choices=["separate", "joint", "sf-nostats"], default="separate",
                    help="batch norm: Dr and Sf forwarded apart (default), in one batch, or Sf without "
                         "updating the running statistics")
    args = ap.parse_args(argv)
    inp, poison, sf, dr, before, (xf, yf) = load_case(args.run, args.share)
    rng = np.random.default_rng(0)
    # in train mode, as fine-tuning runs: with BN's statistics frozen at θ0's the ascent on Sf
    # wrecked the MNIST model (clean accuracy 0.17)
    model = copy.deepcopy(inp.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    t = time.time()
    for _ in range(args.steps):
        x, y = next(iter(inp.train.subset(np.sort(rng.choice(dr, 128, replace=False))).batches(128)))
        f = rng.choice(len(sf), min(64, len(sf)), replace=False)
        # the ascent is capped so that a sample already forgotten stops pulling
        if args.bn == "joint":
            out = model(torch.cat([x, xf[f]]))
            out_r, out_f = out[:len(y)], out[len(y):]
        else:
            out_r = model(x)
            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            saved = [m.momentum for m in bns]
            if args.bn == "sf-nostats":
                for m in bns:
                    m.momentum = 0.0
            out_f = model(xf[f])
            for m, mom in zip(bns, saved):
                m.momentum = mom
        loss = F.cross_entropy(out_r, y) - args.ascent * F.cross_entropy(out_f, yf[f]).clamp(max=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print_outcome(inp, model, before, f"Sf {len(sf)} of {len(poison)} poisoned", time.time() - t)


def load_case(run: str, share: float):
    """The run, its poison, Sf (a seeded share of it), Dr (the rest), θ0's metrics and Sf's rows."""
    torch.manual_seed(0)
    inp = RunSource(run).load()
    poison = np.flatnonzero(inp.poisoned_mask)
    sf = np.sort(np.random.default_rng(1).choice(poison, max(1, round(share * len(poison))), replace=False))
    dr = np.setdiff1d(np.arange(inp.n_train), sf)
    before = measure(inp.model, inp, 512, "cpu")
    return inp, poison, sf, dr, before, next(iter(inp.train.subset(sf).batches(len(sf))))


def print_outcome(inp, model, before: dict, head: str, took: float) -> None:
    """Before/after clean_acc, ra, asr and healed %, then the damage and the time."""
    after = measure(model, inp, 512, "cpu")
    for name, m in (("before", before), ("after", after)):
        print(f"{name}: clean_acc {m['clean_acc']:.4f} ra {m['ra']:.4f} asr {m['asr']:.4f} "
              f"healed {poison_healed(m['ra'], m['clean_acc']):.1f} %")
    print(f"{head}; damage {model_damage(after['clean_acc'], before['clean_acc']):+.2f} points; {took:.0f} s")


if __name__ == "__main__":
    main()
