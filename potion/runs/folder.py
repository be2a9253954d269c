"""A trained run folder (``potion train --out DIR``) and what can be rebuilt from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from potion.config import from_dict, load_yaml
from potion.datasets import (
    DatasetSplits,
    Manifest,
    clean_test_view,
    load_dataset,
    load_manifest,
    make_trigger,
    train_view,
    triggered_test_view,
)
from potion.errors import PotionError
from potion.models import Checkpoint, load_checkpoint
from potion.runs.configs import TrainJob

MODEL_FILE = "model.pt"
MANIFEST_FILE = "poison.parquet"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PotionError(f"device '{name}' was asked for but CUDA is not available; use --device cpu")
    return name


@dataclass
class RunFolder:
    path: Path
    job: TrainJob
    splits: DatasetSplits
    manifest: Manifest
    model: torch.nn.Module
    checkpoint: Checkpoint

    @property
    def trigger(self):
        return make_trigger(self.manifest.trigger_name, **self.manifest.trigger_params)

    def train_view(self):
        """D as the owner has it: poisoned samples carry the trigger and the target label."""
        return train_view(self.splits, self.manifest, self.trigger)

    def test_views(self, seed: int = 0):
        return clean_test_view(self.splits), triggered_test_view(self.splits, self.trigger, seed=seed)


def load_run(path: str | Path, checkpoint: str | Path | None = None) -> RunFolder:
    """Load a run folder; ``checkpoint`` evaluates another model against the same data."""
    path = Path(path)
    if not path.is_dir():
        raise PotionError(f"run folder {path} does not exist; create one with `potion train --out {path}`")
    missing = [f for f in (CONFIG_FILE, MANIFEST_FILE) if not (path / f).is_file()]
    if checkpoint is None and not (path / MODEL_FILE).is_file():
        missing.append(MODEL_FILE)
    if missing:
        raise PotionError(
            f"run folder {path} is missing {', '.join(missing)}; "
            f"a run folder holds {MODEL_FILE}, {MANIFEST_FILE} and {CONFIG_FILE} as written by `potion train`"
        )
    job = from_dict(TrainJob, load_yaml(path / CONFIG_FILE))
    splits = load_dataset(job.data.dataset, **job.data.args)
    manifest = load_manifest(path / MANIFEST_FILE)
    if manifest.table.num_rows != len(splits.train):
        raise PotionError(
            f"manifest {path / MANIFEST_FILE} has {manifest.table.num_rows} rows but the training set of "
            f"'{job.data.dataset}' has {len(splits.train)} samples: the data changed since training"
        )
    model, ckpt = load_checkpoint(checkpoint or path / MODEL_FILE)
    check_model_fits(ckpt, splits, checkpoint or path / MODEL_FILE)
    check_finite(model, checkpoint or path / MODEL_FILE)
    return RunFolder(path, job, splits, manifest, model, ckpt)


def check_finite(model: torch.nn.Module, where) -> None:
    """Refuse NaN/inf weights or buffers (a diverged training, a damaged file): every
    number computed from them would be meaningless, not merely low."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise PotionError(f"checkpoint {where}: {name} holds {n_bad} non-finite values (NaN or inf); "
                              "use a checkpoint of a training that converged")


def check_model_fits(ckpt: Checkpoint, splits: DatasetSplits, where) -> None:
    n_model = ckpt.kwargs.get("num_classes")
    n_data = len(splits.train.classes)
    if n_model is not None and n_model != n_data:
        raise PotionError(
            f"checkpoint {where} has {n_model} output classes but dataset '{splits.name}' has {n_data}; "
            "heal or evaluate a model with the dataset it was trained on"
        )
    # A model with adaptive pooling runs on any image size and gives a wrong number
    # instead of an error: compare what it was built for with what the data now is.
    c, h, _ = splits.train.image_shape
    for key, have in (("in_channels", c), ("image_size", h)):
        want = ckpt.kwargs.get(key)
        if want is not None and int(want) != int(have):
            raise PotionError(
                f"checkpoint {where} was built for {key}={want} but dataset '{splits.name}' now gives {key}={have} "
                "(did the run's config.yaml change?); evaluate or heal a model with the data it was trained on"
            )
