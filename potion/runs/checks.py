"""Checks of a job's numbers that must fail in a second, before any data or compute.

The typed configs already reject unknown keys and wrong types; what they cannot see is a
value of the right type that makes no sense (a negative seed, a validation set of -5
images). Each check names the flag or config key and the range it accepts.
"""
from __future__ import annotations

import math
import re

from potion.errors import PotionError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds both accept 0 .. 2**32 - 1 everywhere
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _int_in(value, name: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise PotionError(f"{name} must be an integer {rng}, got {value!r}")


def _finite_in(value, name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise PotionError(f"{name} must be a finite number {rng}, got {value!r}")


def check_seed(value, name: str) -> None:
    _int_in(value, name, 0, SEED_MAX)


def check_device(value: str) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise PotionError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")


def check_train_job(job) -> None:
    check_seed(job.poison.seed, "poison.seed (--seed)")
    check_seed(job.recipe.seed, "recipe.seed (--seed)")
    _finite_in(job.recipe.lr, "recipe.lr (--lr)", 0.0, lo_open=True)
    _int_in(job.eval_batch_size, "eval_batch_size", 1)
    _int_in(job.poison.target, "poison.target (--target)", 0)
    check_device(job.device)


def check_heal_job(job, share=None, count=None) -> None:
    check_seed(job.seed, "seed (--seed)")
    _int_in(job.val_size, "val_size (--val-size)", 0)
    if job.importance_batch_size is not None:  # None: chosen from the retain set's size
        _int_in(job.importance_batch_size, "importance_batch_size (--batch-size)", 1)
    _int_in(job.importance_shards, "importance_shards", 0)
    _finite_in(job.gpus_per_trial, "gpus_per_trial", 0.0)
    _finite_in(job.ssd_alpha, "ssd_alpha", 0.0, lo_open=True)
    _finite_in(job.ssd_lambda, "ssd_lambda", 0.0, lo_open=True)
    if job.num_cpus is not None:
        _int_in(job.num_cpus, "num_cpus (--num-cpus)", 1)
    if ("_ptn" in job.method or job.method == "potion_plus") and job.ptn.max_steps < 1:  # the PTN searchers
        raise PotionError(f"ptn.max_steps (--max-steps) must be at least 1 for {job.method}: step 0 dampens "
                          f"only the first share s_0, got {job.ptn.max_steps}")
    if share is not None:
        _finite_in(share, "--discovery-share", 0.0, 1.0, lo_open=True)
    if count is not None:
        _int_in(count, "--discovery-count", 1)
    check_device(job.device)
