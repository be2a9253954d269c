import math

import pytest
import torch
from torch import nn

from potion.errors import PotionError
from potion.metrics import accuracy
from potion.models import create_model
from potion.training import TrainRecipe, lr_factor, train_model, warmup_iterations


class FakeView:
    """Duck-typed LabeledView over in-memory tensors; records how it was asked for batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.calls = x, y, []

    def __len__(self):
        return len(self.y)

    def batches(self, batch_size, *, shuffle=False, seed=0, augment=False, device="cpu", num_workers=0):
        self.calls.append({"shuffle": shuffle, "seed": seed, "augment": augment, "device": str(device)})
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self.y))
        for i in range(0, len(order), batch_size):
            j = order[i : i + batch_size]
            yield self.x[j].to(device), self.y[j].to(device)


def separable(n=64, classes=4, size=8, seed=0):
    """Class k = noise plus a bright 2x2 patch at position k: trivially learnable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    for k in range(classes):
        x[y == k, :, 2 * k : 2 * k + 2, 1:3] += 3.0
    return FakeView(x, y)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet9", num_classes=4, in_channels=1, image_size=8, width=0.125)


def test_lr_factor_hand_computed():
    assert warmup_iterations(100, 0.1) == 10
    assert lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(4, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(9, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.1) == pytest.approx(1 / 90)
    # the benchmark: 4000 iterations, 1 % warm-up = 40 iterations
    assert lr_factor(0, 4000, 0.01) == pytest.approx(1 / 40)
    assert lr_factor(39, 4000, 0.01) == pytest.approx(1.0)
    assert lr_factor(2020, 4000, 0.01) == pytest.approx(0.5)
    # warm-up is at least one iteration, so warmup=0 starts at the full rate
    assert warmup_iterations(50, 0.0) == 1 and lr_factor(0, 50, 0.0) == 1.0
    assert lr_factor(0, 1, 0.5) == 1.0


def test_training_uses_schedule_and_reshuffles_each_epoch(monkeypatch):
    seen_lr = []
    original = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen_lr.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    view = separable(n=10)
    recipe = TrainRecipe(iterations=7, batch_size=4, lr=0.5, warmup=0.3, seed=5, amp=False)
    train_model(tiny_model(), view, recipe, progress=False)
    assert seen_lr == pytest.approx([0.5 * lr_factor(i, 7, 0.3) for i in range(7)])
    assert seen_lr[:3] == pytest.approx([0.5 / 2, 0.5, 0.5 * 5 / 5])  # w = round(2.1) = 2
    # 3 batches per epoch → 3 epochs for 7 updates, seeds seed+epoch, augmentation on
    assert view.calls == [{"shuffle": True, "seed": s, "augment": True, "device": "cpu"} for s in (5, 6, 7)]


def test_training_learns_separable_data():
    view = separable()
    losses = []
    recipe = TrainRecipe(iterations=40, batch_size=16, lr=0.05, seed=0)
    model = train_model(tiny_model(), view, recipe, progress=False, callback=lambda step, loss: losses.append((step, loss)))
    assert [s for s, _ in losses] == list(range(1, 41))
    first, last = sum(l for _, l in losses[:4]) / 4, sum(l for _, l in losses[-4:]) / 4
    assert first > 1.0 and last < 0.5 * first
    assert not model.training
    assert accuracy(model, view, batch_size=32) >= 0.9
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last undone on return


def test_training_is_deterministic():
    view = separable(n=32)
    recipe = TrainRecipe(iterations=5, batch_size=8, lr=0.05, seed=3)
    a = train_model(tiny_model(), view, recipe, progress=False).state_dict()
    b = train_model(tiny_model(), view, recipe, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_advice():
    view = separable(n=8)
    view.x[0, 0, 0, 0] = math.nan
    with pytest.raises(PotionError, match="lower the learning rate"):
        train_model(tiny_model(), view, TrainRecipe(iterations=3, batch_size=8), progress=False)


def test_bad_recipe_and_empty_view():
    with pytest.raises(PotionError, match="iterations"):
        TrainRecipe(iterations=0)
    with pytest.raises(PotionError, match="warmup"):
        TrainRecipe(warmup=1.5)
    with pytest.raises(PotionError, match="empty"):
        train_model(nn.Linear(2, 2), FakeView(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), TrainRecipe(), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision is only used on CUDA")
def test_training_with_amp_on_cuda():
    view = separable()
    model = train_model(tiny_model(), view, TrainRecipe(iterations=40, batch_size=16, lr=0.05), device="cuda", progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert accuracy(model, view, device="cuda") >= 0.9
