"""Retain importances from a sample of Dr: seeding, the record, the auto rule, the exact
full pass, and the cache keeping sampled and full entries apart."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potion.errors import PotionError
from potion.unlearning.sampling import (
    AutoConfig,
    RetainSample,
    SampledImportances,
    checkpoints,
    parse_retain_sample,
    sampled_pass,
)

SMALL_AUTO = AutoConfig(levels=(0.05, 0.2), overlap=0.9, min_batches=2, min_share=0.0, growth=1.5)


def test_parse_retain_sample():
    assert parse_retain_sample("auto", seed=3) == RetainSample("auto", None, 3)
    assert parse_retain_sample("1.0").is_full and parse_retain_sample("1").is_full and parse_retain_sample(1.0).is_full
    assert parse_retain_sample("0.1", seed=2) == RetainSample("share", 0.1, 2)
    assert parse_retain_sample("5000") == RetainSample("count", 5000.0, 0)
    for bad in ("0", "1.5", "-0.2", "nan", "half", "0.0"):
        with pytest.raises(PotionError, match="--retain-sample"):
            parse_retain_sample(bad)
    labels = {parse_retain_sample(v, seed=s).label() for v in ("auto", "0.1", "5000", "1.0") for s in (0, 1)}
    assert len(labels) == 7  # every sample has its own label; the full pass has one


def _recording_sum_range(values: np.ndarray, batch_size: int, seen: list):
    """Σ over batches of a per-sample scalar 'gradient'; records the positions asked for."""
    def sum_range(pos):
        seen.append(np.asarray(pos).copy())
        chunks = [pos[i:i + batch_size] for i in range(0, len(pos), batch_size)]
        total = sum(float(values[c].mean()) for c in chunks)
        return {"w": torch.tensor([total], dtype=torch.float32)}, len(chunks)
    return sum_range


def test_sampling_is_seeded_and_recorded():
    values = np.arange(1000, dtype=np.float64)
    runs = {}
    for seed in (0, 0, 1):
        seen: list = []
        imp, rec = sampled_pass(_recording_sum_range(values, 32, seen), 1000, 32, RetainSample("share", 0.1, seed))
        runs.setdefault(seed, []).append((np.concatenate(seen), imp["w"].item(), rec))
    (p0, v0, r0), (p0b, v0b, _) = runs[0]
    p1, _, r1 = runs[1][0]
    assert np.array_equal(p0, p0b) and v0 == v0b  # same seed, same sample, same result
    assert not np.array_equal(np.sort(p0), np.sort(p1))  # another seed, another sample
    assert len(p0) == 100 and len(set(p0.tolist())) == 100 and p0.max() < 1000
    assert not np.array_equal(p0, np.sort(p0))  # a random draw, not the first 100
    assert r0["mode"] == "share" and r0["seed"] == 0 and r1["seed"] == 1
    assert r0["n_used"] == 100 and r0["batches"] == 4 and r0["share_used"] == pytest.approx(0.1)
    seen = []
    _, rc = sampled_pass(_recording_sum_range(values, 32, seen), 1000, 32, RetainSample("count", 70.0, 0))
    assert rc["n_used"] == 70 == len(np.concatenate(seen)) and rc["batches"] == 3
    with pytest.raises(PotionError, match="full retain pass"):
        sampled_pass(_recording_sum_range(values, 32, []), 1000, 32, RetainSample.full())


def _stream(n_batches: int, n_params: int, stable: bool, seed: int = 0):
    """Per-batch G(b): a fixed positive profile times small noise (stable), or a profile
    whose large entries move to other elements from batch to batch (unstable)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n_params, generator=g) + 0.1
    batches = []
    for _ in range(n_batches):
        if stable:
            batches.append(base * (1 + 0.01 * torch.randn(n_params, generator=g)))
        else:
            batches.append(torch.rand(n_params, generator=g).pow(8) * 1e3 + 1e-3)
    return batches


