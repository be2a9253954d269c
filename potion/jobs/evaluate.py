"""``potion evaluate``: SPEC §4 metrics of a checkpoint against a run's data and manifest.

The metrics are printed; with ``out`` they are also written to that file, which must not
exist unless ``overwrite`` (so a run's own ``metrics.json`` is replaced only when asked).
A model with non-finite weights or one that cannot take the run's images is refused: its
numbers would be meaningless, not merely low.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from potion.errors import PotionError
from potion.io import atomic_write_json, check_writable_file
from potion.metrics import attack_metrics
from potion.runs.destination import local_output, resolve_out
from potion.runs.folder import load_run, resolve_device


@contextlib.contextmanager
def _metrics_file(out, overwrite: bool) -> Iterator[Path | None]:
    """The local file to write the metrics to (a remote ``out`` is copied up afterwards).
    Before any compute: refuse an existing file (unless asked) and an unwritable place."""
    if out is None:
        yield None
        return
    with local_output(resolve_out(out), overwrite, folder=False) as local:
        if local.exists() and not local.is_dir() and not overwrite:
            raise PotionError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
        check_writable_file(local, "metrics file", "--out")
        yield local


def run_evaluate(run: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
                 batch_size: int = 512, out: str | Path | None = None, overwrite: bool = False) -> dict:
    with _metrics_file(out, overwrite) as local:
        metrics = _evaluate_run(run, checkpoint, device, batch_size)
        if local is not None:
            atomic_write_json(local, metrics)
    return metrics


def _evaluate_run(run, checkpoint, device: str, batch_size: int) -> dict:
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
    return metrics


def evaluate_owner(source, device: str = "auto", batch_size: int = 512, out: str | Path | None = None,
                   overwrite: bool = False) -> dict:
    """Metrics of the owner's own model on their data (``potion evaluate --model …``).

    Nothing is written unless ``out`` names a file: the owner's folders are theirs.
    ra/asr need ``--triggered-test``.
    """
    from potion.heal.inputs import measure

    with _metrics_file(out, overwrite) as local:
        inputs = source.load()
        metrics = {**measure(inputs.model, inputs, batch_size, resolve_device(device)),
                   "provenance": inputs.provenance}
        if local is not None:
            atomic_write_json(local, metrics)
    return metrics
