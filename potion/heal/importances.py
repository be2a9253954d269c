"""The importance pass a heal calls: the on-disk cache in front, the retain pass sharded over
Ray for ``--backend ray``, and a sampled retain pass on either backend."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

from potion.heal.inputs import HealInputs, model_at
from potion.runs.configs import HealJob
from potion.unlearning.cache import ImportanceCache, hash_arrays
from potion.unlearning.methods import importance_label
from potion.unlearning.sampling import RetainSample, SampledImportances, sampled_pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("POTION_CACHE", Path.home() / ".cache" / "potion")) / "importances"


def make_importance_fn(inputs: HealInputs, job: HealJob, state0: dict, deletion: np.ndarray, retain: np.ndarray,
                       device: str, progress: bool, retain_view=None, placement: dict | None = None):
    """The importance pass that ``HealContext`` calls, with the on-disk cache in front and,
    for the Ray backend, the retain-set pass sharded over workers. A sampled retain pass
    (``sample=``) goes through ``potion.unlearning.sampling.sampled_pass`` on either backend."""
    cache = None if job.cache_dir == "none" else ImportanceCache(Path(job.cache_dir or default_cache_dir()))
    # The key covers the weights (state0), the model's code (spec + file sha256), the data
    # and transform (data_key) and the deletion set.
    data_hash = hash_arrays(
        np.frombuffer(json.dumps(_spec_identity(inputs.spec), sort_keys=True).encode(), dtype=np.uint8),
        np.frombuffer(inputs.data_key.encode(), dtype=np.uint8), deletion,
    )
    bs = job.importance_batch_size
    ray_pass = None
    if job.backend == "ray":
        # θ0 on the CPU once: a sampled pass calls the sharded pass at every checkpoint
        state_cpu = {k: v.detach().cpu() for k, v in state0.items()}
        ray_pass = functools.partial(_ray_sums, inputs, job, state_cpu, retain, progress, placement)

    def compute(estimator, p, batches_fn, which, sample: RetainSample | None = None, reference=None):
        from potion.unlearning.importances import compute_importances, importance_sums

        sampled = which == "retain" and sample is not None and not sample.is_full
        key = None
        if cache is not None:
            extra = f"{which}|augment={job.importance_augment}"
            if which == "retain" and np.any(np.diff(retain) < 0):  # Dr in another order: other batches
                extra += f"|order={hash_arrays(np.asarray(retain, dtype=np.int64))}"
            if sampled:  # a full entry keeps its old key; a sampled one can never collide with it
                extra += f"|sample={sample.label()}"
            key = cache.key(state0, data_hash, estimator, p, bs, extra=extra)
            hit = cache.get_entry(key)
            if hit is not None:
                if progress:
                    print(f"{importance_label(estimator, which)}: read from the cache in {cache.root}",
                          file=sys.stderr, flush=True)
                tensors, info = hit
                return SampledImportances(tensors, (info or {}).get("retain_sample")) if sampled else tensors
        record = None
        label = importance_label(estimator, which)
        if sampled:
            if ray_pass is not None:
                def sum_range(pos):
                    return ray_pass(pos, estimator, p, label)
            else:
                def sum_range(pos):
                    batches = retain_view.subset(pos).batches(bs, augment=job.importance_augment, device=device)
                    return importance_sums(inputs.model, batches, estimator, p=p, device=device)
            imp, record = sampled_pass(sum_range, len(retain), bs, sample, reference)
            imp = SampledImportances(imp, record)
        elif ray_pass is not None and which == "retain":
            sums, k = ray_pass(np.arange(len(retain)), estimator, p, label)
            imp = {n: s.div_(k) for n, s in sums.items()}
        else:
            n = len(deletion) if which == "forget" else len(retain)
            imp = compute_importances(inputs.model, batches_fn(), estimator, p=p, device=device, progress=progress,
                                      total=-(-n // job.importance_batch_size), desc=label)
        if cache is not None:
            cache.put(key, imp, info={"retain_sample": record} if record is not None else None)
        return imp

    return compute


def _ray_sums(inputs: HealInputs, job: HealJob, state_cpu: dict, retain: np.ndarray, progress: bool,
              placement: dict | None, positions: np.ndarray, estimator, p, desc: str):
    """Σ_b G(b) over the batches of ``retain[positions]``, sharded over Ray tasks; a streamed
    set (shards, image folders) goes through the Ray Data pass, whose actors read their own files."""
    from potion.distributed.importances import sharded_importance_sums

    if inputs.train.source.streamed:
        from potion.distributed.data_pass import data_importance_sums

        return data_importance_sums(
            functools.partial(model_at, inputs.spec, state_cpu), inputs.train_view_factory,
            retain[positions], estimator, p, job.importance_batch_size, job.importance_shards or None,
            device=job.device, augment=job.importance_augment, progress=progress, placement=placement,
        )
    return sharded_importance_sums(
        functools.partial(model_at, inputs.spec, state_cpu), inputs.train_view_factory,
        retain[positions], estimator, p, job.importance_batch_size, job.importance_shards or None,
        # the job's own device: "auto" lets shards ask for GPUs that a CPU head lacks
        device=job.device, augment=job.importance_augment, progress=progress, desc=desc, placement=placement,
    )


def _spec_identity(spec) -> dict:
    prov = spec.provenance()
    prov.pop("path", None)  # moving the file keeps its sha256, and the cache entry
    return prov
