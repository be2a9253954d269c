"""Evaluation metrics of SPEC §4.

Accuracies are fractions in [0, 1]; ``poison_healed`` and ``model_damage`` are in percent
and percentage points, as in the paper's tables. Views are duck-typed (``len()`` and
``batches(batch_size, *, shuffle, seed, augment, device)`` yielding ``(x, y)``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from potion.errors import PotionError


def predict_with_labels(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and the view's labels, in the view's order (eval mode, no augmentation)."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    preds, labels = [], []
    try:
        with torch.inference_mode():
            for x, y in view.batches(batch_size, shuffle=False, augment=False, device=device):
                logits = model(x)
                if y.numel() and int(y.max()) >= logits.shape[1]:
                    raise PotionError(
                        f"model has {logits.shape[1]} outputs but the data has label {int(y.max())}; "
                        "use a model trained for this dataset"
                    )
                preds.append(logits.argmax(dim=1).cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(labels).numpy().astype(np.int64)


def predict(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted class of every sample of ``view``, in order."""
    return predict_with_labels(model, view, batch_size, device)[0]


def accuracy(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    pred, y = predict_with_labels(model, view, batch_size, device)
    return accuracy_of(pred, y)


def accuracy_of(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``pred`` equal to ``labels``; nan for no samples."""
    if len(labels) == 0:
        return math.nan
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def attack_success(pred_triggered: np.ndarray, clean_labels: np.ndarray, target: int) -> float:
    """asr: share of triggered samples whose clean label is not ``target`` predicted as ``target``."""
    pred_triggered, clean_labels = np.asarray(pred_triggered), np.asarray(clean_labels)
    other = clean_labels != target
    if not other.any():
        return math.nan
    return float(np.mean(pred_triggered[other] == target))


def attack_metrics(
    model: nn.Module, clean_view, triggered_view, target: int, batch_size: int = 512, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """clean_acc on T, ra on T* (clean labels, all classes), asr on T* without class ``target``.

    ``triggered_view`` must carry the clean labels (as ``triggered_test_view`` does).
    """
    clean_acc = accuracy(model, clean_view, batch_size, device)
    pred, y = predict_with_labels(model, triggered_view, batch_size, device)
    return {"clean_acc": clean_acc, "ra": accuracy_of(pred, y), "asr": attack_success(pred, y, target)}


def poison_healed(ra: float, clean_acc: float) -> float:
    """100 · ra / clean_acc (percent); nan when clean accuracy is 0."""
    if clean_acc == 0 or math.isnan(clean_acc):
        return math.nan
    return 100.0 * ra / clean_acc


def model_damage(clean_after: float, clean_before: float) -> float:
    """100 · (after − before), percentage points; negative means damage."""
    return 100.0 * (clean_after - clean_before)


def check_num_classes(model_classes: int, data_classes: int, where: str = "") -> None:
    """Refuse a model whose output width differs from the dataset's class count."""
    if model_classes != data_classes:
        prefix = f"{where}: " if where else ""
        raise PotionError(
            f"{prefix}model has {model_classes} outputs but dataset has {data_classes} classes; "
            "use a model trained on this dataset (or retrain with the right number of classes)"
        )
