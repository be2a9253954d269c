"""``potion heal``: a trained model + a deletion set → a healed checkpoint and a report.

Thin glue: the inputs come from a loader (``heal_inputs``: a run folder or the owner's own
model, weights and data); the method lives in ``potion.unlearning``; this module plugs in
the importance cache and (for ``--backend ray``) the sharded pass and the Ray Tune search,
logs to MLflow and writes the outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from potion.config import to_dict
from potion.datasets import draw_deletion_set
from potion.errors import PotionError
from potion.io import atomic_write, atomic_write_json, make_dirs, refuse_overlap, staged_output_dir
from potion.metrics import accuracy, eval_batch_size, model_damage, poison_healed
from potion.models import save_checkpoint
from potion.runs.configs import HealJob
from potion.heal.inputs import HealInputs, OwnerSource, RunSource, measure, model_at
from potion.heal.report import before_after_metrics
from potion.runs.folder import MODEL_FILE, resolve_device
from potion.unlearning.batch_size import label_runs, resolve_batch_size, sorted_batches_note
from potion.unlearning.cache import ImportanceCache, hash_arrays
from potion.unlearning.guard import GuardNoSafeStep
from potion.unlearning.methods import METHODS, HealContext, HealResult, heal, importance_label
from potion.unlearning.sampling import RetainSample, SampledImportances, parse_retain_sample, sampled_pass
from potion.unlearning.ptn import NothingToHeal, PTNNoCrossing

REPORT_FILE = "report.json"
DELETION_FILE = "deletion_set.parquet"


def default_cache_dir() -> Path:
    return Path(os.environ.get("POTION_CACHE", Path.home() / ".cache" / "potion")) / "importances"


# ---------------------------------------------------------------- deletion set
def read_identified(path: str | Path, n_total: int) -> np.ndarray:
    """Indices of D the owner identified as poison, from CSV (one index per line, optional
    ``index`` header; with a header, its ``index`` column) or Parquet (an integer
    ``index`` column). Anything else is refused with the line or value at fault: a
    silently truncated 3.7 or a dropped first row would heal the wrong samples."""
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"identified-samples file {path} does not exist or is not a file")
    expected = ("expected a CSV with one integer index per line (optional header 'index') "
                "or a Parquet file with an integer 'index' column")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            values = _identified_parquet(path, expected)
        else:
            values = _identified_csv(path, expected)
    except (ValueError, OSError, pa.ArrowException) as e:
        raise PotionError(f"cannot read identified samples from {path}: {e}; {expected}") from None
    return validate_indices(values, n_total, str(path))


def _identified_parquet(path: Path, expected: str) -> np.ndarray:
    table = pq.read_table(path)
    if "index" not in table.column_names:
        raise PotionError(f"{path} has no 'index' column (columns: {', '.join(table.column_names)}); {expected}")
    col = table.column("index")
    if col.null_count:
        raise PotionError(f"{path}: the 'index' column has {col.null_count} empty (null) values; {expected}")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise PotionError(f"{path}: the 'index' column holds {col.type}, not integers; {expected}")
    values = col.to_numpy()
    if pa.types.is_floating(col.type):
        frac = values[~np.isfinite(values) | (values != np.round(values))]
        if frac.size:
            raise PotionError(f"{path}: the 'index' column holds {frac[0]!r}, which is not a whole number; {expected}")
    return values.astype(np.int64)


def _identified_csv(path: Path, expected: str) -> np.ndarray:
    import csv

    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    if not lines:
        return np.zeros(0, dtype=np.int64)
    rows = [(n, [f.strip() for f in next(csv.reader([ln]))]) for n, ln in lines]
    col = 0
    first = rows[0][1]
    if not _is_int(first[0]):
        names = [f.lower() for f in first]
        if "index" not in names:
            raise PotionError(
                f"{path}, line {rows[0][0]}: '{lines[0][1].strip()}' is neither an integer index nor a header "
                f"with an 'index' column; {expected}"
            )
        col, rows = names.index("index"), rows[1:]
    width = len(first)
    if width > 1 and _is_int(first[0]):
        raise PotionError(f"{path}, line {lines[0][0]}: {width} values on one line; put one index per line "
                          f"(or add a header naming the 'index' column); {expected}")
    values = []
    for n, fields in rows:
        if len(fields) != width:
            raise PotionError(f"{path}, line {n}: {len(fields)} fields where the first line has {width}; {expected}")
        if not _is_int(fields[col]):
            raise PotionError(f"{path}, line {n}: '{fields[col]}' is not an integer index; {expected}")
        values.append(int(fields[col]))
    return np.array(values, dtype=np.int64)


def _is_int(text: str) -> bool:
    t = text.strip()
    return t.lstrip("+-").isdigit() and t.count("-") + t.count("+") <= 1


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


def select_deletion_set(inputs: HealInputs, share, count, identified, seed) -> tuple[np.ndarray, str]:
    given = [x is not None for x in (share, count, identified)]
    if sum(given) != 1:
        raise PotionError("give exactly one of --discovery-share, --discovery-count or --identified")
    n_total = inputs.n_train
    if identified is not None:
        return read_identified(identified, n_total), f"file {identified}"
    if inputs.manifest is None:
        raise PotionError("--discovery-share/--discovery-count draw from a Potion poison manifest (a --run folder); "
                          "for your own model and data give the indices you found with --identified FILE")
    idx = draw_deletion_set(inputs.manifest, share=share, count=count, seed=seed)
    what = f"share {share}" if share is not None else f"count {count}"
    return validate_indices(idx, n_total, f"manifest draw ({what})"), f"manifest draw ({what}, seed {seed})"


def check_deletion_is_poison(inputs: HealInputs, deletion: np.ndarray, source: str) -> None:
    """A deletion set of clean samples makes PTN search to max_steps for a crossing that
    cannot come; when the run's manifest knows the poison, say so at once."""
    gt = inputs.poisoned_mask
    if gt is None or not gt.any():
        return  # no ground truth: the owner's own data, or a manifest without poison
    hits = int(gt[deletion].sum())
    if hits == 0:
        raise PotionError(
            f"none of the {len(deletion)} samples of the deletion set ({source}) is poisoned according to the run's "
            "poison manifest; PTN unlearns the poison through them. Pass the indices of samples you found "
            "carrying the trigger"
        )
    if hits < len(deletion):
        print(f"potion: warning: {len(deletion) - hits} of the {len(deletion)} samples of the deletion set ({source}) "
              "are not poisoned according to the run's manifest; they dilute the forget importances", file=sys.stderr)


