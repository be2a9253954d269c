"""What ``potion heal`` / ``potion evaluate`` need after loading, and the two loaders that make it.

- :class:`RunSource`: a run folder written by ``potion train`` (registry model, poison
  manifest, the trigger pasted at load time).
- :class:`OwnerSource`: the owner's own pieces: a model spec (``file.py:Name``, a module,
  ``timm:``/``torchvision:`` or a registry name), a weights file, a dataset used as stored
  (the poison is already in the images), the owner's mean/std/image size and, optionally,
  a Parquet of triggered test images with the attack's target class.

Both produce a :class:`HealInputs`; everything after loading (importances, cache, search,
MLflow, outputs, report) is one shared path in ``potion.heal.run``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from potion.config import to_dict
from potion.datasets import LabeledView, load_dataset
from potion.datasets.stored import (
    check_transform,
    check_triggered_shape,
    read_triggered_test,
    stored_view,
)
from potion.errors import PotionError
from potion.models import ModelSpec, load_weights, parse_model_spec, read_weights
from potion.models.spec import file_sha256
from potion.runs.folder import MANIFEST_FILE, METRICS_FILE, MODEL_FILE, check_finite, load_run
from potion.unlearning.cache import hash_arrays

NOT_MEASURED = ("ra and asr were not measured: no triggered test set was given "
                "(pass --triggered-test FILE --target CLASS to measure them)")


@dataclass
class HealInputs:
    model: nn.Module  # θ0, eval mode
    spec: ModelSpec  # rebuilds the architecture on the driver, in shards and in trials
    train: LabeledView  # D as the owner has it
    train_view_factory: Callable[[], LabeledView]  # picklable: D rebuilt on a Ray worker
    clean_test: LabeledView
    triggered_test: LabeledView | None  # T* with clean labels, or None (ra/asr not measured)
    target: int | None
    num_classes: int
    provenance: dict
    data_key: str  # fingerprint of the data and transform (importance cache key)
    manifest: Any = None  # a Potion poison manifest (ground truth, seeded draws), runs only
    protected: Path | None = None  # a folder --out must not lie in
    retrain: Callable[[LabeledView, str, bool], dict] | None = None  # eu: retrain with θ0's recipe
    extra_files: list[Path] = field(default_factory=list)  # logged to MLflow beside the outputs
    checkpoint_extra: dict = field(default_factory=dict)
    # θ0's clean_acc/ra/asr as `potion train` measured them on these test sets (run folders
    # healed with their own model.pt); the heal reuses them unless --remeasure.
    recorded_metrics: dict | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def poisoned_mask(self) -> np.ndarray | None:
        return None if self.manifest is None else self.manifest.poisoned_mask


def measure(model: nn.Module, inputs: HealInputs, batch_size: int, device: str, fast: bool = False) -> dict:
    """SPEC §4 metrics; ra/asr are None (and said so) without a triggered test set."""
    from potion.metrics import accuracy, attack_metrics

    if inputs.triggered_test is None:
        return {"clean_acc": accuracy(model, inputs.clean_test, batch_size, device, fast), "ra": None, "asr": None,
                "note": NOT_MEASURED}
    return attack_metrics(model, inputs.clean_test, inputs.triggered_test, inputs.target, batch_size, device,
                          fast=fast)


def model_at(spec: ModelSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    """``spec``'s model at the given weights (what a Ray shard rebuilds)."""
    model = spec.build()
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- Potion's own run folder
@dataclass
class RunSource:
    run_dir: str | Path
    checkpoint: str | Path | None = None

    def py_modules(self) -> list[str]:
        return []

    def load(self) -> HealInputs:
        run = load_run(self.run_dir, self.checkpoint)
        ckpt_path = Path(self.checkpoint or Path(self.run_dir) / MODEL_FILE)
        clean, triggered = run.test_views(seed=run.job.poison.seed)
        m = run.manifest
        spec = ModelSpec("registry", run.checkpoint.name, kwargs=dict(run.checkpoint.kwargs))
        transform = {"mean": list(run.splits.mean), "std": list(run.splits.std), "image_size": None}
        provenance = {
            "source": "run", "run": str(run.path),
            "model": spec.provenance(),
            "weights": {"path": str(ckpt_path.resolve()), "sha256": file_sha256(ckpt_path)},
            "data": {"dataset": run.job.data.dataset, "args": run.job.data.args,
                     "manifest_sha256": file_sha256(run.path / MANIFEST_FILE)},
            "transform": transform,
            "trigger": {"name": m.trigger_name, "params": m.trigger_params, "target": m.target,
                        "pasted_at_load": True},
        }
        data_key = hash_arrays(
            np.frombuffer(json.dumps([to_dict(run.job.data), transform], sort_keys=True).encode(), dtype=np.uint8),
            m.train_labels, m.poisoned_mask, m.corners,
        )
        return HealInputs(
            model=run.model, spec=spec, train=run.train_view(),
            train_view_factory=functools.partial(_run_train_view, str(run.path)),
            clean_test=clean, triggered_test=triggered, target=m.target, num_classes=run.splits.num_classes,
            provenance=provenance, data_key=data_key, manifest=m, protected=run.path,
            retrain=functools.partial(_retrain_run, run), extra_files=[run.path / MANIFEST_FILE],
            checkpoint_extra={**(run.checkpoint.extra or {}), "healed_from": str(ckpt_path)},
            recorded_metrics=None if self.checkpoint is not None else _recorded_metrics(run.path),
        )


