"""``potion heal``: a trained model + a deletion set → a healed checkpoint and a report.

Thin glue: the inputs come from a loader (``potion.heal.inputs``: a run folder or the owner's
own model, weights and data); the method lives in ``potion.unlearning``. A heal is a few named
stages that read top to bottom in ``_heal``: select the sets, measure θ0, build the method's
context (importances, and the Ray search for ``--backend ray``), heal, measure, write.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from potion.errors import PotionError
from potion.heal.importances import default_cache_dir, make_importance_fn
from potion.heal.inputs import HealInputs, OwnerSource, RunSource, measure
from potion.heal.outputs import DELETION_FILE, REPORT_FILE, build_report, write_outputs, write_refusal
from potion.heal.report import before_after_metrics, run_description
from potion.heal.sets import (GUARDED, check_deletion_is_poison, draw_proxy, draw_repair, expansion_score,
                              proxy_record, proxy_size, select_deletion_set, suspects)
from potion.heal.tracked import log_heal_inputs, open_tracker
from potion.io import make_dirs, refuse_overlap, staged_output_dir
from potion.metrics import accuracy, eval_batch_size
from potion.runs.configs import HealJob
from potion.runs.destination import local_output, resolve_out
from potion.runs.folder import MODEL_FILE, resolve_device
from potion.tracking.store import configured_tracking_uri, refuse_default_store_for_remote, resolve_tracking_uri
from potion.unlearning.batch_size import label_runs, resolve_batch_size, sorted_batches_note
from potion.unlearning.cache import ImportanceCache
from potion.unlearning.guard import GuardNoSafeStep
from potion.unlearning.methods import METHODS, HealContext, HealResult, heal
from potion.unlearning.ptn import NothingToHeal, PTNNoCrossing
from potion.unlearning.sampling import RetainSample, parse_retain_sample


def run_heal(source: str | Path | RunSource | OwnerSource, job: HealJob, out: str | Path, *,
             share: float | None = None, count: int | None = None, identified: str | Path | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Heal from a run folder (a path or :class:`RunSource`) or the owner's pieces (:class:`OwnerSource`).

    Everything (model, report, deletion set, MLflow store, Ray results) is built in a
    staging folder beside ``out`` and swapped in only when the heal succeeds. ``out`` may be
    a remote URI (``s3://…``): the folder is then built locally and copied up at the end."""
    dest = resolve_out(out)
    if dest.remote:
        refuse_default_store_for_remote(str(dest), job.tracking_uri)
    with local_output(dest, overwrite) as local:
        return _run_heal_at(source, job, local, share=share, count=count, identified=identified,
                            overwrite=overwrite, progress=progress)


def _run_heal_at(source, job: HealJob, out: Path, *, share, count, identified, overwrite: bool,
                 progress: bool) -> dict:
    from potion.runs.checks import check_heal_job

    source = source if isinstance(source, (RunSource, OwnerSource)) else RunSource(source)
    METHODS.get(job.method)  # unknown method: fail before loading anything
    parse_retain_sample(job.retain_sample)  # and a bad --retain-sample
    check_heal_job(job, share, count)
    out = Path(out)
    if isinstance(source, RunSource):
        refuse_overlap(out, source.run_dir, "the run folder")
    if identified is not None and Path(identified).is_file():
        refuse_overlap(out, identified, "the identified-samples file")
    if job.cache_dir != "none":
        ImportanceCache(Path(job.cache_dir or default_cache_dir())).secret  # a bad secret fails here, not later
        make_dirs(job.cache_dir or default_cache_dir(), "the importance cache folder", "--cache-dir")
    final_uri = resolve_tracking_uri(job.tracking_uri, out)
    if final_uri and configured_tracking_uri(job.tracking_uri):
        from potion.tracking.store import check_tracking

        check_tracking(final_uri)  # a user's store: check it before anything is created
    refused = None
    with staged_output_dir(out, overwrite) as stage:
        try:
            report = _connect_and_heal(source, job, stage, share, count, identified, progress,
                                       final_out=out.resolve(), final_uri=final_uri)
        except GuardNoSafeStep as e:
            # The refusal (report.json with the curve, the MLflow store, no model) is kept in a
            # new or empty --out; an earlier heal's results there are left as they were.
            if out.exists() and any(out.iterdir()):
                raise
            refused = e
        if resolve_tracking_uri(job.tracking_uri, stage) != final_uri:  # the default store lives in the stage
            from potion.tracking.store import relocate_sqlite_store

            relocate_sqlite_store(stage / "mlflow.db", stage.resolve(), out.resolve())
    if refused is not None:
        raise refused
    return report


