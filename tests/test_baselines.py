"""The baselines task_vector and finetune on the tiny backdoored MLP: they lower the attack
success rate, read no ground truth, and their knobs are strict."""
from __future__ import annotations

import pytest
import torch

from potion.config import from_dict
from potion.errors import PotionError
from potion.runs.configs import HealJob
from potion.unlearning.finetune import FinetuneConfig, rebatch, sgd_steps
from potion.unlearning.methods import HealContext, heal
from potion.unlearning.ptn import PTNNoCrossing
from potion.unlearning.task_vector import TaskVectorConfig, choose_scale, negated
from toy_backdoor import backdoored_mlp


@pytest.fixture(scope="module")
def toy():
    model, x, y, poison, g = backdoored_mlp(seed=1)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    xt = torch.randn(600, 12, generator=g)
    yt = xt[:, :3].argmax(1)
    triggered = xt[yt != 0].clone()
    triggered[:, 10:] = 4.0  # the MLP's trigger; class 0 is the target
    return model, theta0, x, y, poison, (xt, yt, triggered)


def context(toy, forget, **kw) -> HealContext:
    model, theta0, x, y, _, _ = toy
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[forget] = False
    xr, yr = x[keep], y[keep]
    rb = [(xr[i:i + 64], yr[i:i + 64]) for i in range(0, len(xr), 64)]

    def ground_truth(*_):
        raise AssertionError("a baseline read ground truth")

    return HealContext(model=model, state0=theta0, retain_batches=lambda: iter(rb),
                       forget_batches=[(x[forget], y[forget])], n_forget=len(forget), n_total=len(x),
                       grid_score=ground_truth, val_batches=ground_truth, retrain=ground_truth, **kw)


def measure(toy, state) -> tuple[float, float]:
    """(clean accuracy, attack success rate) on fresh test points."""
    model, _, _, _, _, (xt, yt, triggered) = toy
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return (float((model(xt).argmax(1) == yt).float().mean()),
                float((model(triggered).argmax(1) == 0).float().mean()))


def test_task_vector_lowers_asr_from_a_few_found_samples(toy):
    _, theta0, x, y, poison, _ = toy
    clean0, asr0 = measure(toy, theta0)
    res = heal("task_vector", context(toy, poison[:8]))
    clean, asr = measure(toy, res.state_dict)
    assert asr0 > 0.9 and asr < asr0 - 0.4
    assert clean > clean0 - 0.05
    info = res.info
    # λ is the smallest measured scale that brought Sf to ρ · acc0, and the model holds θ0 − λτ
    crossed = [s for s in info["scales"] if s["acc_forget"] <= info["threshold"]]
    assert info["lam"] == min(s["lam"] for s in crossed)
    assert all(s["acc_forget"] > info["threshold"] for s in info["scales"] if s["lam"] < info["lam"])
    assert info["acc0"] == 1.0 and info["threshold"] == pytest.approx(0.2) and info["tau_norm"] > 0
    assert all(torch.equal(theta0[n], res.state_dict[n]) for n in theta0 if "running" in n)


def test_finetune_on_clean_retain_set_lowers_asr(toy):
    _, theta0, _, _, poison, _ = toy
    clean0, asr0 = measure(toy, theta0)
    cfg = FinetuneConfig(steps=200, lr=0.05)
    res = heal("finetune", context(toy, poison, finetune=cfg))  # every poison found: Dr is clean
    clean, asr = measure(toy, res.state_dict)
    assert asr < asr0 - 0.1 and clean > clean0 - 0.02
    assert res.info["finetune"]["steps"] == 200
    again = heal("finetune", context(toy, poison, finetune=cfg))  # the seed fixes Dr's order
    assert all(torch.equal(again.state_dict[n], res.state_dict[n]) for n in res.state_dict)
    other = heal("finetune", context(toy, poison, finetune=FinetuneConfig(steps=200, lr=0.05, seed=1)))
    assert not all(torch.equal(other.state_dict[n], res.state_dict[n]) for n in res.state_dict)


def test_choose_scale_doubles_then_bisects():
    seen = []

    def acc_at(lam):
        seen.append(lam)
        return 1.0 if lam < 5.0 else 0.0

    lam, trace = choose_scale(acc_at, 0.2, TaskVectorConfig(scale_start=1.0, refine=2))
    assert seen == [1.0, 2.0, 4.0, 8.0, 6.0, 5.0] and lam == 5.0
    assert [t.lam for t in trace] == seen
    lam, trace = choose_scale(lambda _: 1.0, 0.2, TaskVectorConfig(scale_start=1.0, max_scale=8.0))
    assert lam is None and [t.lam for t in trace] == [1.0, 2.0, 4.0, 8.0]


def test_task_vector_without_crossing_is_a_reported_failure(toy):
    with pytest.raises(PTNNoCrossing, match="task_vector found no scale"):
        heal("task_vector", context(toy, toy[4][:8], task_vector=TaskVectorConfig(steps=1, lr=1e-9, max_scale=1.0)))


def test_negated_moves_only_parameters():
    state = {"w": torch.ones(2), "running_mean": torch.zeros(2)}
    out = negated(state, {"w": torch.tensor([1.0, -1.0])}, 2.0)
    assert torch.equal(out["w"], torch.tensor([-1.0, 3.0])) and torch.equal(out["running_mean"], torch.zeros(2))


def test_sgd_steps_refuses_an_empty_set(toy):
    with pytest.raises(PotionError, match="at least one batch"):
        sgd_steps(toy[0], toy[1], lambda: [], 3, 0.1)


@pytest.mark.parametrize("section, values, message", [
    ("finetune", {"steps": 0}, "finetune.steps must be an integer >= 1"),
    ("finetune", {"lr": -1.0}, "finetune.lr must be a number > 0"),
    ("task_vector", {"momentum": 1.0}, r"task_vector.momentum must lie in \[0, 1\)"),
    ("task_vector", {"scale_start": 8.0, "max_scale": 4.0}, "task_vector.max_scale must be >= scale_start"),
    ("task_vector", {"scales": [1]}, "unknown config key 'task_vector.scales'"),
])
def test_bad_knobs_are_one_line_errors(section, values, message):
    with pytest.raises(PotionError, match=message):
        from_dict(HealJob, {"method": section, section: values})


def test_rebatch_keeps_order_and_cuts_at_its_own_size():
    x = torch.arange(10).float().unsqueeze(1)
    parts = [(x[:3], x[:3, 0].long()), (x[3:4], x[3:4, 0].long()), (x[4:], x[4:, 0].long())]
    out = list(rebatch(parts, 4))
    assert [len(y) for _, y in out] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(10))