# ---------------------------------------------------------------- the guard's clean proxy
GUARDED = ("xlf_ptn_guard",)


def draw_proxy(retain: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded slice of Dr (sorted indices of D): the guard's clean proxy. It is drawn from
    the retain set only, so it never holds a sample of the deletion set or of the test split."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PotionError(f"proxy_size must be an integer >= 1 (retain-set images in the clean proxy), got {size!r}")
    rng = np.random.default_rng([int(seed), 0x9A0])  # its own stream: the deletion draw uses `seed`
    return np.sort(rng.choice(np.asarray(retain), size=min(size, len(retain)), replace=False))


def proxy_record(proxy: np.ndarray, seed: int, n_retain: int) -> dict:
    return {"size": int(len(proxy)), "seed": int(seed), "n_retain": int(n_retain),
            "indices_sha256": hash_arrays(np.asarray(proxy, dtype=np.int64)), "source": "seeded slice of Dr"}


# ---------------------------------------------------------------- importances
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
            if sampled:  # a full entry keeps its old key; a sampled one can never collide with it
                extra += f"|sample={sample.label()}"
            key = cache.key(state0, data_hash, estimator, p, bs, extra=extra)
            hit = cache.get_entry(key)
            if hit is not None:
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
    """Σ_b G(b) over the batches of ``retain[positions]``, sharded over Ray tasks."""
    from potion.distributed.importances import sharded_importance_sums

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


# ---------------------------------------------------------------- heal
def run_heal(source: str | Path | RunSource | OwnerSource, job: HealJob, out: str | Path, *,
             share: float | None = None, count: int | None = None, identified: str | Path | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Heal from a run folder (a path or :class:`RunSource`) or the owner's pieces (:class:`OwnerSource`).

    Everything (model, report, deletion set, MLflow store, Ray results) is built in a
    staging folder beside ``out`` and swapped in only when the heal succeeds."""
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
    final_uri = resolve_tracking_uri(job, out)
    if final_uri and (job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        from potion.tracking.tracker import check_tracking

        check_tracking(final_uri)  # a user's store: check it before anything is created
    refused = None
    with staged_output_dir(out, overwrite) as stage:
        try:
            report = _connect_and_heal(source, job, stage, share, count, identified, overwrite, progress,
                                       final_out=out.resolve(), final_uri=final_uri)
        except GuardNoSafeStep as e:
            # The refusal (report.json with the curve, the MLflow store, no model) is kept in a
            # new or empty --out; an earlier heal's results there are left as they were.
            if out.exists() and any(out.iterdir()):
                raise
            refused = e
        if resolve_tracking_uri(job, stage) != final_uri:  # the default store lives in the stage
            from potion.tracking.tracker import relocate_sqlite_store

            relocate_sqlite_store(stage / "mlflow.db", stage.resolve(), out.resolve())
    if refused is not None:
        raise refused
    return report


def _connect_and_heal(source, job: HealJob, out: Path, share, count, identified, overwrite, progress, *,
                      final_out: Path, final_uri: str | None) -> dict:
    tracking_uri = resolve_tracking_uri(job, out)
    py_modules = source.py_modules()  # parses --model: a bad spec fails before Ray starts
    if tracking_uri:
        from potion.tracking.tracker import check_tracking

        check_tracking(tracking_uri)
    if job.backend == "ray":
        from potion.distributed.runtime import connect

        connect(job.address, job.num_cpus, py_modules=py_modules)  # fail fast on an unreachable cluster
    try:
        return _heal(source.load(), job, out, share, count, identified, overwrite, progress, tracking_uri,
                     final_out=final_out, final_uri=final_uri)
    finally:
        if job.backend == "ray":
            from potion.distributed.runtime import shutdown_if_owned

            shutdown_if_owned()


def _heal(inputs: HealInputs, job: HealJob, out: Path, share, count, identified, overwrite, progress,
          tracking_uri, *, final_out: Path | None = None, final_uri: str | None = None) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(job.device)
    deletion, source = select_deletion_set(inputs, share, count, identified, job.seed)
    check_deletion_is_poison(inputs, deletion, source)
    n_total = inputs.n_train
    retain = np.setdiff1d(np.arange(n_total), deletion)
    bs, bs_auto = resolve_batch_size(job.importance_batch_size, len(retain))
    job = dataclasses.replace(job, importance_batch_size=bs)  # the cache key and Ray shards see the B used
    view = inputs.train
    forget_view, retain_view = view.subset(deletion), view.subset(retain)
    eval_bs = job.eval_batch_size or eval_batch_size(device)
    retain_sample = parse_retain_sample(job.retain_sample,
                                        job.seed if job.retain_sample_seed is None else job.retain_sample_seed)
    forget_batches = list(forget_view.batches(bs, augment=job.importance_augment, device=device))

    clean, triggered = inputs.clean_test, inputs.triggered_test
    val_batches = None
    if job.val_size:
        rng = np.random.default_rng(job.seed)
        pos = np.sort(rng.choice(len(clean), size=min(job.val_size, len(clean)), replace=False))
        val_batches = list(clean.subset(pos).batches(eval_bs, device=device))

    proxy = proxy_batches = None
    if job.method in GUARDED:
        proxy = draw_proxy(retain, job.proxy_size, job.seed)
        proxy_batches = list(view.subset(proxy).batches(eval_bs, device=device))

    model = inputs.model
    recorded = None if job.remeasure else inputs.recorded_metrics
    before_source = "metrics.json" if recorded is not None else "measured"
    if recorded is not None:  # θ0 as training measured it; only the deletion set is new
        before = {**recorded, "deletion_acc": accuracy(model, forget_view, eval_bs, device, job.fast_eval)}
    else:
        before = _measured(model, inputs, forget_view, eval_bs, device, job.fast_eval)

    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    placement: dict = {}
    ctx = HealContext(
        model=model,
        state0=state0,
        retain_batches=lambda: retain_view.batches(bs, augment=job.importance_augment, device=device),
        forget_batches=forget_batches,
        retain_total=-(-len(retain) // bs),
        n_forget=len(deletion),
        n_total=n_total,
        ptn=job.ptn,
        device=device,
        progress=progress,
        importances=make_importance_fn(inputs, job, state0, deletion, retain, device, progress, retain_view,
                                       placement),
        retain_sample=retain_sample,
        retain_batches_at=lambda pos: retain_view.subset(pos).batches(bs, augment=job.importance_augment,
                                                                      device=device),
        n_retain=len(retain),
        retain_batch_size=bs,
        fast_eval=job.fast_eval,
        val_batches=val_batches,
        retrain=(functools.partial(inputs.retrain, view.subset(retain), device, progress)
                 if inputs.retrain is not None else None),
        grid_score=_grid_scorer(inputs, job.seed, eval_bs, device) if job.method == "ssd_grid" else None,
        ssd_alpha=job.ssd_alpha,
        ssd_lambda=job.ssd_lambda,
        proxy_batches=proxy_batches,
        guard=job.guard,
        allow_damage=job.allow_damage,
    )
    runs = label_runs(view.labels[retain])
    extra = {"importance_batch_size": {"value": bs, "auto": bs_auto, "n_retain": int(len(retain)),
                                       "label_runs": runs}}
    note = sorted_batches_note(runs, len(retain), bs) if retain_sample.is_full else None
    if note is not None:
        extra["importance_batch_size"]["note"] = note
        print(f"potion: note: {note}", file=sys.stderr)
    if proxy is not None:
        extra["proxy"] = proxy_record(proxy, job.seed, len(retain))

    tracker_cm = _tracker(tracking_uri, job, inputs, final_out or out)
    with tracker_cm as tracker:
        if job.backend == "ray":
            from potion.distributed.search import make_ray_search

            callbacks = [tracker.tune_callback()] if tracker else []
            ray_spec = dict(model_factory=inputs.spec.build, gpus_per_trial=job.gpus_per_trial,
                            storage_path=str(out.resolve() / "ray_results"), callbacks=callbacks,
                            progress=progress, placement=placement)
            ctx.search = make_ray_search(**ray_spec)
        try:
            result = heal(job.method, ctx)
        except (PTNNoCrossing, NothingToHeal) as e:
            trace = [t.to_dict() for t in getattr(e, "trace", [])]
            guard_info = e.info if isinstance(e, GuardNoSafeStep) else None
            if job.on_no_crossing != "keep":
                if guard_info is not None:
                    _report_refusal(e, guard_info, trace, extra, job, out, tracker, final_out or out)
                raise
            reason = ("guard_no_safe_step" if guard_info is not None
                      else "no_crossing" if isinstance(e, PTNNoCrossing) else "nothing_to_heal")
            info = {reason: True, "message": str(e), "trace": trace}
            if guard_info is not None:
                info["guard"] = guard_info
            result = HealResult(job.method, state0, info, {})
        healed = inputs.spec.build()
        healed.load_state_dict(result.state_dict)
        healed.eval()
        if _unchanged(result.state_dict, state0):
            after = dict(before)  # the same weights on the same data: θ0's metrics (e.g. --method none)
        else:
            after = _measured(healed, inputs, forget_view, eval_bs, device, job.fast_eval)
        report = _report(job, inputs, deletion, source, before, after, result, time.perf_counter() - t_start)
        report["before_source"] = before_source
        report.update(extra)
        if placement:
            report["placement"] = placement  # which Ray node ran which shard and which step k
        if tracker:
            trace = result.info.get("trace") or []
            if job.backend != "ray":
                tracker.log_children(trace)
            tracker.log_curve(trace, threshold=result.info.get("threshold"), k_star=result.info.get("k_star"),
                              guard=result.info.get("guard"))
            report["mlflow"] = {"tracking_uri": final_uri or tracking_uri, "parent_run_id": tracker.parent_run_id,
                                "experiment": job.experiment, "experiment_id": tracker.experiment_id}
        _write_outputs(out, healed, inputs, deletion, report, overwrite)
        if tracker:
            model_id = tracker.log_pytorch_model(healed, forget_batches[0][0], registered_name=job.register_model)
            tracker.log_metrics(before_after_metrics(report), model_id=model_id)
            sample = report.get("retain_sample") or {}
            tracker.log_metrics({f"retain_sample_{k}": sample[k] for k in ("n_used", "share_used", "batches")
                                 if isinstance(sample.get(k), (int, float))})
            tracker.log_model(out / MODEL_FILE)
            tracker.log_files([out / REPORT_FILE, out / DELETION_FILE, *inputs.extra_files])
    return report


def _measured(model, inputs: HealInputs, forget_view, bs: int, device: str, fast: bool = False) -> dict:
    """SPEC §4 metrics plus accuracy on the deletion set (with the labels it was trained with)."""
    return {**measure(model, inputs, bs, device, fast), "deletion_acc": accuracy(model, forget_view, bs, device, fast)}


def _unchanged(state: dict, state0: dict) -> bool:
    return state.keys() == state0.keys() and all(torch.equal(state[k].cpu(), state0[k].cpu()) for k in state0)


def _report_refusal(e: GuardNoSafeStep, guard_info: dict, trace: list, extra: dict, job: HealJob, out: Path,
                    tracker, final_out: Path) -> None:
    """The guard refused every step: record why, with the curve, but write no model
    (``run_heal`` keeps this report only in a new or empty --out)."""
    refusal = {"method": job.method, "healed": False, "message": str(e), "guard": guard_info, "trace": trace,
               **extra, "config": to_dict(job)}
    if tracker:
        tracker.log_curve(trace, guard=guard_info)
    if not (out / REPORT_FILE).exists() and not (out / MODEL_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / REPORT_FILE, refusal)
        e.args = (f"{e.args[0]}. Curve and reasons: {final_out / REPORT_FILE}",)


def resolve_tracking_uri(job: HealJob, out: Path) -> str | None:
    uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri == "none":
        return None
    return uri or default_tracking_uri(out)


def default_tracking_uri(out: Path) -> str:
    """``sqlite:///<out>/mlflow.db``; a path a sqlite URI cannot hold is refused, never
    silently cut (``?`` starts the URI's query, ``%`` is decoded, ``#`` a fragment)."""
    path = (Path(out) / "mlflow.db").resolve()
    bad = sorted({c for c in str(path) if c in "?#%"})
    if bad:
        raise PotionError(
            f"--out {out} contains {' '.join(repr(c) for c in bad)}, which the default MLflow store URI "
            f"(sqlite:///…/mlflow.db) cannot hold; choose another --out, or pass --tracking-uri none "
            "(or a store elsewhere)"
        )
    return f"sqlite:///{path}"


class _NoTracker:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tracker(uri, job: HealJob, inputs: HealInputs, out: Path):
    if not uri:
        return _NoTracker()
    from potion.tracking.tracker import SearchTracker, default_artifact_root

    params = {"run": str(inputs.provenance.get("run")), "method": job.method, "backend": job.backend,
              **_flat("heal", to_dict(job)), **_flat("provenance", inputs.provenance)}
    return SearchTracker(uri, job.experiment, run_name=f"{job.method}:{out.name}", params=params,
                         artifact_root=default_artifact_root(uri))


def _flat(prefix: str, d: dict) -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            flat.update(_flat(key, v))
        else:
            flat[key] = v
    return flat


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


def _healed_share(ra, clean_acc):
    return None if ra is None else poison_healed(ra, clean_acc)


def _report(job, inputs: HealInputs, deletion, source, before, after, result, total_s) -> dict:
    gt = inputs.poisoned_mask
    info = dict(result.info)
    trace = [t.to_dict() if hasattr(t, "to_dict") else t for t in info.pop("trace", []) or []]
    return {
        "method": job.method,
        "backend": job.backend,
        "run": inputs.provenance.get("run"),
        "provenance": inputs.provenance,
        "deletion_set": {"size": int(len(deletion)), "source": source,
                         # ground truth exists only for Potion's own runs
                         "true_poison_in_set": None if gt is None else int(gt[deletion].sum()),
                         "n_poison_total": None if gt is None else int(gt.sum()),
                         "n_train": int(inputs.n_train)},
        "rho": job.ptn.rho,
        "k_star": info.pop("k_star", None),
        "s": info.pop("s", None),
        "alpha": info.pop("alpha", None),
        "retain_sample": info.pop("retain_sample", None),
        "info": info,
        "trace": trace,
        "timings": {**result.timings, "wall_s": round(total_s, 3)},
        "before": before,
        "after": {**after,
                  "poison_healed": _healed_share(after["ra"], after["clean_acc"]),
                  "model_damage": model_damage(after["clean_acc"], before["clean_acc"])},
        "before_poison_healed": _healed_share(before["ra"], before["clean_acc"]),
        "config": to_dict(job),
    }


def _write_outputs(out: Path, healed, inputs: HealInputs, deletion, report, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"index": pa.array(deletion, pa.int64())})
    atomic_write(out / DELETION_FILE, lambda tmp: pq.write_table(table, tmp))
    # A checkpoint that names its model spec: `--weights OUT/model.pt` loads it back.
    save_checkpoint(out / MODEL_FILE, healed.cpu(), inputs.spec.text, inputs.spec.kwargs,
                    extra={**inputs.checkpoint_extra, "method": report["method"],
                           "model_spec": inputs.spec.provenance()}, overwrite=True)
    atomic_write_json(out / REPORT_FILE, report)
