"""The block rule of potion_plus's expansion: which block, what it flags, and when nothing."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from potion.unlearning.block_scan import block_features, blocks, scan_blocks
from potion.unlearning.plus import grow_mask
from toy_backdoor import backdoored_mlp


def _case(seed):
    model, x, y, poison, _ = backdoored_mlp(seed=seed, n=600, n_poison=40, iterations=150)
    model.eval()
    forget = poison[:10].numpy()
    retain = np.setdiff1d(np.arange(len(x)), forget)
    cand = retain[(y[retain] == 0).numpy()]
    null = retain[(y[retain] != 0).numpy()][:200]
    return model, x, y, forget, cand, null, np.isin(cand, poison.numpy())


def test_the_block_rule_finds_the_planted_poison_and_nothing_from_clean_images():
    flagged = hits = 0
    for seed in range(4):
        model, x, _, forget, cand, null, truth = _case(seed)
        feats = lambda ix: block_features(model, [x[ix]])
        rule, records = scan_blocks(feats(cand), feats(forget), feats(null), 0.95)
        assert rule is not None, (seed, records)
        mask = rule.flag(feats(cand)).numpy()
        assert (mask & truth).sum() >= 0.6 * truth.sum(), seed  # it finds most of the 30 unfound
        assert (mask & truth).sum() / mask.sum() >= 0.85, seed
        flagged, hits = flagged + mask.sum(), hits + (mask & truth).sum()
        # ten clean target images as Sf: their neighbours are no group apart from the class
        clean = cand[~truth][:10]
        rest = np.setdiff1d(cand, clean)
        none, records = scan_blocks(feats(rest), feats(clean), feats(null), 0.95)
        assert none is None, (seed, records)
    assert hits / flagged >= 0.9  # precision over the four models


def test_blocks_open_a_sequence_skip_the_classifier_and_pool_space_and_tokens():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.blocks = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 6)])
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = self.stem(x)  # (B, 4, H, W)
            t = h.flatten(2).transpose(1, 2)  # tokens (B, H·W, 4)
            for b in self.blocks:
                t = b(t)
            return self.head(t.mean(1))

    net = Net().eval()
    assert [n for n, _ in blocks(net)] == ["stem", "blocks.0", "blocks.1"]
    # a user's wrapper around the model is looked through
    wrapped = nn.Module()
    wrapped.inner = net
    assert [n for n, _ in blocks(wrapped)] == ["inner.stem", "inner.blocks.0", "inner.blocks.1"]
    x = torch.randn(7, 3, 5, 5)
    feats = block_features(net, [x[:4], x[4:]])
    assert {n: tuple(f.shape) for n, f in feats.items()} == {"stem": (7, 4), "blocks.0": (7, 5), "blocks.1": (7, 6)}
    assert torch.allclose(feats["stem"], net.stem(x).mean(dim=(2, 3)), atol=1e-6)


def test_grow_mask_with_other_label_images_adds_the_block_rules_finds():
    model, x, y, forget, cand, null, truth = _case(1)
    batches = lambda ix: [(x[ix[i:i + 64]], y[ix[i:i + 64]]) for i in range(0, len(ix), 64)]
    rules, base = grow_mask(model, batches(forget), batches(cand), 0.999)
    assert rules.block is None
    rules, grown = grow_mask(model, batches(forget), batches(cand), 0.999, null_batches=batches(null))
    assert rules.block is not None
    assert bool((grown | base).eq(grown).all())  # a superset of the feature rule's finds
    assert (grown.numpy() & truth).sum() >= 0.8 * truth.sum()
    # the rules flag new images the same way (the repair set is filtered by them)
    assert torch.equal(rules.flag(model, batches(cand)), grown)


def test_block_probe_scores_every_block_of_a_run(small_digits_run):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "block_probe.py"
    proc = subprocess.run([sys.executable, str(script), str(small_digits_run), "--draws", "1", "--controls", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("target 0:")
    aucs = [ln for ln in lines if ln.startswith("one: AUC ")]
    assert aucs and "prep.0" in aucs[0]
    # a backdoored ResNet-9: some block ranks the poison far above the clean target images
    best = max(float(part.split()[-1]) for part in aucs[0][len("one: AUC "):].split(", "))
    assert best > 0.9, aucs[0]
    assert any(ln.startswith("clean: ") for ln in lines)
