"""The retain-set importance pass (SPEC §5) as a Ray Data pipeline, for data too big to copy around.

The batches are cut as the single-process pass cuts them (every B positions of the retain
set, in order) and grouped into contiguous *chunks* of whole batches. A Ray Dataset of
chunk descriptors (a few integers each) flows through ``map_batches`` into a pool of
actors (CPU or GPU): each actor builds the model and the data view once, from small
factories, reads and decodes the images of its chunks itself (with the source's loader
workers), and emits Σ_b G(b) over the chunk. So no image crosses the object store: only
descriptors go in and one set of sums per chunk comes out, which the driver adds in chunk
order. Since every batch is formed exactly as locally, the result equals
``compute_importances`` up to float summation order.

With a streamed source (sharded Parquet, image folders) the view factory only indexes the
files, so an actor on any node reads just the files under its chunks.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Callable

import numpy as np
import torch

from potion.errors import PotionError

SUM_PREFIX = "sum:"  # column names of the per-parameter sums
ACTOR_START_S = 300  # how long the pool may take to start (model and index built in every actor)


class ChunkSums:
    """A Ray Data actor: Σ_b G(b) over each chunk of batches it is handed."""

    def __init__(self, model_factory, view_factory, positions: np.ndarray, estimator, p, batch_size: int,
                 device: str, augment: bool, seed: int):
        import ray

        from potion.distributed.runtime import worker_device

        self.device = worker_device(device)
        self.error: PotionError | None = None
        try:
            self.model = model_factory()
            self.view = view_factory().subset(positions)
        except PotionError as e:
            # reported by __call__ instead: Ray keeps only the text of an error in an actor's creation
            self.error = e
        self.estimator, self.p, self.batch_size = estimator, p, batch_size
        self.augment, self.seed = augment, seed
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, rows: dict) -> dict:
        from potion.unlearning.importances import importance_sums

        out: dict[str, list] = {"chunk": [], "k": [], "node": [], "error": []}
        for chunk, first, last in zip(rows["chunk"], rows["first"], rows["last"]):
            try:
                if self.error is not None:
                    raise self.error
                # batches first..last-1 of the view, each formed as the single-process pass forms it
                part = self.view.subset(np.arange(first * self.batch_size,
                                                  min(last * self.batch_size, len(self.view))))
                batches = part.batches(self.batch_size, augment=self.augment, seed=self.seed, device=self.device)
                sums, k = importance_sums(self.model, batches, self.estimator, p=self.p, device=self.device)
            except PotionError as e:
                # a row, not an exception: Ray Data passes on only the text of a UDF's exception
                return {"chunk": np.array([int(chunk)]), "k": np.array([0]), "node": np.array([self.node]),
                        "error": np.array([str(e)])}
            out["error"].append("")
            out["chunk"].append(int(chunk))
            out["k"].append(int(k))
            out["node"].append(self.node)
            for name, s in sums.items():
                out.setdefault(SUM_PREFIX + name, []).append(s.numpy())
        return {key: np.stack(v) if key.startswith(SUM_PREFIX) else np.array(v) for key, v in out.items()}


def data_importance_sums(
    model_factory: Callable[[], torch.nn.Module],
    view_factory: Callable[[], object],
    positions: np.ndarray,
    estimator,
    p: float | None,
    batch_size: int,
    num_actors: int | None = None,
    device: str = "auto",
    *,
    chunks_per_actor: int = 4,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    augment: bool = False,
    seed: int = 0,
    progress: bool = False,
    placement: dict | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ_b G(b) over the batches cut every ``batch_size`` from ``view_factory().subset(positions)``,
    and their number K, computed by a Ray Data actor pool of ``num_actors`` (default: one per
    GPU, else one per CPU of the cluster). ``device`` and ``num_gpus`` as in
    :func:`potion.distributed.importances.sharded_importance_sums`; ``placement`` receives
    how many chunks each node ran."""
    import ray

    from potion.distributed.importances import combine_sums, plan_pass, shard_bounds

    positions, n_batches, num_gpus, num_actors = plan_pass(positions, batch_size, device, num_gpus, num_cpus,
                                                           num_actors)
    bounds = shard_bounds(n_batches, num_actors * chunks_per_actor)
    num_actors = min(num_actors, len(bounds))
    items = [{"chunk": i, "first": a, "last": b} for i, (a, b) in enumerate(bounds)]
    # Ray Data's usage collection starts a driver thread that polls the cluster every 10 s for
    # the life of the process; a poll that overlaps ray.shutdown() ends the process with exit
    # status 1 ("core worker has already been shutdown"; Ray 2.60, half the runs of the test).
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and progress lines
    # the whole pool up before the first chunk: otherwise the first actor takes every short chunk
    context.wait_for_min_actors_s = ACTOR_START_S
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ChunkSums, batch_size=1, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_args=(model_factory, view_factory, positions, estimator, p, batch_size,
                             "auto" if device != "cpu" else "cpu", augment, seed),
    )
    rows = []
    stream = iter(ds.iter_rows())
    try:
        for row in stream:
            if row["error"]:
                raise PotionError(str(row["error"]))
            rows.append(row)
    except ray.exceptions.GetTimeoutError:
        raise PotionError(f"the Ray cluster could not start {num_actors} importance actors of {num_cpus:g} CPU and "
                          f"{num_gpus:g} GPU each within {ACTOR_START_S} s; ask for fewer (--importance-shards) "
                          "or add nodes") from None
    finally:
        # Left open (an error row), its fetch threads go on calling Ray, and a call that
        # overlaps ray.shutdown() ends the process: close it and, with it, the generators
        # inside it that stop those threads (they are closed only when collected).
        stream.close()
        del stream
        gc.collect()
        for t in threading.enumerate():
            if t.name == "iter_threaded":  # Ray Data's fetch workers: each ends after its current block
                t.join(timeout=10)
    rows.sort(key=lambda r: int(r["chunk"]))  # chunk order: the same sum every time
    names = [key[len(SUM_PREFIX):] for key in rows[0] if key.startswith(SUM_PREFIX)]
    parts = [({n: r[SUM_PREFIX + n] for n in names}, int(r["k"])) for r in rows]
    if placement is not None:
        nodes: dict[str, int] = {}
        for r in rows:
            nodes[str(r["node"])] = nodes.get(str(r["node"]), 0) + 1
        placement["importance_chunks"] = nodes
    return combine_sums(parts, n_batches, mean=False), n_batches