def _recorded_metrics(run_dir: Path) -> dict | None:
    """metrics.json of a run folder, if it holds numeric clean_acc, ra and asr."""
    try:
        data = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    keys = ("clean_acc", "ra", "asr")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), (int, float)) for k in keys):
        return None
    return {k: float(data[k]) for k in keys}


def _run_train_view(run_dir: str) -> LabeledView:
    return load_run(run_dir).train_view()


def _retrain_run(run, retain_view: LabeledView, device: str, progress: bool) -> dict:
    """EU: re-initialise and retrain on Dr with the recipe θ0 was trained with."""
    from potion.models import create_model
    from potion.training import train_model

    torch.manual_seed(run.job.recipe.seed)
    model = create_model(run.checkpoint.name, **run.checkpoint.kwargs)
    return train_model(model, retain_view, run.job.recipe, device=device, progress=progress).state_dict()


# ---------------------------------------------------------------- the owner's pieces
@dataclass
class OwnerSource:
    model: str
    weights: str | Path
    dataset: str
    data_args: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    image_size: int | None = None
    triggered_test: str | Path | None = None
    target: int | None = None
    _spec: ModelSpec | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.triggered_test is None) != (self.target is None):
            given, missing = ("--triggered-test", "--target") if self.target is None else ("--target", "--triggered-test")
            raise PotionError(f"{given} needs {missing}: ra/asr are measured on triggered test images "
                              "(--triggered-test FILE) against the attack's target class (--target CLASS)")
        if self.weights is None:
            raise PotionError("--model needs --weights FILE (the trained state_dict, .pt/.pth/.safetensors)")
        if not self.dataset:
            raise PotionError("--model needs --dataset (parquet, imagefolder, cifar10, ...) and --data-root")

    def spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = parse_model_spec(self.model, self.model_args)
        return self._spec

    def py_modules(self) -> list[str]:
        return self.spec().py_modules()

    def load(self) -> HealInputs:
        spec = self.spec()
        weights = read_weights(self.weights)  # before the data: a bad file fails in a second
        splits = load_dataset(self.dataset, **self.data_args)
        channels = splits.image_shape[0]
        mean = tuple(self.mean) if self.mean is not None else (0.0,) * channels
        std = tuple(self.std) if self.std is not None else (1.0,) * channels
        check_transform(channels, mean, std, self.image_size)
        size = self.image_size or splits.image_shape[1]
        if spec.kind == "registry":  # Potion's factories take the data's shape
            spec = spec.with_kwargs(**{"num_classes": splits.num_classes, "in_channels": channels,
                                       "image_size": size, **spec.kwargs})
        model = load_weights(spec.build(), weights, f"model {spec.text}")
        check_finite(model, self.weights)  # NaN weights give numbers, not an error: refuse them
        train = stored_view(splits.train, mean, std, self.image_size)
        clean = stored_view(splits.test, mean, std, self.image_size)
        check_outputs(model, clean, splits.num_classes, spec.text)
        triggered, trig_prov = None, None
        if self.triggered_test is not None:
            if isinstance(self.target, bool) or not isinstance(self.target, int) or not 0 <= self.target < splits.num_classes:
                raise PotionError(f"--target must be a class index in 0..{splits.num_classes - 1}, got {self.target!r}")
            src = read_triggered_test(self.triggered_test, splits.classes)
            check_triggered_shape(self.triggered_test, src, splits.test, self.image_size)
            triggered = stored_view(src, mean, std, self.image_size)
            trig_prov = {"path": str(Path(self.triggered_test).resolve()),
                         "sha256": file_sha256(self.triggered_test), "n": len(src), "target": self.target}
        transform = {"mean": list(mean), "std": list(std), "image_size": self.image_size,
                     "stored_size": list(splits.image_shape[1:])}
        data = data_identity(self.dataset, self.data_args, splits)
        provenance = {"source": "owner", "run": None, "model": spec.provenance(), "weights": weights.provenance(),
                      "data": data, "transform": transform, "triggered_test": trig_prov,
                      "trigger": {"pasted_at_load": False, "note": "the data is used as stored"}}
        data_key = hash_arrays(
            np.frombuffer(json.dumps([_without_paths(data), transform], sort_keys=True).encode(), dtype=np.uint8),
            splits.train.labels,
        )
        return HealInputs(
            model=model, spec=spec, train=train,
            train_view_factory=functools.partial(_owner_train_view, self.dataset, dict(self.data_args), mean, std,
                                                 self.image_size),
            clean_test=clean, triggered_test=triggered, target=self.target, num_classes=splits.num_classes,
            provenance=provenance, data_key=data_key,
            checkpoint_extra={"healed_from": weights.path, "weights_sha256": weights.sha256},
        )