def _connect_and_heal(source, job: HealJob, out: Path, share, count, identified, progress, *,
                      final_out: Path, final_uri: str | None) -> dict:
    tracking_uri = resolve_tracking_uri(job.tracking_uri, out)
    py_modules = source.py_modules()  # parses --model: a bad spec fails before Ray starts
    if tracking_uri:
        from potion.tracking.store import check_tracking

        check_tracking(tracking_uri)
    if job.backend == "ray":
        from potion.distributed.runtime import connect

        if progress:  # Ray takes seconds to start or join, and says nothing meanwhile
            where = job.address or os.environ.get("RAY_ADDRESS")
            print(f"potion: connecting to the Ray cluster at {where} ..." if where else
                  "potion: starting a local Ray cluster (takes a few seconds) ...", file=sys.stderr, flush=True)
        # fail fast on an unreachable cluster; a watchdog reports and cleans up if Ray ends this process
        connect(job.address, job.num_cpus, py_modules=py_modules, watch=("this heal", final_out))
    try:
        return _heal(source.load(), job, out, share, count, identified, progress, tracking_uri,
                     final_out=final_out, final_uri=final_uri)
    finally:
        if job.backend == "ray":
            from potion.distributed.runtime import shutdown_if_owned

            shutdown_if_owned()


@dataclass
class HealSets:
    """Sf, Dr and the proxy, with the views and batches the stages read them through."""
    job: HealJob  # with the importance batch size B that is used
    deletion: np.ndarray
    source: str
    retain: np.ndarray
    forget_view: object
    retain_view: object
    forget_batches: list
    val_batches: list | None
    proxy: np.ndarray | None
    proxy_batches: list | None
    retain_sample: RetainSample
    eval_bs: int
    extra: dict  # report entries about the sets: B and why, Dr's label runs, the proxy
    suspects: np.ndarray | None = None  # potion_plus: target-labelled retain images it may grow Sf with
    suspect_batches: list | None = None
    repair_batches: Callable[[], Iterable] | None = None  # potion_plus: clean retain images, a pass per call


def _heal(inputs: HealInputs, job: HealJob, out: Path, share, count, identified, progress,
          tracking_uri, *, final_out: Path | None = None, final_uri: str | None = None) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(job.device)
    sets = select_sets(inputs, job, share, count, identified, device)
    job = sets.job
    before, before_source = measure_before(inputs, job, sets, device)
    state0 = {k: v.detach().clone() for k, v in inputs.model.state_dict().items()}
    placement: dict = {}
    ctx = heal_context(inputs, job, sets, state0, device, progress, placement)
    with open_tracker(tracking_uri, job, inputs, final_out or out) as tracker:
        if job.backend == "ray":
            ctx.search = _ray_search(job, inputs, out, progress, placement)
        result = _run_method(job, ctx, sets, state0, tracker, out, final_out or out)
        if "plus" in result.info:
            expansion_score(result.info["plus"], sets.suspects, inputs.poisoned_mask)
        healed = inputs.spec.build()
        healed.load_state_dict(result.state_dict)
        healed.eval()
        if _unchanged(result.state_dict, state0):
            after = dict(before)  # the same weights on the same data: θ0's metrics (e.g. --method none)
        else:
            after = _measured(healed, inputs, sets.forget_view, sets.eval_bs, device, job.fast_eval)
        report = build_report(job, inputs, sets.deletion, sets.source, before, after, result,
                              time.perf_counter() - t_start)
        report["before_source"] = before_source
        report.update(sets.extra)
        if placement:
            report["placement"] = placement  # which Ray node ran which shard and which step k
        _write(out, healed, inputs, job, sets, report, result, tracker, final_uri or tracking_uri)
    return report


