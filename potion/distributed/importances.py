"""The retain-set importance pass (SPEC §5) sharded over Ray tasks.

I = (1/K) Σ_b G(b) is a sum over batches, so contiguous shards of *whole* batches can be
summed independently and added on the driver before dividing by the total K. Cutting the
batch list (not the sample list) keeps every batch exactly as the single-process pass
forms it, which matters because G(b) is a function of the batch-mean gradient: the result
equals ``compute_importances`` up to float summation order.

Each task rebuilds the model and the data view from small factories (a run folder path,
say) instead of receiving tensors; a task is given a GPU when the cluster has one.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from potion.errors import PotionError, detail_of

# A shard is a pure function of its batches: a task whose worker died (killed, OOM, node
# lost) runs again elsewhere. Exceptions raised by the shard itself are not retried.
SHARD_RETRIES = 3


def shard_bounds(n_batches: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) batch ranges, as equal as possible, none empty."""
    if n_batches < 1:
        raise PotionError("no batches to compute importances on: the retain set is empty")
    num_shards = max(1, min(int(num_shards), n_batches))
    edges = np.linspace(0, n_batches, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _shard_sums(model_factory, view_factory, positions: np.ndarray, estimator, p, batch_size: int,
                device: str, augment: bool, seed: int):
    """One shard: Σ_b G(b) over its batches and their count (runs inside a Ray task)."""
    import ray

    from potion.distributed.runtime import worker_device
    from potion.unlearning.importances import importance_sums

    device = worker_device(device)
    model = model_factory()
    view = view_factory().subset(positions)
    batches = view.batches(batch_size, augment=augment, seed=seed, device=device)
    sums, k = importance_sums(model, batches, estimator, p=p, device=device)
    return {n: s.numpy() for n, s in sums.items()}, k, ray.get_runtime_context().get_node_id()


def sharded_importances(
    model_factory: Callable[[], torch.nn.Module],
    view_factory: Callable[[], object],
    positions: np.ndarray,
    estimator,
    p: float | None,
    batch_size: int,
    num_shards: int | None = None,
    device: str = "auto",
    **kwargs,
) -> dict[str, torch.Tensor]:
    """``compute_importances`` over ``view_factory().subset(positions)`` in Ray tasks
    (see :func:`sharded_importance_sums`)."""
    sums, k = sharded_importance_sums(model_factory, view_factory, positions, estimator, p, batch_size,
                                      num_shards, device, **kwargs)
    return {n: s.div_(k) for n, s in sums.items()}


def sharded_importance_sums(
    model_factory: Callable[[], torch.nn.Module],
    view_factory: Callable[[], object],
    positions: np.ndarray,
    estimator,
    p: float | None,
    batch_size: int,
    num_shards: int | None = None,
    device: str = "auto",
    *,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    augment: bool = False,
    seed: int = 0,
    progress: bool = False,
    desc: str = "importances (Ray shards)",
    placement: dict | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """``importance_sums`` over ``view_factory().subset(positions)`` in Ray tasks: Σ_b G(b)
    over the batches cut every ``batch_size`` from ``positions``, and their number K.

    ``num_shards`` defaults to one per GPU (or CPU) of the cluster. ``device``: ``auto``
    (a task uses CUDA when it was given a GPU; tasks ask for ``num_gpus`` each, default 1
    when the cluster has GPUs), ``cpu`` (no GPUs asked for) or ``cuda``. With
    ``augment=True`` every shard draws its own augmentation, so the result is a different
    (equally valid) sample than the single-process pass. Shards are spread over the
    cluster's nodes; ``placement``, when given, receives how many shards each node ran.
    """
    import ray

    from potion.distributed.leftovers import RESUME_HINT, describe_ray_failure

    positions, n_batches, num_gpus, num_shards = plan_pass(positions, batch_size, device, num_gpus, num_cpus,
                                                          num_shards)
    bounds = shard_bounds(n_batches, num_shards)

    task = ray.remote(_shard_sums).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=SHARD_RETRIES,
                                           retry_exceptions=False, scheduling_strategy="SPREAD")
    model_ref, view_ref = ray.put(model_factory), ray.put(view_factory)
    refs = [
        task.remote(model_ref, view_ref, positions[a * batch_size: b * batch_size], estimator, p, batch_size,
                    "auto" if device != "cpu" else "cpu", augment, seed)
        for a, b in bounds
    ]
    try:
        parts = _gather(refs, [b - a for a, b in bounds], n_batches, progress, desc)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), PotionError) else None
        if cause is not None:
            raise PotionError(str(cause)) from None
        raise
    except ray.exceptions.RayError as e:  # workers kept dying: retries spent
        raise PotionError(f"an importance shard failed on the Ray cluster after {SHARD_RETRIES} retries "
                          f"({describe_ray_failure(e)}); {RESUME_HINT}", detail=detail_of(e)) from None
    if placement is not None:
        nodes: dict[str, int] = {}
        for _, _, node in parts:
            nodes[node] = nodes.get(node, 0) + 1
        placement["importance_shards"] = nodes
    return combine_sums([(sums, k) for sums, k, _ in parts], n_batches, mean=False), n_batches


