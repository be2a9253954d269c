"""``potion heal``: a trained run + a deletion set → a healed checkpoint and a report.

Thin glue: the method lives in ``potion.unlearning``; this module picks the data, plugs in
the importance cache and (for ``--backend ray``) the sharded pass and the Ray Tune search,
logs to MLflow and writes the outputs.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from potion.config import to_dict
from potion.datasets import draw_deletion_set
from potion.errors import PotionError
from potion.io import atomic_write, atomic_write_json, check_output_dir, refuse_inside
from potion.metrics import accuracy, attack_metrics, model_damage, poison_healed
from potion.models import create_model, load_checkpoint, save_checkpoint
from potion.pipeline.configs import HealJob
from potion.pipeline.runs import MODEL_FILE, RunFolder, load_run, resolve_device
from potion.training import train_model
from potion.unlearning.cache import ImportanceCache, hash_arrays
from potion.unlearning.methods import METHODS, HealContext, HealResult, heal
from potion.unlearning.ptn import NothingToHeal, PTNNoCrossing

REPORT_FILE = "report.json"
DELETION_FILE = "deletion_set.parquet"


def default_cache_dir() -> Path:
    return Path(os.environ.get("POTION_CACHE", Path.home() / ".cache" / "potion")) / "importances"


# ---------------------------------------------------------------- deletion set
def read_identified(path: str | Path, n_total: int) -> np.ndarray:
    """Indices of D the owner identified as poison, from CSV (one index per row, optional
    ``index`` header) or Parquet (an ``index`` column)."""
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"identified-samples file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
            if "index" not in table.column_names:
                raise PotionError(f"{path} has no 'index' column (columns: {', '.join(table.column_names)})")
            values = table.column("index").to_numpy()
        else:
            rows = [r.strip().split(",")[0] for r in path.read_text().splitlines() if r.strip()]
            if rows and not rows[0].lstrip("-").isdigit():
                rows = rows[1:]  # header
            values = np.array([int(r) for r in rows], dtype=np.int64)
    except (ValueError, pa.ArrowInvalid) as e:
        raise PotionError(
            f"cannot read identified samples from {path}: {e}; expected a CSV with one integer index per line "
            "(optional header 'index') or a Parquet file with an integer 'index' column"
        ) from None
    return validate_indices(values, n_total, str(path))


def validate_indices(values: np.ndarray, n_total: int, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        raise PotionError(f"the deletion set from {where} is empty; identify at least one poisoned sample")
    bad = values[(values < 0) | (values >= n_total)]
    if bad.size:
        raise PotionError(
            f"the deletion set from {where} has indices outside the training set 0..{n_total - 1}: "
            f"{', '.join(map(str, bad[:5]))}"
        )
    return np.unique(values)


def select_deletion_set(run: RunFolder, share, count, identified, seed) -> tuple[np.ndarray, str]:
    given = [x is not None for x in (share, count, identified)]
    if sum(given) != 1:
        raise PotionError("give exactly one of --discovery-share, --discovery-count or --identified")
    n_total = run.manifest.table.num_rows
    if identified is not None:
        return read_identified(identified, n_total), f"file {identified}"
    idx = draw_deletion_set(run.manifest, share=share, count=count, seed=seed)
    what = f"share {share}" if share is not None else f"count {count}"
    return validate_indices(idx, n_total, f"manifest draw ({what})"), f"manifest draw ({what}, seed {seed})"


# ---------------------------------------------------------------- importances
def _train_view_of(run_dir: str):
    """Rebuild D's evaluation view on a Ray worker from the run folder alone."""
    return load_run(run_dir).train_view()


def _model_of(run_dir: str):
    return load_checkpoint(Path(run_dir) / MODEL_FILE)[0]


def make_importance_fn(run: RunFolder, job: HealJob, state0: dict, deletion: np.ndarray, retain: np.ndarray,
                       device: str, progress: bool):
    """The importance pass that ``HealContext`` calls, with the on-disk cache in front and,
    for the Ray backend, the retain-set pass sharded over workers."""
    cache = None if job.cache_dir == "none" else ImportanceCache(Path(job.cache_dir or default_cache_dir()))
    m = run.manifest
    data_hash = hash_arrays(
        np.frombuffer(repr(to_dict(run.job.data)).encode(), dtype=np.uint8),
        m.train_labels, m.poisoned_mask, m.corners, deletion,
    )

    def compute(estimator, p, batches_fn, which):
        from potion.unlearning.importances import compute_importances

        key = None
        if cache is not None:
            extra = f"{which}|augment={job.importance_augment}"
            key = cache.key(state0, data_hash, estimator, p, job.importance_batch_size, extra=extra)
            hit = cache.get(key)
            if hit is not None:
                return hit
        if job.backend == "ray" and which == "retain":
            from potion.pipeline.ray_importances import sharded_importances

            imp = sharded_importances(
                functools.partial(_model_of, str(run.path)), functools.partial(_train_view_of, str(run.path)),
                retain, estimator, p, job.importance_batch_size, job.importance_shards or None,
                # the job's own device: "auto" lets shards ask for GPUs that a CPU head lacks
                device=job.device, augment=job.importance_augment,
            )
        else:
            imp = compute_importances(run.model, batches_fn(), estimator, p=p, device=device, progress=progress)
        if cache is not None:
            cache.put(key, imp)
        return imp

    return compute


