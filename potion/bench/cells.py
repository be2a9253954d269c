"""The benchmark's Ray tasks: train one poisoned model, heal one cell. Both never raise, so
the driver sees every failure as data."""
from __future__ import annotations

import time
from pathlib import Path

from potion.config import from_dict
from potion.runs.configs import HealJob, TrainJob


# ---------------------------------------------------------------- Ray tasks
def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:2000]


def train_task(job_dict: dict, model_dir: str, cpus: float) -> dict:
    """Train one poisoned model; never raises, so the driver sees every failure as data."""
    _set_threads(cpus)
    try:
        from potion.jobs.train import run_train

        metrics = run_train(from_dict(TrainJob, job_dict), model_dir, overwrite=True, progress=False)
        return {"status": "ok", "metrics": metrics}
    except Exception as e:  # noqa: BLE001 — a failing model must not sink the grid
        return {"status": "failed", "error": _describe(e)}


def heal_task(model_dir: str, heal_dict: dict, share: float | None, count: int | None, cell_dir: str,
              keep_model: bool, cpus: float) -> dict:
    """Heal one cell from its trained model; never raises."""
    _set_threads(cpus)
    t0 = time.perf_counter()
    try:
        from potion.heal.run import run_heal

        report = run_heal(model_dir, from_dict(HealJob, heal_dict), cell_dir, share=share, count=count,
                          overwrite=True, progress=False)
        if not keep_model:
            (Path(cell_dir) / "model.pt").unlink(missing_ok=True)
        return {"status": "ok", "report": report, "wall_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 — a failing cell must not sink the grid
        return {"status": "failed", "error": _describe(e), "wall_s": time.perf_counter() - t0}
