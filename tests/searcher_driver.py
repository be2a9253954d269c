"""Drives a ``PTNSearcher`` the way Tune does, without Ray, for the searcher tests."""
from __future__ import annotations

import random
from typing import Callable

from potion.distributed.searcher import PTNSearcher


def drive(searcher: PTNSearcher, result_of: Callable[[int], dict], window: int, seed: int,
          die: Callable[[int, random.Random], bool] | None = None) -> PTNSearcher:
    """At most ``window`` trials in flight, a new one asked for whenever one ends, trials
    finishing in a random order. ``result_of(k)`` is what the trial for k reports;
    ``die(k, rng)`` (optional) says that the trial's worker dies instead (Tune reports
    ``error=True``)."""
    rng = random.Random(seed)
    running: dict[str, int] = {}
    n, finished = 0, False
    while True:
        while not finished and len(running) < window:
            got = searcher.suggest(f"t{n}")
            if got == PTNSearcher.FINISHED:
                finished = True
            elif got is None:
                break
            else:
                running[f"t{n}"] = got["k"]
                n += 1
        if not running:
            assert finished, "the searcher stalled: nothing running and not finished"
            return searcher
        tid = rng.choice(sorted(running))
        k = running.pop(tid)
        if die is not None and die(k, rng):
            searcher.on_trial_complete(tid, None, error=True)
        else:
            searcher.on_trial_complete(tid, result_of(k))


def acc_result(accs) -> Callable[[int], dict]:
    """Trial results that carry only a_k (the rest is filler the searcher ignores)."""
    return lambda k: {"k": k, "s": 0.1, "alpha": 1.0, "lam": 1.0, "n_selected": 1, "acc_forget": accs[k]}
