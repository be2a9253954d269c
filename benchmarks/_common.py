"""Shared bits of the benchmark scripts: where the real data lives and the MNIST run."""
from __future__ import annotations

import os
from pathlib import Path

from potion.errors import PotionError

REPO = Path(__file__).resolve().parent.parent


def data_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<name>``, with ``root`` from the caller's flag, else ``$POTION_DATA``, else
    ``data/`` in the repository (where ``potion data`` writes)."""
    base = Path(root or os.environ.get("POTION_DATA") or REPO / "data")
    path = base / name
    if not path.is_dir():
        raise PotionError(f"benchmark data {path} not found; make it with `potion data {name.split('-')[0]} ...` "
                          f"or set POTION_DATA to the folder holding '{name}/'")
    return path


def mnist_train_job(iterations: int, smoke: bool = False, root: str | os.PathLike | None = None):
    """The CPU-sized MNIST recipe: a quarter-width ResNet-9, 1 % badnet."""
    from potion.runs.configs import DataConfig, ModelConfig, PoisonConfig, TrainJob
    from potion.training import TrainRecipe

    args = {"root": str(data_root("mnist", root))}
    if smoke:
        args.update(train_limit=3000, test_limit=1000)
    return TrainJob(
        data=DataConfig(dataset="parquet", args=args),
        poison=PoisonConfig(trigger="badnet", share=0.01, target=0, seed=0),
        model=ModelConfig(name="resnet9", args={"width": 0.25}),
        recipe=TrainRecipe(iterations=iterations, batch_size=256, lr=0.05, seed=0),
    )
