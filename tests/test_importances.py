"""Importances against a direct, written-out autograd computation (SPEC §5)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from potion.errors import PotionError
from potion.unlearning.importances import ESTIMATORS, compute_importances, importance_sums



def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    # Running statistics far from any batch's statistics, so eval vs train mode shows.
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m


def tiny_batches(n: int = 10, bs: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]  # 4, 4, 2: partial last


def objective(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    norms = torch.sqrt((logits**2).sum(dim=1))
    if name == "fisher":
        return F.cross_entropy(logits, y)
    if name == "lf":
        return (norms**2).mean()
    if name == "xlf":
        return norms.mean()
    if name == "lf_p3":
        return (norms**3).mean()
    raise AssertionError(name)


def reference(model: nn.Module, batches, name: str) -> dict[str, torch.Tensor]:
    """I = (1/K) Σ_b G(b), in float64, one torch.autograd.grad call per batch."""
    m = copy.deepcopy(model).double().eval().requires_grad_(True)
    params = dict(m.named_parameters())
    total = {n: torch.zeros_like(q) for n, q in params.items()}
    for x, y in batches:
        grads = torch.autograd.grad(objective(name, m(x.double()), y), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            total[n] += g**2 if name == "fisher" else g.abs()
    return {n: t / len(batches) for n, t in total.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name,est,p", [("fisher", "fisher", None), ("lf", "lf", None), ("xlf", "xlf", None),
                                        ("xlf", "lf_p", 1.0), ("lf", "lf_p", 2.0), ("lf_p3", "lf_p", 3.0)])
def test_estimators_match_direct_autograd(name, est, p):
    model, batches = tiny_model(), tiny_batches()
    ref = reference(model, batches, name)
    got = compute_importances(model, batches, est, p=p)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert "1.weight" in got and "1.bias" in got  # batch-norm affine parameters included
    for n in ref:
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu"
        assert rel_err(got[n], ref[n]) <= 1e-5, n


def test_partial_batch_has_the_weight_of_a_full_one():
    model, batches = tiny_model(), tiny_batches()
    sums, k = importance_sums(model, batches, "xlf")
    assert k == 3
    # A sample-weighted mean would give the 2-sample batch half the weight; check we don't.
    g = [compute_importances(model, [b], "xlf") for b in batches]
    for n in sums:
        assert torch.allclose(sums[n], g[0][n] + g[1][n] + g[2][n], rtol=1e-5, atol=1e-7)
    mean = compute_importances(model, batches, "xlf")
    for n in sums:
        assert torch.allclose(mean[n] * 3, sums[n], rtol=1e-6)


def test_model_state_restored_and_eval_mode_used():
    model, batches = tiny_model(), tiny_batches()
    model.train()
    model[0].weight.requires_grad_(False)  # frozen still gets an importance
    model[5].weight.grad = torch.full_like(model[5].weight, 7.0)
    ref = reference(model, batches, "fisher")
    got = compute_importances(model, batches, "fisher", progress=True, total=len(batches))
    assert rel_err(got["0.weight"], ref["0.weight"]) <= 1e-5
    assert all(m.training for m in model.modules())
    assert model[0].weight.requires_grad is False
    assert torch.equal(model[5].weight.grad, torch.full_like(model[5].weight, 7.0))
    assert model[0].weight.grad is None
    # Train-mode (batch statistics) gradients differ, so matching the reference shows eval mode.
    train_ref = copy.deepcopy(model).double().train().requires_grad_(True)
    x, y = batches[0]
    g_train = torch.autograd.grad(F.cross_entropy(train_ref(x.double()), y), [train_ref[5].weight])[0]
    g_eval = compute_importances(model, [batches[0]], "fisher")["5.weight"]
    assert not torch.allclose(g_train**2, g_eval.double(), rtol=1e-3)


def test_low_precision_model_measured_in_fp32():
    model, batches = tiny_model(), tiny_batches()
    low = copy.deepcopy(model).to(torch.bfloat16)
    ref = reference(copy.deepcopy(low).float(), batches, "xlf")
    got = compute_importances(low, batches, "xlf")
    assert all(t.dtype == torch.float32 for t in got.values())
    assert all(rel_err(got[n], ref[n]) <= 1e-5 for n in ref)
    assert all(q.dtype == torch.bfloat16 for q in low.parameters())


def test_unused_parameter_gets_zero():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Partly()
    got = compute_importances(model, [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))], "lf")
    assert torch.equal(got["unused.weight"], torch.zeros(2, 2))
    assert got["used.weight"].abs().sum() > 0


def test_expanded_gradients():
    # The gradient of p.sum() is an expanded view: it must not break the in-place abs.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.s = nn.Linear(3, 2), nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

        def forward(self, x):
            return self.lin(x) * self.s.sum()

    model = Scaled()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    got = compute_importances(model, [(x, torch.zeros(5, dtype=torch.long))], "xlf")
    g = torch.autograd.grad(torch.sqrt((model(x) ** 2).sum(1)).mean(), [model.s])[0]
    assert torch.allclose(got["s"], g.abs())
    assert got["s"][0] == got["s"][1] == got["s"][2] > 0


def test_label_free_estimators_accept_bare_inputs():
    model, batches = tiny_model(), tiny_batches()
    a = compute_importances(model, batches, "xlf")
    b = compute_importances(model, [x for x, _ in batches], "xlf")
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(PotionError, match="needs labels"):
        compute_importances(model, [x for x, _ in batches], "fisher")


def test_errors():
    model, batches = tiny_model(), tiny_batches()
    with pytest.raises(PotionError, match="empty"):
        compute_importances(model, [], "xlf")
    with pytest.raises(PotionError, match="empty"):
        compute_importances(model, [(torch.zeros(0, 3, 5, 5), torch.zeros(0, dtype=torch.long))], "xlf")
    with pytest.raises(PotionError, match="p > 0"):
        compute_importances(model, batches, "lf_p")
    with pytest.raises(PotionError, match="p must be"):
        compute_importances(model, batches, "lf_p", p=-1)
    with pytest.raises(PotionError, match="lf_p"):
        compute_importances(model, batches, "xlf", p=2)
    with pytest.raises(PotionError, match="unknown importance estimator"):
        compute_importances(model, batches, "nope")
    assert set(ESTIMATORS.names()) >= {"fisher", "lf", "xlf", "lf_p"}
    with torch.no_grad():
        model[5].weight[0, 0] = float("nan")
    with pytest.raises(PotionError, match="importances contain NaN"):
        compute_importances(model, batches, "xlf")
