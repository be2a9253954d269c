"""Evaluation metrics of SPEC §4.

Accuracies are fractions in [0, 1]; ``poison_healed`` and ``model_damage`` are in percent
and percentage points, as in the paper's tables. Views are duck-typed (``len()`` and
``batches(batch_size, *, shuffle, seed, augment, device)`` yielding ``(x, y)``).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from potion.errors import PotionError


# Accuracy does not depend on the batch size, speed does: evaluation starts at these sizes
# and halves on a CUDA out-of-memory error until a batch fits.
CPU_EVAL_BATCH = 1024
CUDA_EVAL_BATCH = 4096


def eval_batch_size(device: str | torch.device) -> int:
    """The batch size evaluation starts at on ``device`` (``predict_with_labels`` backs off)."""
    return CUDA_EVAL_BATCH if torch.device(device).type == "cuda" else CPU_EVAL_BATCH


def fast_inference(device: torch.device, enabled: bool = True):
    """bf16 (or fp16) autocast on CUDA for accuracy checks; a no-op on other devices.

    Only predictions go through it: importances stay fp32 (SPEC §5)."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def batches_accuracy(model: nn.Module, batches, device: str | torch.device = "cpu", fast: bool = False) -> float:
    """Share of the ``(x, y)`` rows of ``batches`` that ``model``, in the mode the caller set,
    gets right; ``fast`` as in ``predict_with_labels``."""
    device = torch.device(device)
    correct = total = 0
    with torch.no_grad(), fast_inference(device, fast):
        for batch in batches:
            x, y = batch[0].to(device), batch[1].to(device)
            if fast and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.shape[0])
    if total == 0:
        raise PotionError("cannot measure accuracy on an empty set of batches")
    return correct / total


def predict_with_labels(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu",
                        fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and the view's labels, in the view's order (eval mode, no augmentation).

    ``fast`` (CUDA only): channels-last and half-precision autocast. A batch that does not
    fit in GPU memory is retried at half the size.
    """
    device = torch.device(device)
    while True:
        try:
            return _predict_with_labels(model, view, batch_size, device, fast)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)


def _predict_with_labels(model: nn.Module, view, batch_size: int, device: torch.device,
                         fast: bool) -> tuple[np.ndarray, np.ndarray]:
    was_training = model.training
    model.to(device).eval()
    channels_last = fast and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    preds, labels = [], []
    try:
        with torch.inference_mode(), fast_inference(device, fast):
            for x, y in view.batches(batch_size, shuffle=False, augment=False, device=device):
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
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
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(labels).numpy().astype(np.int64)


def predict(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted class of every sample of ``view``, in order."""
    return predict_with_labels(model, view, batch_size, device)[0]


def accuracy(model: nn.Module, view, batch_size: int = 512, device: str | torch.device = "cpu",
             fast: bool = False) -> float:
    pred, y = predict_with_labels(model, view, batch_size, device, fast)
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
    model: nn.Module, clean_view, triggered_view, target: int, batch_size: int = 512,
    device: str | torch.device = "cpu", fast: bool = False,
) -> dict[str, float]:
    """clean_acc on T, ra on T* (clean labels, all classes), asr on T* without class ``target``.

    ``triggered_view`` must carry the clean labels (as ``triggered_test_view`` does).
    """
    clean_acc = accuracy(model, clean_view, batch_size, device, fast)
    pred, y = predict_with_labels(model, triggered_view, batch_size, device, fast)
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