def plan_pass(positions, batch_size: int, device: str, num_gpus: float | None, num_cpus: float,
              workers: int | None) -> tuple[np.ndarray, int, float, int]:
    """Checks and resources of a Ray retain pass: the positions, their batch count K, the GPUs
    per worker (``device`` cpu: none; default: 1 when the cluster has GPUs) and the number of
    workers (default: one per GPU, else one per CPU of the cluster)."""
    import ray

    from potion.distributed.runtime import cluster_gpus

    if not ray.is_initialized():
        raise PotionError("Ray is not connected; call potion.distributed.runtime.connect() first")
    if batch_size < 1:
        raise PotionError(f"the importance batch size must be at least 1, got {batch_size}")
    positions = np.asarray(positions, dtype=np.int64)
    gpus = cluster_gpus()
    if device == "cpu":
        num_gpus = 0.0
    elif num_gpus is None:
        num_gpus = 1.0 if gpus > 0 else 0.0
    if device == "cuda" and num_gpus == 0:
        raise PotionError("device 'cuda' was asked for but the Ray cluster has no GPUs; use --device cpu or auto")
    if not workers:
        slots = gpus / num_gpus if num_gpus else ray.cluster_resources().get("CPU", 1.0) / max(num_cpus, 1e-9)
        workers = max(1, int(slots))
    return positions, math.ceil(len(positions) / batch_size), num_gpus, workers


def _gather(refs: list, sizes: list[int], n_batches: int, progress: bool, desc: str) -> list:
    """``ray.get(refs)`` in shard order, moving the bar as each shard finishes."""
    import ray

    from potion.progress import progress_bar

    size_of = {ref: n for ref, n in zip(refs, sizes)}
    waiting, done = list(refs), 0
    with progress_bar(total=n_batches, desc=f"{desc}, {len(refs)} shards", unit="batch", enabled=progress) as bar:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            ray.get(ready)  # a failed shard raises here, at once
            done += 1
            bar.set_postfix_str(f"shards done {done}/{len(refs)}", refresh=False)
            bar.update(size_of[ready[0]])
    return ray.get(refs)


def combine_sums(parts: Sequence[tuple[dict[str, np.ndarray], int]], n_batches: int,
                 mean: bool = True) -> dict[str, torch.Tensor]:
    """Σ over shards (in shard order, so the result is deterministic), divided by total K
    unless ``mean`` is False."""

    total_k = sum(k for _, k in parts)
    if total_k != n_batches:
        raise PotionError(f"the importance shards covered {total_k} batches, expected {n_batches}")
    names = list(parts[0][0])
    out = {}
    for n in names:
        acc = np.array(parts[0][0][n], dtype=np.float32, copy=True)  # shard arrays are read-only
        for sums, _ in parts[1:]:
            acc += sums[n]
        out[n] = torch.from_numpy(acc).div_(total_k) if mean else torch.from_numpy(acc)
    return out
