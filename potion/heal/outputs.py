"""What a heal leaves behind: ``report.json`` (built here from the before/after metrics and the
method's result), the healed checkpoint and the deletion set, each written atomically."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from potion.config import to_dict
from potion.heal.inputs import HealInputs
from potion.io import atomic_write, atomic_write_json
from potion.metrics import model_damage, poison_healed
from potion.models import save_checkpoint
from potion.runs.configs import HealJob
from potion.runs.folder import MODEL_FILE
from potion.unlearning.guard import GuardNoSafeStep

REPORT_FILE = "report.json"
DELETION_FILE = "deletion_set.parquet"


def _healed_share(ra, clean_acc):
    return None if ra is None else poison_healed(ra, clean_acc)


def build_report(job, inputs: HealInputs, deletion, source, before, after, result, total_s) -> dict:
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


def write_outputs(out: Path, healed, inputs: HealInputs, deletion, report) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"index": pa.array(deletion, pa.int64())})
    atomic_write(out / DELETION_FILE, lambda tmp: pq.write_table(table, tmp))
    # A checkpoint that names its model spec: `--weights OUT/model.pt` loads it back.
    save_checkpoint(out / MODEL_FILE, healed.cpu(), inputs.spec.text, inputs.spec.kwargs,
                    extra={**inputs.checkpoint_extra, "method": report["method"],
                           "model_spec": inputs.spec.provenance()}, overwrite=True)
    atomic_write_json(out / REPORT_FILE, report)


def write_refusal(e: GuardNoSafeStep, guard_info: dict, trace: list, extra: dict, job: HealJob, out: Path,
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
