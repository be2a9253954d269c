"""``potion train``: poison a dataset, train a model on it, write a run folder."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from potion.config import dump_yaml, to_dict
from potion.datasets import (
    clean_test_view,
    load_dataset,
    make_manifest,
    make_trigger,
    resolve_count,
    save_manifest,
    train_view,
    triggered_test_view,
)
from potion.errors import PotionError
from potion.io import atomic_write_json, atomic_write_text, refuse_overlap, staged_output_dir
from potion.jobs.train_tracking import check_train_tracking, log_train_run
from potion.metrics import attack_metrics
from potion.models import create_model, load_init_weights, save_checkpoint
from potion.runs.configs import TrainJob
from potion.runs.destination import local_output, resolve_out
from potion.runs.folder import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, MODEL_FILE, resolve_device
from potion.training import train_model


def model_kwargs(job: TrainJob, splits) -> dict:
    c, h, _ = splits.train.image_shape
    return {"num_classes": len(splits.train.classes), "in_channels": c, "image_size": h, **job.model.args}


def run_train(job: TrainJob, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Train a poisoned model; returns the metrics written to ``metrics.json``. ``out`` may be
    a remote URI (``s3://…``): the run folder is then built locally and copied up at the end."""
    dest = resolve_out(out)
    if dest.remote:
        from potion.tracking.store import refuse_default_store_for_remote

        refuse_default_store_for_remote(str(dest), job.tracking_uri)
    with local_output(dest, overwrite) as local:
        return _train_at(job, local, overwrite, progress)


def _train_at(job: TrainJob, out: Path, overwrite: bool, progress: bool) -> dict:
    from potion.runs.checks import check_train_job

    check_train_job(job)
    # --overwrite replaces --out as a whole: it must not hold (or be held by) an input
    if job.data.args.get("root"):
        refuse_overlap(out, job.data.args["root"], "the data root")
    if job.model.init:
        refuse_overlap(out, job.model.init, "the initial weights")
    check_train_tracking(job, out)
    device = resolve_device(job.device)
    splits = load_dataset(job.data.dataset, **job.data.args)
    n_classes = len(splits.train.classes)
    if not 0 <= job.poison.target < n_classes:
        raise PotionError(f"poison.target={job.poison.target} is not a class of '{splits.name}' (0..{n_classes - 1})")
    trigger = make_trigger(job.poison.trigger, **job.poison.params)
    n_poison = resolve_count(job.poison.share, job.poison.count, len(splits.train), "poison")
    manifest = make_manifest(splits.train.labels, n_poison, job.poison.target, trigger, job.poison.seed)

    kwargs = model_kwargs(job, splits)
    torch.manual_seed(job.recipe.seed)  # the initial weights are part of the run's seed
    model = create_model(job.model.name, **kwargs)
    if job.model.init:
        skipped = load_init_weights(model, job.model.init)
        if skipped and progress:
            print(f"initial weights {job.model.init}: kept the fresh {', '.join(skipped[:4])}"
                  f"{' …' if len(skipped) > 4 else ''} (shapes differ)")
    with staged_output_dir(out, overwrite) as stage:
        t0 = time.perf_counter()
        model = train_model(model, train_view(splits, manifest, trigger), job.recipe, device=device, progress=progress)
        train_s = time.perf_counter() - t0
        metrics = attack_metrics(
            model, clean_test_view(splits), triggered_test_view(splits, trigger, seed=job.poison.seed),
            job.poison.target, batch_size=job.eval_batch_size, device=device,
        )
        metrics.update(train_seconds=round(train_s, 2), n_poison=int(n_poison), n_train=len(splits.train))
        save_checkpoint(
            stage / MODEL_FILE, model.cpu(), job.model.name, kwargs,
            extra={"dataset": to_dict(job.data), "classes": list(splits.train.classes)},
        )
        save_manifest(manifest, stage / MANIFEST_FILE)
        atomic_write_text(stage / CONFIG_FILE, dump_yaml(job))
        atomic_write_json(stage / METRICS_FILE, metrics)
        example = next(iter(clean_test_view(splits).batches(2)))[0]
        tracked = log_train_run(job, stage, Path(out).absolute(), model, example, metrics, len(splits.train))
    if tracked and progress:
        print(f"MLflow run {tracked['run_id']} in {tracked['tracking_uri']}")
    return metrics
