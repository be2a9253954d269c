"""How well the damage guard's proxy split finds the undiscovered poison (scored with the manifest).

    POTION_DATA=/path/to/data python benchmarks/proxy_split_probe.py RUN [RUN ...] --shares one,0.1,0.5,1.0

For every run folder and discovery share it draws the deletion set and the clean proxy as
`potion heal` does (seed 0, 2,000 retain images), applies
``potion.unlearning.proxy_split.poison_like`` to the target-labelled proxy images, and
prints one row: how many of them are poison (from the run's manifest, which the method
never reads), how many the split leaves out, and the errors both ways.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from potion.heal.sets import draw_proxy, select_deletion_set
from potion.heal.inputs import RunSource
from potion.heal.report import format_table
from potion.unlearning.proxy_split import penultimate_features, poison_like


def probe(run: str, share: str, proxy_size: int = 2000, seed: int = 0) -> dict:
    inp = RunSource(run).load()
    frac = None if share == "one" else float(share)
    deletion, _ = select_deletion_set(inp, frac, 1 if frac is None else None, None, seed)
    retain = np.setdiff1d(np.arange(inp.n_train), deletion)
    proxy = draw_proxy(retain, proxy_size, seed)
    model = inp.model.eval()
    forget_y = torch.cat([y for _, y in inp.train.subset(deletion).batches(512)])
    targets = torch.unique(forget_y)
    xs, ys = zip(*inp.train.subset(proxy).batches(512))
    y = torch.cat(ys)
    is_t = torch.isin(y, targets).numpy()
    x_t = torch.cat(xs)[torch.from_numpy(is_t)]
    like = poison_like(penultimate_features(model, x_t.split(512)),
                       penultimate_features(model, (x for x, _ in inp.train.subset(deletion).batches(512)))).numpy()
    truth = np.asarray(inp.manifest.poisoned_mask)[proxy[is_t]]
    return {"run": run.rstrip("/").split("/")[-1][:12], "share": share, "|Sf|": len(deletion),
            "target-labelled": int(is_t.sum()), "poison among them": int(truth.sum()),
            "left out": int(like.sum()), "left out, poison": int((like & truth).sum()),
            "poison kept (reads as damage)": int((truth & ~like).sum()),
            "clean left out (damage unseen)": int((like & ~truth).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--shares", default="one,0.1,0.5,1.0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [probe(run, s) for run in args.runs for s in args.shares.split(",")]
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
