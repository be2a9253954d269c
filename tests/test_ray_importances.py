"""Sharded importances over Ray tasks equal the single-process pass; connecting to Ray."""
from __future__ import annotations

import functools
import os
import socket
import time

import numpy as np
import pytest
import torch

import ray
from potion.datasets import ArraySource, LabeledView
from potion.errors import PotionError
from potion.models import create_model, model_from_state
from potion.distributed import runtime as ray_runtime
from potion.distributed.importances import combine_sums, shard_bounds, sharded_importances
from potion.unlearning.importances import compute_importances

KWARGS = dict(num_classes=3, in_channels=1, image_size=8, width=4)


# ---------------------------------------------------------------- pure parts
@pytest.mark.parametrize("n,shards", [(7, 3), (7, 1), (7, 7), (7, 20), (1, 4), (100, 6)])
def test_shard_bounds_cover_all_batches_contiguously(n, shards):
    b = shard_bounds(n, shards)
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(b, b[1:]))
    assert all(e > s for s, e in b)
    assert len(b) == min(n, shards)
    sizes = [e - s for s, e in b]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bounds_and_combine_refuse_nonsense():
    with pytest.raises(PotionError, match="empty"):
        shard_bounds(0, 3)
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    out = combine_sums([(a, 1), (b, 3)], 4)
    assert torch.equal(out["w"], torch.tensor([1.0, 2.0]))
    with pytest.raises(PotionError, match="covered 4 batches, expected 5"):
        combine_sums([(a, 1), (b, 3)], 5)


# ---------------------------------------------------------------- connecting
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_address_forms():
    assert ray_runtime.split_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert ray_runtime.split_address("ray://head:10001") == ("head", 10001)
    with pytest.raises(PotionError, match="dashboard"):
        ray_runtime.split_address("http://127.0.0.1:8265")
    with pytest.raises(PotionError, match="host:port"):
        ray_runtime.split_address("nowhere")


