import math

import numpy as np
import pytest
import torch
from torch import nn

from potion.errors import PotionError
from potion.metrics import (
    accuracy,
    attack_metrics,
    attack_success,
    check_num_classes,
    model_damage,
    poison_healed,
    predict,
)


class FakeView:
    def __init__(self, x, y):
        self.x, self.y, self.calls = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), []

    def __len__(self):
        return len(self.y)

    def batches(self, batch_size, *, shuffle=False, seed=0, augment=False, device="cpu", num_workers=0):
        self.calls.append({"shuffle": shuffle, "augment": augment})
        for i in range(0, len(self.y), batch_size):
            yield self.x[i : i + batch_size].to(device), self.y[i : i + batch_size].to(device)


class Oracle(nn.Module):
    """Predicts the class written in the input's first feature, via fixed one-hot logits."""

    def __init__(self, classes=4):
        super().__init__()
        self.classes, self.modes, self.dummy = classes, [], nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.modes.append(self.training)
        return nn.functional.one_hot(x[:, 0].long(), self.classes).float() + 0 * self.dummy


def view_predicting(pred, labels):
    return FakeView(np.asarray(pred, dtype=np.float32)[:, None], labels)


def test_predict_order_eval_mode_no_augmentation():
    model = Oracle().train()
    view = view_predicting([3, 1, 2, 0, 0, 2, 1], [0] * 7)
    pred = predict(model, view, batch_size=3)
    assert pred.dtype == np.int64 and pred.tolist() == [3, 1, 2, 0, 0, 2, 1]
    assert model.modes == [False, False, False] and model.training  # eval inside, mode restored after
    assert view.calls == [{"shuffle": False, "augment": False}]


def test_attack_metrics_hand_built():
    labels = [0, 1, 2, 3, 0, 1]
    clean = view_predicting([0, 1, 2, 0, 0, 2], labels)  # 4 of 6 right
    triggered = view_predicting([0, 0, 2, 0, 0, 1], labels)  # right at 0, 2, 4, 5; of labels != 0 (1,2,3,5) → 0 twice
    m = attack_metrics(Oracle(), clean, triggered, target=0, batch_size=4)
    assert m == {"clean_acc": pytest.approx(4 / 6), "ra": pytest.approx(4 / 6), "asr": pytest.approx(2 / 4)}
    assert accuracy(Oracle(), clean, batch_size=2) == pytest.approx(4 / 6)
    assert attack_metrics(Oracle(), clean, triggered, target=2)["asr"] == pytest.approx(0.0)


def test_asr_without_non_target_samples_is_nan():
    assert math.isnan(attack_success(np.array([0, 0]), np.array([0, 0]), target=0))
    assert attack_success(np.array([1, 1, 0]), np.array([0, 1, 2]), target=1) == pytest.approx(0.5)


def test_healed_and_damage():
    assert poison_healed(0.5, 0.8) == pytest.approx(62.5)
    assert poison_healed(0.9, 0.9) == pytest.approx(100.0)
    assert math.isnan(poison_healed(0.5, 0.0))
    assert model_damage(0.90, 0.93) == pytest.approx(-3.0)
    assert model_damage(0.95, 0.93) == pytest.approx(2.0)


def test_class_count_checks():
    check_num_classes(10, 10, "train")
    with pytest.raises(PotionError, match="heal: model has 10 outputs but dataset has 100 classes"):
        check_num_classes(10, 100, "heal")
    with pytest.raises(PotionError, match="model has 4 outputs but the data has label 7"):
        predict(Oracle(4), view_predicting([0, 1], [0, 7]))
