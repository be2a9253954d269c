"""The trigger estimated from the found poison and pasted on clean images inside NegGrad+."""
from __future__ import annotations

import numpy as np
import torch

from potion.unlearning.neggrad import neggrad_steps
from potion.unlearning.transplant import clean_stats, estimate_trigger, paste
from test_plus import batches, scores, toy_case


def _clean_rows(case):
    return np.setdiff1d(np.arange(len(case["x"])), case["poison"])


def test_the_estimate_finds_the_trigger_without_its_definition():
    """The toy's trigger sets features 10 and 11 to 4.0; the mean of the found poison minus the
    clean mean points there, and pasting it on a clean row moves those features to the top of
    the clean range and leaves the others nearly where they were."""
    for seed in range(3):
        case = toy_case(seed=seed, found=20)
        x, y = case["x"], case["y"]
        rows = _clean_rows(case)
        stats = clean_stats(b[0] for b in batches(x[rows], y[rows]))
        d = estimate_trigger(x[case["forget"]], stats)
        assert sorted(d.abs().topk(2).indices.tolist()) == [10, 11], seed
        assert float(d[10:].min()) > 2.0 and float(d[:10].abs().max()) < 1.0, seed
        pasted = paste(x[rows], d, stats)
        assert torch.all(pasted <= stats.high) and torch.all(pasted >= stats.low)
        assert float(pasted[:, 10:].mean()) > float(x[rows][:, 10:].mean()) + 2.0
    assert clean_stats(iter([torch.zeros(0, 12)])) is None


def test_neggrad_with_the_transplant_heals_more_than_without():
    """Same updates, same data: with clean rows carrying the estimated trigger under their true
    labels, the model follows the trigger less (lower ASR) and classifies triggered images
    better (higher robust accuracy), at the same clean accuracy."""
    for seed in (0, 3):
        case = toy_case(seed=seed, found=30)
        x, y, m = case["x"], case["y"], case["model"]
        rows, forget = _clean_rows(case), case["forget"]
        stats = clean_stats(b[0] for b in batches(x[rows], y[rows]))
        d = estimate_trigger(x[forget], stats)
        xt, yt, xtrig = case["test"]
        result = {}
        for name, fn in (("off", None), ("on", lambda z: paste(z, d, stats))):
            m.load_state_dict(case["theta0"])
            for _ in neggrad_steps(m, batches(x[rows], y[rows]), x[forget], y[forget], steps=60, lr=0.01,
                                   ascent=0.05, cap=5.0, forget_batch=16, check_every=60, paste=fn, paste_rows=24):
                pass
            state = {k: v.clone() for k, v in m.state_dict().items()}
            clean, asr = scores(m, state, case["test"])
            with torch.no_grad():
                ra = float((m(xtrig).argmax(1) == yt).float().mean())
            result[name] = (clean, asr, ra)
        (c_off, asr_off, ra_off), (c_on, asr_on, ra_on) = result["off"], result["on"]
        assert asr_on < asr_off - 0.1 and ra_on > ra_off + 0.05, (seed, result)
        assert c_on >= c_off - 0.02, (seed, result)
