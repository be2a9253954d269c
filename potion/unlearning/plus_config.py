"""The switches of ``potion_plus`` (potion.unlearning.plus), one per ingredient, for ablation.

All of them off (``expand=False, rounds=1, repair_steps=0, shuffle_retain=False``) is
``xlf_ptn_guard`` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from potion.errors import PotionError


@dataclass
class PlusConfig:
    # grow Sf with the target-labelled retain images θ0 places with the found poison
    expand: bool = True
    # the posterior odds a grown-in image needs (potion.unlearning.expansion)
    expand_precision: float = 0.999
    # dampening rounds: each one recomputes I_f on Sf at the last round's θ and searches again
    # within what is left of δ; the guard ends them
    rounds: int = 2
    # SGD steps of the repair on clean retain images after dampening; 0 = no repair
    repair_steps: int = 30
    repair_lr: float = 0.01
    repair_batch_size: int = 64
    repair_size: int = 2000  # retain images drawn for the repair (never the proxy)
    repair_check: int = 5  # steps between two measurements of Sf during the repair
    # how far Sf's accuracy may rise during the repair before it stops (absolute)
    repair_tolerance: float = 0.02
    # Dr in a seeded random order for the retain pass (a stored order sorted by class
    # makes single-class importance batches)
    shuffle_retain: bool = True

    def __post_init__(self) -> None:
        for name in ("rounds", "repair_steps", "repair_batch_size", "repair_size", "repair_check"):
            v = getattr(self, name)
            lo = 1 if name in ("rounds", "repair_batch_size", "repair_size", "repair_check") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise PotionError(f"plus.{name} must be an integer >= {lo}, got {v!r}")
        if not (0.5 <= self.expand_precision < 1):
            raise PotionError(f"plus.expand_precision must lie in [0.5, 1), got {self.expand_precision}")
        if not (math.isfinite(self.repair_lr) and self.repair_lr > 0):
            raise PotionError(f"plus.repair_lr must be a number > 0, got {self.repair_lr}")
        if not (0 <= self.repair_tolerance <= 1):
            raise PotionError(f"plus.repair_tolerance must lie in [0, 1], got {self.repair_tolerance}")

    def all_off(self) -> bool:
        return not self.expand and self.rounds == 1 and self.repair_steps == 0 and not self.shuffle_retain
