"""The tiny backdoored MLP that the PTN, method and guard tests heal: features 10–11 set to 4
is the trigger, class 0 the target. Each test module picks its own seed and size."""
from __future__ import annotations

import torch
from torch import nn


def backdoored_mlp(seed: int, n: int = 400, n_poison: int = 30, iterations: int = 120):
    """(model in train mode, x, y, poisoned indices, the generator for further draws)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = x[:, :3].argmax(1)
    cand = torch.nonzero(y != 0).flatten()
    poison = cand[torch.randperm(len(cand), generator=g)[:n_poison]]
    x[poison, 10:] = 4.0
    y[poison] = 0
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(iterations):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x, y, poison, g
