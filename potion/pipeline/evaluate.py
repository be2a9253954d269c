"""``potion evaluate``: SPEC §4 metrics of a checkpoint against a run's data and manifest."""
from __future__ import annotations

import json
from pathlib import Path

from potion.io import atomic_write_json
from potion.metrics import attack_metrics
from potion.pipeline.runs import METRICS_FILE, load_run, resolve_device


def run_evaluate(run: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
                 batch_size: int = 512, write: bool = True) -> dict:
    folder = load_run(run, checkpoint)
    dev = resolve_device(device)
    clean, triggered = folder.test_views(seed=folder.job.poison.seed)
    metrics = attack_metrics(folder.model, clean, triggered, folder.manifest.target, batch_size=batch_size, device=dev)
    # Metrics of another checkpoint go beside that checkpoint, never over the run's own file.
    if write:
        target = Path(run) / METRICS_FILE if checkpoint is None else Path(checkpoint).with_suffix(".metrics.json")
        previous = {}
        if target.is_file():
            try:
                previous = json.loads(target.read_text())
            except ValueError:
                previous = {}
        atomic_write_json(target, {**previous, **metrics})
    return metrics


def evaluate_owner(source, device: str = "auto", batch_size: int = 512) -> dict:
    """Metrics of the owner's own model on their data (``potion evaluate --model …``).

    Nothing is written: the owner's folders are theirs. ra/asr need ``--triggered-test``.
    """
    from potion.pipeline.heal_inputs import measure

    inputs = source.load()
    return {**measure(inputs.model, inputs, batch_size, resolve_device(device)),
            "provenance": inputs.provenance}
