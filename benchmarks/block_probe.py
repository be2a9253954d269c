"""Probe for potion_plus's block rule (benchmark only: it reads the poison manifest).

For a run folder, scores every block of θ0 the way ``potion.unlearning.block_scan`` does (the
centred cosine of each target-labelled training image to the found samples' mean direction)
and prints, per draw of found samples: the AUC of that score against the manifest at every
block, and what ``scan_blocks`` keeps (block, gap, flagged, true poison among them). Draws of
clean target images as Sf are the controls: the rule should keep nothing there.

    POTION_DATA=/path/to/data python benchmarks/block_probe.py RUN_DIR [--draws 3] [--controls 8]

Results: benchmarks/results/heal_more.md ("the block rule").
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from potion.heal.inputs import RunSource
from potion.unlearning.block_scan import BlockRule, block_features, scan_blocks


def _auc(score: np.ndarray, truth: np.ndarray) -> float:
    """P(a poisoned image scores above a clean one), ties half."""
    pos, neg = score[truth], score[~truth]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a Potion run folder (it holds the poison manifest)")
    ap.add_argument("--draws", type=int, default=3, help="one-sample draws of real poison (default 3)")
    ap.add_argument("--controls", type=int, default=8, help="one-sample draws of clean target images (default 8)")
    ap.add_argument("--precision", type=float, default=0.95)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    inp = RunSource(args.run).load()
    model = inp.model.eval()
    poison = inp.poisoned_mask.astype(bool)
    labels = np.concatenate([y.numpy() for _, y in inp.train.batches(1024)])
    target = int(np.bincount(labels[poison]).argmax())
    rng = np.random.default_rng(0)
    # the null as potion_plus takes it: proxy-sized slice, images under the other labels
    proxy = np.sort(rng.choice(len(labels), min(2000, len(labels)), replace=False))
    feats = lambda ix: block_features(model, (x for x, _ in inp.train.subset(np.sort(ix)).batches(256)))
    null = feats(proxy[labels[proxy] != target])
    cand_all = np.flatnonzero(labels == target)
    pois, clean = cand_all[poison[cand_all]], cand_all[~poison[cand_all]]
    print(f"target {target}: {len(cand_all)} target-labelled, {len(pois)} poisoned")
    draws = [("one", rng.choice(pois, 1)) for _ in range(args.draws)]
    draws += [("10%", rng.choice(pois, max(2, len(pois) // 10), replace=False))]
    draws += [("clean", rng.choice(clean, 1)) for _ in range(args.controls)]
    for label, found in draws:
        cand = np.setdiff1d(cand_all, found)
        if label == "clean":
            cand = np.setdiff1d(cand, pois)
        cf, af = feats(cand), feats(found)
        truth = poison[cand]
        rule, records = scan_blocks(cf, af, null, args.precision)
        if label != "clean":
            aucs = []
            for name, f in cf.items():
                s = BlockRule.towards(name, f, af[name]).scores(f).numpy()
                aucs.append(f"{name} {_auc(s, truth):.3f}")
            print(f"{label}: AUC " + ", ".join(aucs))
        if rule is None:
            widest = max(records, key=lambda r: r.get("gap", 0.0), default={})
            print(f"{label}: kept nothing (widest gap {widest.get('gap', 0.0)} at {widest.get('layer')}, "
                  f"{widest.get('flagged', 0)} flagged)")
        else:
            m = rule.flag(cf).numpy()
            print(f"{label}: {rule.layer} gap {rule.gap:.2f}: flagged {m.sum()}, poisoned {(m & truth).sum()} "
                  f"of {truth.sum()}")


if __name__ == "__main__":
    main()