def select_sets(inputs: HealInputs, job: HealJob, share, count, identified, device: str) -> HealSets:
    deletion, source = select_deletion_set(inputs, share, count, identified, job.seed)
    check_deletion_is_poison(inputs, deletion, source)
    retain = np.setdiff1d(np.arange(inputs.n_train), deletion)
    bs, bs_auto = resolve_batch_size(job.importance_batch_size, len(retain))
    job = dataclasses.replace(job, importance_batch_size=bs)  # the cache key and Ray shards see the B used
    view = inputs.train
    forget_view, retain_view = view.subset(deletion), view.subset(retain)
    eval_bs = job.eval_batch_size or eval_batch_size(device)
    retain_sample = parse_retain_sample(job.retain_sample,
                                        job.seed if job.retain_sample_seed is None else job.retain_sample_seed)
    forget_batches = list(forget_view.batches(bs, augment=job.importance_augment, device=device))

    val_batches = None
    if job.val_size:
        clean = inputs.clean_test
        rng = np.random.default_rng(job.seed)
        pos = np.sort(rng.choice(len(clean), size=min(job.val_size, len(clean)), replace=False))
        val_batches = list(clean.subset(pos).batches(eval_bs, device=device))

    proxy = proxy_batches = None
    if job.method in GUARDED:
        proxy = draw_proxy(retain, proxy_size(job.method, job.plus, job.proxy_size, len(retain)), job.seed)
        proxy_batches = list(view.subset(proxy).batches(eval_bs, device=device))

    runs = label_runs(view.labels[retain])
    extra = {"importance_batch_size": {"value": bs, "auto": bs_auto, "n_retain": int(len(retain)),
                                       "label_runs": runs}}
    note = sorted_batches_note(runs, len(retain), bs) if retain_sample.is_full else None
    if note is not None:
        extra["importance_batch_size"]["note"] = note
        print(f"potion: note: {note}", file=sys.stderr)
    if proxy is not None:
        extra["proxy"] = proxy_record(proxy, job.seed, len(retain))
    sets = HealSets(job, deletion, source, retain, forget_view, retain_view, forget_batches, val_batches,
                    proxy, proxy_batches, retain_sample, eval_bs, extra)
    if job.method == "potion_plus":
        plus = job.plus
        if plus.expand or plus.clean_steps:
            sets.suspects = suspects(retain, view.labels, deletion)
            sets.suspect_batches = list(view.subset(sets.suspects).batches(eval_bs, device=device))
        if plus.clean_steps:
            repair = np.searchsorted(retain, draw_repair(retain, proxy, plus.repair_size, job.seed))
            repair_view = retain_view.subset(repair)
            # decoded batch by batch at each pass, never held whole (potion.unlearning.plus)
            sets.repair_batches = lambda: repair_view.batches(plus.repair_batch_size, shuffle=True, seed=job.seed,
                                                              device=device)
    return sets


def measure_before(inputs: HealInputs, job: HealJob, sets: HealSets, device: str) -> tuple[dict, str]:
    """θ0's metrics: as training recorded them (only the deletion set is new), or measured."""
    recorded = None if job.remeasure else inputs.recorded_metrics
    if recorded is not None:
        acc = accuracy(inputs.model, sets.forget_view, sets.eval_bs, device, job.fast_eval)
        return {**recorded, "deletion_acc": acc}, "metrics.json"
    return _measured(inputs.model, inputs, sets.forget_view, sets.eval_bs, device, job.fast_eval), "measured"