def _owner_train_view(dataset: str, data_args: dict, mean, std, image_size) -> LabeledView:
    return stored_view(load_dataset(dataset, **data_args).train, mean, std, image_size)


def check_outputs(model: nn.Module, view: LabeledView, num_classes: int, what: str) -> None:
    """One forward pass: the model's output width must be the data's class count."""
    x, _ = next(view.subset(np.arange(min(2, len(view)))).batches(2))
    try:
        with torch.inference_mode():
            out = model.eval()(x)
    except Exception as e:
        raise PotionError(f"model {what} fails on the data's {tuple(x.shape[1:])} (C, H, W) images: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                          "check --image-size and --model-args") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise PotionError(f"model {what} must return (batch, classes) logits, got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.shape[1] != num_classes:
        raise PotionError(f"model {what} has {out.shape[1]} outputs but the data has {num_classes} classes; "
                          "set the class count in --model-args (e.g. '{\"num_classes\": %d}')" % num_classes)


def data_identity(dataset: str, data_args: dict, splits) -> dict:
    out: dict[str, Any] = {"dataset": dataset, "args": {k: str(v) for k, v in data_args.items()},
                           "n_train": len(splits.train), "n_test": len(splits.test),
                           "classes": len(splits.classes), "image_shape": list(splits.image_shape)}
    if dataset == "parquet":  # single files small enough to hash; image folders and shards are not
        root = Path(data_args["root"])
        for split in ("train_file", "test_file"):
            f = root / data_args.get(split, f"{split.split('_')[0]}.parquet")
            if f.is_file():
                out[f"{split.split('_')[0]}_sha256"] = file_sha256(f)
    for split in ("train", "test"):  # shards: each one's name, size and row count
        fingerprint = getattr(getattr(splits, split), "fingerprint", None)
        if fingerprint is not None:
            out[f"{split}_shards"] = fingerprint()
    return out


def _without_paths(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "args"} if any(k.endswith("sha256") for k in data) else data