def _stream_sum_range(batches, batch_size: int, seen: list):
    # Positions p*batch_size .. belong to batch p of the stream: the pass's order decides
    # which batch is read, exactly like positions of Dr decide which images are.
    def sum_range(pos):
        idx = sorted({int(p) // batch_size for p in pos})
        seen.extend(idx)
        return {"w": torch.stack([batches[i] for i in idx]).sum(0)}, len(idx)
    return sum_range


@pytest.mark.parametrize("stable", [True, False])
def test_auto_stops_early_on_a_stable_stream_and_goes_on_on_an_unstable_one(stable):
    n_batches, bs, n_params = 64, 4, 400
    batches = _stream(n_batches, n_params, stable)
    # The sample order must not cut stream batches apart: sum_range maps a position to its batch.
    reference = {"w": torch.ones(n_params)}
    seen: list = []
    sample = RetainSample("auto", None, 0, SMALL_AUTO)
    import potion.unlearning.sampling as sampling

    orig = sampling.sample_order
    sampling.sample_order = lambda n, seed: np.arange(n)  # batches of the stream in order
    try:
        imp, rec = sampled_pass(_stream_sum_range(batches, bs, seen), n_batches * bs, bs, sample, reference)
    finally:
        sampling.sample_order = orig
    cps = checkpoints(n_batches * bs, bs, SMALL_AUTO)
    want = torch.stack(batches[: rec["batches"]]).mean(0)
    torch.testing.assert_close(imp["w"], want)
    assert [c["batches"] for c in rec["checks"]] == cps[: len(rec["checks"])]
    if stable:
        assert rec["converged"] and rec["batches"] == cps[1] < n_batches  # the first comparison suffices
    else:
        assert not rec["converged"] and rec["batches"] == n_batches
        assert all(c["overlap_min"] < SMALL_AUTO.overlap for c in rec["checks"][1:])


def test_checkpoints_respect_the_floors():
    assert checkpoints(1000, 10, AutoConfig(min_batches=16, min_share=0.05, growth=1.5)) == \
        [16, 24, 36, 54, 81, 100]
    assert checkpoints(1000, 10, AutoConfig(min_batches=4, min_share=0.5, growth=2.0)) == [50, 100]
    assert checkpoints(30, 10) == [3]  # fewer batches than the floor: the whole of Dr


# ---------------------------------------------------------------- through the pipeline
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from potion.cli import main

    out = tmp_path_factory.mktemp("sampling") / "run"
    assert main(["train", "--dataset", "digits", "--model", "small_cnn", "--poison-share", "0.05",
                 "--iterations", "30", "--out", str(out), "--quiet"]) == 0
    return out


def _importance_fn(run_dir, cache_dir, **job):
    from potion.runs.configs import HealJob
    from potion.heal.importances import make_importance_fn
    from potion.heal.inputs import RunSource

    inputs = RunSource(run_dir).load()
    job = HealJob(cache_dir=str(cache_dir), importance_batch_size=64, **job)
    deletion = np.flatnonzero(inputs.poisoned_mask)[:10]
    retain = np.setdiff1d(np.arange(inputs.n_train), deletion)
    rview = inputs.train.subset(retain)
    state0 = {k: v.detach().clone() for k, v in inputs.model.state_dict().items()}
    fn = make_importance_fn(inputs, job, state0, deletion, retain, "cpu", False, rview)
    return fn, inputs, rview


def test_full_sample_equals_the_paper_pass_exactly_and_cache_keeps_samples_apart(tiny_run, tmp_path):
    from potion.unlearning.importances import compute_importances

    cache_dir = tmp_path / "cache"
    fn, run, rview = _importance_fn(tiny_run, cache_dir)  # run: the HealInputs
    batches_fn = lambda: rview.batches(64)  # noqa: E731
    want = compute_importances(run.model, rview.batches(64), "xlf")
    full = fn("xlf", None, batches_fn, "retain", sample=parse_retain_sample("1.0"), reference=None)
    assert all(torch.equal(full[n], want[n]) for n in want)  # bit-identical
    assert not isinstance(full, SampledImportances)
    assert len(list(cache_dir.iterdir())) == 1

    imp_f = compute_importances(run.model, run.train.subset(np.arange(10)).batches(64), "xlf")
    sample = parse_retain_sample("0.25", seed=1)
    part = fn("xlf", None, batches_fn, "retain", sample=sample, reference=imp_f)
    assert isinstance(part, SampledImportances) and part.record["label"] == sample.label()
    assert part.record["n_used"] == int(np.ceil(0.25 * len(rview)))
    assert any(not torch.equal(part[n], want[n]) for n in want)
    assert len(list(cache_dir.iterdir())) == 2  # a second entry, not the full one overwritten

    # Hits return what was stored under each key, the sample's record included.
    again_full = fn("xlf", None, batches_fn, "retain", sample=None, reference=None)
    assert all(torch.equal(again_full[n], want[n]) for n in want)
    again_part = fn("xlf", None, batches_fn, "retain", sample=sample, reference=imp_f)
    assert again_part.record == json.loads(json.dumps(part.record))
    assert all(torch.equal(again_part[n], part[n]) for n in want)
    other_seed = fn("xlf", None, batches_fn, "retain", sample=parse_retain_sample("0.25", seed=2), reference=imp_f)
    assert any(not torch.equal(other_seed[n], part[n]) for n in want)
    assert len(list(cache_dir.iterdir())) == 3


def test_heal_records_the_sample_and_reads_theta0_metrics_from_the_run(tiny_run, tmp_path):
    from potion.runs.configs import HealJob
    from potion.heal.run import run_heal

    base = dict(method="xlf_ptn", tracking_uri="none", cache_dir="none", importance_batch_size=64,
                on_no_crossing="keep")
    rep = run_heal(tiny_run, HealJob(retain_sample="0.5", **base), tmp_path / "a", share=0.5, progress=False)
    assert rep["retain_sample"]["mode"] == "share" and rep["retain_sample"]["n_used"] > 0
    assert rep["config"]["retain_sample"] == "0.5"
    assert rep["before_source"] == "metrics.json"
    recorded = json.loads((tiny_run / "metrics.json").read_text())
    assert {k: rep["before"][k] for k in ("clean_acc", "ra", "asr")} == {k: recorded[k] for k in ("clean_acc", "ra", "asr")}
    assert 0 <= rep["before"]["deletion_acc"] <= 1
    rep2 = run_heal(tiny_run, HealJob(**{**base, "method": "none"}, remeasure=True), tmp_path / "b", share=0.5,
                    progress=False)
    assert rep2["before_source"] == "measured"
    assert rep2["before"]["clean_acc"] == pytest.approx(recorded["clean_acc"], abs=1e-6)
    with pytest.raises(PotionError, match="--retain-sample"):
        run_heal(tiny_run, HealJob(retain_sample="1.5", **base), tmp_path / "c", share=0.5, progress=False)