def heal_context(inputs: HealInputs, job: HealJob, sets: HealSets, state0: dict, device: str, progress: bool,
                 placement: dict) -> HealContext:
    """What the method sees: θ0, the batches of Sf and Dr, the importance pass and the knobs."""
    bs, retain_view, retain = job.importance_batch_size, sets.retain_view, sets.retain
    if job.method == "potion_plus" and job.plus.shuffle_retain:
        # Dr in a seeded random order for the retain pass: stored sorted by class (CIFAR-10-jpeg),
        # its importance batches are single-class (benchmarks/results/heal_more.md)
        order = np.random.default_rng([int(job.seed), 0x5F1]).permutation(len(retain))
        retain, retain_view = retain[order], retain_view.subset(order)
    return HealContext(
        model=inputs.model,
        state0=state0,
        retain_batches=lambda: retain_view.batches(bs, augment=job.importance_augment, device=device),
        forget_batches=sets.forget_batches,
        retain_total=-(-len(retain) // bs),
        n_forget=len(sets.deletion),
        n_total=inputs.n_train,
        ptn=job.ptn,
        device=device,
        progress=progress,
        importances=make_importance_fn(inputs, job, state0, sets.deletion, retain, device, progress, retain_view,
                                       placement),
        retain_sample=sets.retain_sample,
        retain_batches_at=lambda pos: retain_view.subset(pos).batches(bs, augment=job.importance_augment,
                                                                      device=device),
        n_retain=len(retain),
        retain_batch_size=bs,
        fast_eval=job.fast_eval,
        val_batches=sets.val_batches,
        retrain=(functools.partial(inputs.retrain, retain_view, device, progress)
                 if inputs.retrain is not None else None),
        grid_score=_grid_scorer(inputs, job.seed, sets.eval_bs, device) if job.method == "ssd_grid" else None,
        ssd_alpha=job.ssd_alpha,
        ssd_lambda=job.ssd_lambda,
        proxy_batches=sets.proxy_batches,
        guard=job.guard,
        allow_damage=job.allow_damage,
        task_vector=job.task_vector,
        finetune=job.finetune,
        plus=job.plus,
        suspect_batches=sets.suspect_batches,
        repair_batches=sets.repair_batches,
    )


def _ray_search(job: HealJob, inputs: HealInputs, out: Path, progress: bool, placement: dict):
    from potion.distributed.search import make_ray_search

    # No MLflow callback: _write logs the children from the driver once the search is done,
    # in k order and with the guard's probes, as on the local backend.
    return make_ray_search(model_factory=inputs.spec.build, gpus_per_trial=job.gpus_per_trial,
                           storage_path=str(out.resolve() / "ray_results"), progress=progress, placement=placement)


def _run_method(job: HealJob, ctx: HealContext, sets: HealSets, state0: dict, tracker, out: Path,
                final_out: Path) -> HealResult:
    """The method's result; a search that found no step either ends the heal (the default)
    or keeps θ0 (``on_no_crossing=keep``), with the reason in the report."""
    try:
        return heal(job.method, ctx)
    except (PTNNoCrossing, NothingToHeal) as e:
        trace = [t.to_dict() for t in getattr(e, "trace", [])]
        guard_info = e.info if isinstance(e, GuardNoSafeStep) else None
        if job.on_no_crossing != "keep":
            if guard_info is not None:
                write_refusal(e, guard_info, trace, sets.extra, job, out, tracker, final_out)
            raise
        reason = ("guard_no_safe_step" if guard_info is not None
                  else "no_crossing" if isinstance(e, PTNNoCrossing) else "nothing_to_heal")
        info = {reason: True, "message": str(e), "trace": trace}
        if guard_info is not None:
            info["guard"] = guard_info
        return HealResult(job.method, state0, info, {})


def _write(out: Path, healed, inputs: HealInputs, job: HealJob, sets: HealSets, report: dict, result: HealResult,
           tracker, uri: str | None) -> None:
    """The outputs in ``out`` and, with tracking, the curve, the model and the files in MLflow."""
    if tracker:
        trace = result.info.get("trace") or []
        k_star, guard = result.info.get("k_star"), result.info.get("guard")
        tracker.log_children(trace, k_star=k_star, guard=guard)
        report["mlflow"] = {"tracking_uri": uri, "parent_run_id": tracker.parent_run_id,
                            "experiment": job.experiment, "experiment_id": tracker.experiment_id}
    write_outputs(out, healed, inputs, sets.deletion, report)
    if tracker:
        model_id = tracker.log_pytorch_model(healed, sets.forget_batches[0][0], registered_name=job.register_model)
        # the run page lists metrics in the order they were first logged: the headline first
        tracker.log_metrics(before_after_metrics(report), model_id=model_id)
        tracker.log_curve(trace, threshold=result.info.get("threshold"), k_star=k_star, guard=guard)
        neggrad = (result.info.get("plus") or {}).get("neggrad")
        if neggrad:
            tracker.log_updates(neggrad, job.guard.max_damage)
        sample = report.get("retain_sample") or {}
        tracker.log_metrics({f"retain_sample_{k}": sample[k] for k in ("n_used", "share_used", "batches")
                             if isinstance(sample.get(k), (int, float))})
        tracker.log_model(out / MODEL_FILE)
        tracker.log_files([out / REPORT_FILE, out / DELETION_FILE, *inputs.extra_files])
        tracker.set_description(run_description(report))
        log_heal_inputs(tracker, inputs, sets.deletion)


def _measured(model, inputs: HealInputs, forget_view, bs: int, device: str, fast: bool = False) -> dict:
    """SPEC §4 metrics plus accuracy on the deletion set (with the labels it was trained with)."""
    return {**measure(model, inputs, bs, device, fast), "deletion_acc": accuracy(model, forget_view, bs, device, fast)}


def _unchanged(state: dict, state0: dict) -> bool:
    return state.keys() == state0.keys() and all(torch.equal(state[k].cpu(), state0[k].cpu()) for k in state0)


def _grid_scorer(inputs: HealInputs, seed: int, bs: int, device: str):
    """ssd_grid's score (SPEC §9): it reads ground truth (triggered test images), so it is
    for benchmarks only. It scores on a seeded 20 % validation slice of the test set."""
    clean, triggered = inputs.clean_test, inputs.triggered_test
    if triggered is None:
        raise PotionError("method 'ssd_grid' scores on triggered test images; give --triggered-test and --target")
    rng = np.random.default_rng(seed + 1)
    pos = np.sort(rng.choice(len(clean), size=max(1, len(clean) // 5), replace=False))
    tpos = np.sort(rng.choice(len(triggered), size=max(1, len(triggered) // 5), replace=False)) \
        if len(triggered) != len(clean) else pos
    vc, vt = clean.subset(pos), triggered.subset(tpos)
    ra0 = accuracy(inputs.model, vt, batch_size=bs, device=device)
    cl0 = accuracy(inputs.model, vc, batch_size=bs, device=device)

    def score(state_dict) -> float:
        model = inputs.spec.build()
        model.load_state_dict(state_dict)
        model.eval()
        ra = accuracy(model, vt, batch_size=bs, device=device)
        cl = accuracy(model, vc, batch_size=bs, device=device)
        return 0.5 * (ra - ra0) + 0.5 * (cl - cl0)

    return score