# ---------------------------------------------------------------- heal
def run_heal(run_dir: str | Path, job: HealJob, out: str | Path, *, share: float | None = None,
             count: int | None = None, identified: str | Path | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    METHODS.get(job.method)  # unknown method: fail before loading anything
    out = Path(out)
    refuse_inside(out, run_dir, "the run folder")
    check_output_dir(out, overwrite)
    tracking_uri = resolve_tracking_uri(job, out)
    if job.backend == "ray":
        from potion.pipeline.ray_runtime import connect

        connect(job.address, job.num_cpus)  # fail fast on an unreachable cluster
    if tracking_uri:
        from potion.pipeline.tracking import check_tracking

        check_tracking(tracking_uri)

    try:
        return _heal(run_dir, job, out, share, count, identified, overwrite, progress, tracking_uri)
    finally:
        if job.backend == "ray":
            from potion.pipeline.ray_runtime import shutdown_if_owned

            shutdown_if_owned()


def _heal(run_dir, job: HealJob, out: Path, share, count, identified, overwrite, progress, tracking_uri) -> dict:
    t_start = time.perf_counter()
    run = load_run(run_dir)
    device = resolve_device(job.device)
    deletion, source = select_deletion_set(run, share, count, identified, job.seed)
    n_total = run.manifest.table.num_rows
    retain = np.setdiff1d(np.arange(n_total), deletion)
    view = run.train_view()
    forget_view, retain_view = view.subset(deletion), view.subset(retain)
    bs = job.importance_batch_size
    eval_bs = max(bs, 512)  # accuracy does not depend on the batch size; speed does
    forget_batches = list(forget_view.batches(bs, augment=job.importance_augment, device=device))

    clean, triggered = run.test_views(seed=run.job.poison.seed)
    val_batches = None
    if job.val_size:
        rng = np.random.default_rng(job.seed)
        pos = np.sort(rng.choice(len(clean), size=min(job.val_size, len(clean)), replace=False))
        val_batches = list(clean.subset(pos).batches(eval_bs, device=device))

    target = run.manifest.target
    before = attack_metrics(run.model, clean, triggered, target, batch_size=eval_bs, device=device)

    state0 = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    ctx = HealContext(
        model=run.model,
        state0=state0,
        retain_batches=lambda: retain_view.batches(bs, augment=job.importance_augment, device=device),
        forget_batches=forget_batches,
        retain_total=-(-len(retain) // bs),
        n_forget=len(deletion),
        n_total=n_total,
        ptn=job.ptn,
        device=device,
        progress=progress,
        importances=make_importance_fn(run, job, state0, deletion, retain, device, progress),
        val_batches=val_batches,
        retrain=functools.partial(_retrain, run, view.subset(retain), device, progress),
        grid_score=_grid_scorer(run, clean, triggered, job.seed, eval_bs, device) if job.method == "ssd_grid" else None,
        ssd_alpha=job.ssd_alpha,
        ssd_lambda=job.ssd_lambda,
    )

    tracker_cm = _tracker(tracking_uri, job, run, out)
    with tracker_cm as tracker:
        if job.backend == "ray":
            from potion.pipeline.ray_search import make_ray_search

            callbacks = [tracker.tune_callback()] if tracker else []
            ctx.search = make_ray_search(
                model_name=run.checkpoint.name, model_kwargs=run.checkpoint.kwargs,
                gpus_per_trial=job.gpus_per_trial, storage_path=str(out.resolve() / "ray_results"),
                callbacks=callbacks,
            )
        try:
            result = heal(job.method, ctx)
        except (PTNNoCrossing, NothingToHeal) as e:
            if job.on_no_crossing != "keep":
                raise
            reason = "no_crossing" if isinstance(e, PTNNoCrossing) else "nothing_to_heal"
            result = HealResult(job.method, state0, {reason: True, "message": str(e),
                                                     "trace": [t.to_dict() for t in getattr(e, "trace", [])]}, {})
        healed = create_model(run.checkpoint.name, **run.checkpoint.kwargs)
        healed.load_state_dict(result.state_dict)
        healed.eval()
        after = attack_metrics(healed, clean, triggered, target, batch_size=eval_bs, device=device)
        report = _report(job, run, deletion, source, before, after, result, time.perf_counter() - t_start)
        if tracker:
            trace = result.info.get("trace") or []
            if job.backend != "ray":
                tracker.log_children(trace)
            tracker.log_curve(trace, threshold=result.info.get("threshold"), k_star=result.info.get("k_star"))
            report["mlflow"] = {"tracking_uri": tracking_uri, "parent_run_id": tracker.parent_run_id,
                                "experiment": job.experiment}
        _write_outputs(out, healed, run, deletion, report, overwrite)
        if tracker:
            tracker.log_metrics({f"after_{k}": v for k, v in after.items() if isinstance(v, (int, float))})
            tracker.log_model(out / MODEL_FILE)
            tracker.log_files([out / REPORT_FILE, out / DELETION_FILE, run.path / "poison.parquet"])
    return report


def resolve_tracking_uri(job: HealJob, out: Path) -> str | None:
    uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri == "none":
        return None
    return uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"


class _NoTracker:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tracker(uri, job: HealJob, run: RunFolder, out: Path):
    if not uri:
        return _NoTracker()
    from potion.pipeline.tracking import SearchTracker

    params = {"run": str(run.path), "method": job.method, "backend": job.backend, **_flat("heal", to_dict(job))}
    # A local sqlite store keeps its artifacts beside the database file.
    artifact_root = Path(uri[len("sqlite:///"):]).parent / "mlruns" if uri.startswith("sqlite:///") else None
    return SearchTracker(uri, job.experiment, run_name=f"{job.method}:{out.name}", params=params,
                         artifact_root=artifact_root)


def _flat(prefix: str, d: dict) -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            flat.update(_flat(key, v))
        else:
            flat[key] = v
    return flat


def _retrain(run: RunFolder, retain_view, device: str, progress: bool):
    """EU: re-initialise and retrain on Dr with the recipe θ0 was trained with."""
    torch.manual_seed(run.job.recipe.seed)
    model = create_model(run.checkpoint.name, **run.checkpoint.kwargs)
    return train_model(model, retain_view, run.job.recipe, device=device, progress=progress).state_dict()


def _grid_scorer(run: RunFolder, clean, triggered, seed: int, bs: int, device: str):
    """ssd_grid's score (SPEC §9): it reads ground truth (triggered test images), so it is
    for benchmarks only. It scores on a seeded 20 % validation slice of the test set."""
    rng = np.random.default_rng(seed + 1)
    pos = np.sort(rng.choice(len(clean), size=max(1, len(clean) // 5), replace=False))
    vc, vt = clean.subset(pos), triggered.subset(pos)
    ra0 = accuracy(run.model, vt, batch_size=bs, device=device)
    cl0 = accuracy(run.model, vc, batch_size=bs, device=device)

    def score(state_dict) -> float:
        model = create_model(run.checkpoint.name, **run.checkpoint.kwargs)
        model.load_state_dict(state_dict)
        model.eval()
        ra = accuracy(model, vt, batch_size=bs, device=device)
        cl = accuracy(model, vc, batch_size=bs, device=device)
        return 0.5 * (ra - ra0) + 0.5 * (cl - cl0)

    return score


def _report(job, run, deletion, source, before, after, result, total_s) -> dict:
    gt = run.manifest.poisoned_mask
    info = dict(result.info)
    trace = [t.to_dict() if hasattr(t, "to_dict") else t for t in info.pop("trace", []) or []]
    return {
        "method": job.method,
        "backend": job.backend,
        "run": str(run.path),
        "deletion_set": {"size": int(len(deletion)), "source": source,
                         "true_poison_in_set": int(gt[deletion].sum()), "n_poison_total": int(gt.sum()),
                         "n_train": int(len(gt))},
        "rho": job.ptn.rho,
        "k_star": info.pop("k_star", None),
        "s": info.pop("s", None),
        "alpha": info.pop("alpha", None),
        "info": info,
        "trace": trace,
        "timings": {**result.timings, "wall_s": round(total_s, 3)},
        "before": before,
        "after": {**after,
                  "poison_healed": poison_healed(after["ra"], after["clean_acc"]),
                  "model_damage": model_damage(after["clean_acc"], before["clean_acc"])},
        "before_poison_healed": poison_healed(before["ra"], before["clean_acc"]),
        "config": to_dict(job),
    }


def _write_outputs(out: Path, healed, run: RunFolder, deletion, report, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"index": pa.array(deletion, pa.int64())})
    atomic_write(out / DELETION_FILE, lambda tmp: pq.write_table(table, tmp))
    save_checkpoint(out / MODEL_FILE, healed.cpu(), run.checkpoint.name, run.checkpoint.kwargs,
                    extra={**(run.checkpoint.extra or {}), "healed_from": str(run.path / MODEL_FILE),
                           "method": report["method"]}, overwrite=True)
    atomic_write_json(out / REPORT_FILE, report)
