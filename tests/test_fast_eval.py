"""The lean evaluation path: batch back-off on out-of-memory, and CUDA channels-last + autocast."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import potion.metrics as metrics
from potion.datasets import ArraySource, LabeledView
from potion.models import create_model
from potion.unlearning.evaluator import StepEvaluator

KWARGS = dict(num_classes=3, in_channels=1, image_size=8, width=4)


def _view(n=40):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = np.arange(n) % 3
    return LabeledView(ArraySource(images, labels, ["a", "b", "c"]), np.arange(n), labels, np.zeros(n, bool),
                       np.full(n, -1, np.int8), None, (0.5,), (0.25,))


def _model():
    torch.manual_seed(0)
    return create_model("small_cnn", **KWARGS)


def test_out_of_memory_halves_the_batch_until_it_fits(monkeypatch):
    view, model = _view(), _model()
    want = metrics.predict_with_labels(model, view, batch_size=64)
    real, sizes = metrics._predict_with_labels, []

    def tight(model, view, batch_size, device, fast):
        sizes.append(batch_size)
        if batch_size > 8:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, view, batch_size, device, fast)

    monkeypatch.setattr(metrics, "_predict_with_labels", tight)
    got = metrics.predict_with_labels(model, view, batch_size=64)
    assert sizes == [64, 32, 16, 8]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_fast_is_a_no_op_off_cuda():
    view, model = _view(), _model()
    a = metrics.predict_with_labels(model, view, 16, "cpu", fast=False)
    b = metrics.predict_with_labels(model, view, 16, "cpu", fast=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert metrics.eval_batch_size("cpu") == metrics.CPU_EVAL_BATCH


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_eval_on_cuda_agrees_with_fp32_and_leaves_the_model_as_it_was():
    view, model = _view(400), _model()
    want, _ = metrics.predict_with_labels(model, view, 64, "cuda", fast=False)
    got, _ = metrics.predict_with_labels(model, view, 64, "cuda", fast=True)
    assert np.mean(got == want) >= 0.98  # half precision may flip a near-tie
    w = next(p for p in model.parameters() if p.dim() == 4)
    assert w.is_contiguous() and w.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_search_checks_on_cuda_match_fp32_accuracies():
    view, model = _view(200), _model()
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    imp = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    fb = list(view.batches(32))
    slow = StepEvaluator(model, state0, imp, imp, fb, 20, 200, device="cuda", fast=False)
    fast = StepEvaluator(_model(), state0, imp, imp, fb, 20, 200, device="cuda", fast=True)
    assert fast.fast and abs(fast.acc0 - slow.acc0) <= 0.02
    assert abs(fast.evaluate(5).acc_forget - slow.evaluate(5).acc_forget) <= 0.02
