"""``potion evaluate``: SPEC §4 metrics of a checkpoint against a run's data and manifest.

The metrics are printed; with ``out`` they are also written to that file, which must not
exist unless ``overwrite`` (so a run's own ``metrics.json`` is replaced only when asked).
A model with non-finite weights or one that cannot take the run's images is refused: its
numbers would be meaningless, not merely low.
"""
from __future__ import annotations

from pathlib import Path

from potion.errors import PotionError
from potion.io import atomic_write_json, check_writable_file
from potion.metrics import attack_metrics
from potion.runs.folder import load_run, resolve_device


def _check_out(out, overwrite: bool) -> None:
    """Before any compute: refuse an existing file (unless asked) and an unwritable place."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir() and not overwrite:
        raise PotionError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    check_writable_file(out, "metrics file", "--out")


def run_evaluate(run: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
                 batch_size: int = 512, out: str | Path | None = None, overwrite: bool = False) -> dict:
    _check_out(out, overwrite)
    folder = load_run(run, checkpoint)  # refuses non-finite weights and a model built for other images
    where = checkpoint or Path(run) / "model.pt"
    dev = resolve_device(device)
    clean, triggered = folder.test_views(seed=folder.job.poison.seed)
    try:
        metrics = attack_metrics(folder.model, clean, triggered, folder.manifest.target, batch_size=batch_size,
                                 device=dev)
    except RuntimeError as e:  # shape mismatches the recorded kwargs could not catch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PotionError(f"checkpoint {where} cannot take the images of run {run} ({first}); "
                          "evaluate a model trained on this run's data") from None
    if out is not None:
        atomic_write_json(out, metrics)
    return metrics


def evaluate_owner(source, device: str = "auto", batch_size: int = 512, out: str | Path | None = None,
                   overwrite: bool = False) -> dict:
    """Metrics of the owner's own model on their data (``potion evaluate --model …``).

    Nothing is written unless ``out`` names a file: the owner's folders are theirs.
    ra/asr need ``--triggered-test``.
    """
    from potion.heal.inputs import measure

    _check_out(out, overwrite)
    inputs = source.load()
    metrics = {**measure(inputs.model, inputs, batch_size, resolve_device(device)),
               "provenance": inputs.provenance}
    if out is not None:
        atomic_write_json(out, metrics)
    return metrics
