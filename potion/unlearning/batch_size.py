"""The importance batch size B when the user gives none (SPEC §5: I depends on B).

I is the mean over K = ⌈|Dr| / B⌉ batches of a function of the batch-mean gradient, so B
sets how many independent looks at Dr the estimate averages. The rule aims at a number of
batches K instead of a fixed B; the numbers it rests on are in
benchmarks/results/guard.md ("The importance batch size") and the suites' summaries.
"""
from __future__ import annotations

import math

import numpy as np

from potion.errors import PotionError

TARGET_BATCHES = 128
MIN_BATCH = 16
MAX_BATCH = 512


def auto_batch_size(n_retain: int, target_batches: int = TARGET_BATCHES) -> int:
    """The largest power of two B in [MIN_BATCH, MAX_BATCH] with |Dr| / B ≥ target_batches
    (rounding towards more batches: fewer batches were the damaging side in every measurement)."""
    if n_retain < 1:
        raise PotionError(f"the retain set is empty (|Dr| = {n_retain}): nothing to compute importances on")
    b = MIN_BATCH
    while b < MAX_BATCH and n_retain / (2 * b) >= target_batches:
        b *= 2
    return b


def resolve_batch_size(explicit: int | None, n_retain: int) -> tuple[int, bool]:
    """(B, chosen automatically?): an explicit B always wins."""
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise PotionError(f"the importance batch size must be an integer >= 1, got {explicit!r}")
        return explicit, False
    return auto_batch_size(n_retain), True


def label_runs(labels: np.ndarray) -> int:
    """How many maximal runs of one label the sequence holds (1 + the number of changes)."""
    labels = np.asarray(labels).reshape(-1)
    return int(labels.size > 0) + int(np.count_nonzero(labels[1:] != labels[:-1]))


def sorted_batches_note(runs: int, n: int, batch_size: int) -> str | None:
    """A note when Dr, read in its stored order, is in ``runs`` runs of one label (see
    :func:`label_runs`) longer than a batch.

    G(b) is a function of the batch-mean gradient (SPEC §5), so class-homogeneous batches
    give another I_r than mixed ones: on the class-sorted CIFAR-10-jpeg export the same full
    pass in a random order moved k* from 50 to 25–28 (benchmarks/results/heal_speed.md).
    """
    batches = math.ceil(n / batch_size) if n else 0
    if n == 0 or runs > batches // 2:
        return None
    return (f"the retain set is stored in {runs} runs of one label over {n} samples, so most of its {batches} "
            f"importance batches of {batch_size} hold a single class; I_r depends on the batches' mix. "
            f"--retain-sample {n} reads all of it in a seeded random order instead")
