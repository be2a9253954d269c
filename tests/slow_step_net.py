"""A model for the Ray search tests whose steps finish in the order a test sets.

PTN dampens more of ``w`` at each step k; a_k is the share of the inputs ``x`` below
``1 − dampened/scale``. The trial that dampened ``slow_at`` elements waits until the trial
that dampened ``signal_at`` has touched the file ``marker`` (at most ``timeout`` seconds),
then ``delay`` seconds more, so the later step reports first however slowly workers start.
"""
import time
from pathlib import Path

import torch
from torch import nn


class SlowAtStep(nn.Module):
    def __init__(self, n: int = 2000, scale: float = 100.0, slow_at: int = -1, signal_at: int = -1,
                 marker: str = "", delay: float = 1.0, timeout: float = 120.0):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.scale, self.slow_at, self.signal_at = scale, slow_at, signal_at
        self.marker, self.delay, self.timeout = marker, delay, timeout

    def forward(self, x):
        dampened = int((self.w.abs() < 0.5).sum())
        if self.marker and dampened == self.signal_at:
            Path(self.marker).touch()
        if self.marker and dampened == self.slow_at:
            deadline = time.monotonic() + self.timeout
            while not Path(self.marker).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(self.delay)
        logit = (1 - dampened / self.scale) - x[:, 0]
        return torch.stack([logit, torch.zeros_like(logit)], 1)
