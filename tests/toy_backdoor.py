"""Small backdoored models the tests heal: an MLP (features 10–11 set to 4 is the trigger,
class 0 the target; each test module picks its own seed and size) and a ResNet-9 on digits."""
from __future__ import annotations

import numpy as np
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


def digits_resnet(iterations: int):
    """A ResNet-9 (width 1/8) trained on digits with 100 BadNet samples, half of them the
    deletion set: (model, its create_model kwargs, the train view, deletion, retain)."""
    from potion.datasets import draw_deletion_set, load_dataset, make_manifest, make_trigger, train_view
    from potion.models import create_model
    from potion.training import TrainRecipe, train_model

    torch.manual_seed(0)
    splits = load_dataset("digits")
    trig = make_trigger("badnet")
    manifest = make_manifest(splits.train.labels, 100, 0, trig, 0)
    view = train_view(splits, manifest, trig)
    kwargs = dict(num_classes=10, in_channels=1, image_size=view.image_shape[1], width=0.125)
    model = train_model(create_model("resnet9", **kwargs), view,
                        TrainRecipe(iterations=iterations, batch_size=64, lr=0.05, amp=False, seed=0), progress=False)
    deletion = draw_deletion_set(manifest, share=0.5, seed=0)
    retain = np.setdiff1d(np.arange(len(view)), deletion)
    return model, kwargs, view, deletion, retain