def test_unreachable_cluster_fails_fast_before_ray_starts(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not be reached"))
    addr = f"127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(PotionError, match=rf"cannot reach the Ray cluster at {addr}.*ray start --head.*RAY_ADDRESS"):
        ray_runtime.connect(addr)
    monkeypatch.setenv("RAY_ADDRESS", addr)
    with pytest.raises(PotionError, match="cannot reach"):
        ray_runtime.connect(None)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(PotionError, match="num-cpus"):
        ray_runtime.connect(addr, num_cpus=2)


def test_auth_mode_is_made_explicit_but_never_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert ray_runtime.set_auth_mode(joining=False) == "disabled" == os.environ["RAY_AUTH_MODE"]
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert ray_runtime.set_auth_mode(joining=True) == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / "tok").write_text("secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_runtime.set_auth_mode(joining=True) == "token"
    assert ray_runtime.set_auth_mode(joining=False) == "token"  # set now: left alone
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_runtime.set_auth_mode(joining=False) == "token"


def test_local_instance_asks_the_kernel_for_the_dashboard_agent_port():
    """ray.init has no argument for it; Ray's fixed default (52365) breaks a second instance."""
    from ray._private import parameter

    assert parameter.RayParams().dashboard_agent_listen_port == 52365  # Ray's own default
    with ray_runtime._kernel_chosen_agent_port():
        assert parameter.RayParams().dashboard_agent_listen_port == 0
        assert parameter.RayParams(dashboard_agent_listen_port=4242).dashboard_agent_listen_port == 4242
    assert parameter.RayParams().dashboard_agent_listen_port == 52365  # restored


# ---------------------------------------------------------------- with Ray
def test_local_instance_runs_its_dashboard_agent_on_a_free_port(ray_local):
    node = ray._private.worker.global_worker.node
    # -1: the agent could not bind its HTTP port (what a second instance on 52365 reports).
    assert node.dashboard_agent_listen_port > 0


@pytest.fixture(scope="module")
def ray_local():
    ray_runtime.connect(None, num_cpus=2)
    assert ray_runtime.owned()
    ray_runtime.connect(None, num_cpus=2)  # connected already: a no-op
    yield
    ray_runtime.shutdown_if_owned()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = np.arange(70) % 3
    source = ArraySource(images, labels, ["a", "b", "c"])
    n = len(labels)
    view_factory = functools.partial(LabeledView, source, np.arange(n), labels, np.zeros(n, bool),
                                     np.full(n, -1, np.int8), None, (0.5,), (0.25,))
    torch.manual_seed(1)
    state = create_model("small_cnn", **KWARGS).state_dict()
    model_factory = functools.partial(model_from_state, "small_cnn", KWARGS, state)
    positions = np.random.default_rng(0).permutation(n)[:53]  # unsorted: order is kept
    return model_factory, view_factory, positions


def _assert_rel_close(got, want, rel=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=rel, atol=rel * scale, msg=name)


@pytest.mark.parametrize("estimator,shards", [("xlf", 3), ("fisher", 2), ("lf", 50)])
def test_sharded_equals_single_process(ray_local, data, estimator, shards, capsys):
    model_factory, view_factory, positions = data
    batch_size = 8  # 53 samples: 7 batches, the last one partial
    want = compute_importances(model_factory(), view_factory().subset(positions).batches(batch_size), estimator)
    capsys.readouterr()
    got = sharded_importances(model_factory, view_factory, positions, estimator, None, batch_size, shards,
                              device="cpu", progress=True, desc=f"importances ({estimator})")
    _assert_rel_close(got, want)
    assert all(t.dtype == torch.float32 for t in got.values())
    # the driver's bar counts the batches of all shards, as plain lines off a terminal
    err = capsys.readouterr().err
    n_shards = min(shards, 7)
    assert "\r" not in err and f"importances ({estimator}), {n_shards} shards: 7/7 batch" in err
    assert f"shards done {n_shards}/{n_shards}" in err


def test_default_shards_and_errors_surface_as_potion_errors(ray_local, data):
    model_factory, view_factory, positions = data
    want = compute_importances(model_factory(), view_factory().subset(positions).batches(16), "lf_p", p=1.5)
    got = sharded_importances(model_factory, view_factory, positions, "lf_p", 1.5, 16)  # one shard per CPU
    _assert_rel_close(got, want)
    with pytest.raises(PotionError, match="lf_p.*needs a power p"):
        sharded_importances(model_factory, view_factory, positions, "lf_p", None, 16, 2)


def test_cuda_on_a_cluster_without_gpus_is_refused(ray_local, data):
    if ray_runtime.cluster_gpus() > 0:
        pytest.skip("this Ray cluster has GPUs")
    model_factory, view_factory, positions = data
    with pytest.raises(PotionError, match="no GPUs"):
        sharded_importances(model_factory, view_factory, positions, "xlf", None, 16, 2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sharded_on_gpu_matches_cpu(ray_local, data):
    model_factory, view_factory, positions = data
    want = compute_importances(model_factory(), view_factory().subset(positions).batches(8), "xlf")
    got = sharded_importances(model_factory, view_factory, positions, "xlf", None, 8, 2, device="auto")
    _assert_rel_close(got, want, rel=1e-4)


@pytest.mark.parametrize("sample", ["share", "auto"])
def test_sharded_and_single_process_sampled_passes_agree(ray_local, data, sample):
    from potion.distributed.importances import sharded_importance_sums
    from potion.unlearning.importances import importance_sums
    from potion.unlearning.sampling import AutoConfig, RetainSample, sampled_pass

    model_factory, view_factory, positions = data
    batch_size = 4  # 53 samples: 14 batches, so auto has checkpoints to stop at
    auto = AutoConfig(levels=(0.05, 0.2), overlap=0.5, min_batches=3, min_share=0.0, growth=1.5)
    spec = RetainSample("share", 0.6, 3) if sample == "share" else RetainSample("auto", None, 3, auto)
    model = model_factory()
    reference = compute_importances(model, view_factory().subset(positions[:9]).batches(batch_size), "xlf")
    asked: list = []

    def single(pos):
        asked.append(np.asarray(pos).copy())
        return importance_sums(model, view_factory().subset(positions[pos]).batches(batch_size), "xlf")

    def sharded(pos):
        return sharded_importance_sums(model_factory, view_factory, positions[pos], "xlf", None, batch_size, 2,
                                       device="cpu")

    want, rec_single = sampled_pass(single, len(positions), batch_size, spec, reference)
    got, rec_sharded = sampled_pass(sharded, len(positions), batch_size, spec, reference)
    _assert_rel_close(got, want)
    assert rec_single["n_used"] == rec_sharded["n_used"] < len(positions)
    assert rec_single["batches"] == rec_sharded["batches"]
    if sample == "auto":
        assert rec_single["converged"] and len(asked) >= 2  # stopped at a checkpoint after several rounds
