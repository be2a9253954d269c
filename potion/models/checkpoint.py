"""Checkpoints: weights plus the name and kwargs that rebuild their model.

Loading uses ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers, so opening a checkpoint from someone else never runs their code.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from potion.errors import PotionError, detail_of
from potion.io import atomic_write

FORMAT = "potion-checkpoint/1"


@dataclass
class Checkpoint:
    name: str
    kwargs: dict
    extra: dict = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, name: str, kwargs: dict, extra: dict | None = None, overwrite: bool = False
) -> Path:
    """Write ``model``'s weights with what is needed to rebuild it (``create_model(name, **kwargs)``)."""
    path = Path(path)
    if path.is_dir():
        raise PotionError(f"checkpoint path {path} is a folder; give a file name such as {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise PotionError(f"checkpoint {path} already exists; choose another path or pass overwrite/--overwrite")
    _check_json("kwargs", kwargs)
    extra = {} if extra is None else extra
    _check_json("extra", extra)
    payload = {
        "format": FORMAT,
        "model": name,
        "kwargs": dict(kwargs),
        "extra": extra,
        # contiguous CPU copies: a checkpoint must not depend on where or how it was trained
        "state_dict": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, num_classes: int | None = None
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model of a checkpoint (eval mode). ``num_classes``, if given, must match."""
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise PotionError(
            f"checkpoint {path} holds objects other than tensors and plain data and was not loaded "
            f"(Potion never runs code from a checkpoint){_unpickler_reason(e)}"
        ) from None
    except Exception as e:  # truncated file, not a torch file at all, ...
        raise PotionError(f"{path} is not a readable checkpoint: the file is truncated, damaged or not a torch file",
                          detail=detail_of(e)) from None
    ckpt = _parse(path, payload)
    if num_classes is not None and ckpt.kwargs.get("num_classes") != num_classes:
        raise PotionError(
            f"checkpoint {path} was saved for {ckpt.kwargs.get('num_classes')} classes but the dataset has {num_classes}"
        )
    model = model_from_state(ckpt.name, ckpt.kwargs, ckpt.state_dict, where=f"checkpoint {path}")
    return model.to(map_location), ckpt


def model_from_state(name: str, kwargs: dict, state_dict: dict[str, torch.Tensor], where: str = "state_dict") -> nn.Module:
    """``create_model(name, **kwargs)`` with ``state_dict`` loaded strictly; eval mode."""
    from potion.models import create_model  # the package imports this module

    model = create_model(name, **kwargs)
    problem = _mismatch(model, state_dict, kwargs)
    if problem:
        raise PotionError(f"{where} does not fit model '{name}' {kwargs}: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _parse(path: Path, payload) -> Checkpoint:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " It looks like a bare state_dict; save it with potion.models.save_checkpoint so the model can be rebuilt."
        raise PotionError(f"{path} is not a Potion checkpoint (expected format '{FORMAT}').{hint}")
    name, kwargs, extra, state = (payload.get(k) for k in ("model", "kwargs", "extra", "state_dict"))
    if not isinstance(name, str) or not isinstance(kwargs, dict) or not isinstance(state, dict):
        raise PotionError(f"checkpoint {path} is damaged: model name, kwargs or state_dict missing")
    return Checkpoint(name=name, kwargs=kwargs, extra=extra or {}, state_dict=state)


def _mismatch(model: nn.Module, state_dict: dict, kwargs: dict) -> str:
    """Say in words why ``state_dict`` does not fit ``model`` ("" if it does)."""
    own = model.state_dict()
    saved_classes, wanted = _output_width(state_dict), kwargs.get("num_classes")
    if saved_classes is not None and wanted is not None and _output_width(own) == wanted and saved_classes != wanted:
        return f"it was saved for {saved_classes} classes but the model asks for {wanted}"
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: saved {tuple(state_dict[k].shape) if isinstance(state_dict[k], torch.Tensor) else type(state_dict[k]).__name__}"
        f", model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and (not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing entries (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected entries (first: {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (first: {shapes[0]})")
    ints = not_floating(own, state_dict)
    if ints and not parts:
        parts.append(f"{len(ints)} entries are not floating point where the model's are (first: {ints[0]})")
    return "; ".join(parts)


def not_floating(own: dict[str, torch.Tensor], state_dict: dict) -> list[str]:
    """``key (dtype)`` of the integer/bool tensors saved for the model's floating-point ones.

    ``load_state_dict`` would cast them silently: an int32 export of a float model holds
    rounded or scaled values, and a healed model would carry them."""
    return [f"{k} ({str(state_dict[k].dtype).removeprefix('torch.')})" for k, v in own.items()
            if v.is_floating_point() and isinstance(state_dict.get(k), torch.Tensor)
            and not state_dict[k].is_floating_point()]


def _output_width(state_dict: dict) -> int | None:
    # The classifier is the last 2-D weight in registration order for every model here.
    for key in reversed(list(state_dict)):
        v = state_dict[key]
        if key.endswith("weight") and isinstance(v, torch.Tensor) and v.ndim == 2:
            return int(v.shape[0])
    return None


def _unpickler_reason(e: Exception) -> str:
    # torch's message is long advice on how to load unsafely; keep only what it rejected.
    for line in str(e).splitlines():
        if "Unsupported" in line or "Unpickler error" in line:
            return ": " + line.split(" was not an allowed")[0].strip()
    return ""


def _check_json(what: str, obj) -> None:
    if not isinstance(obj, dict):
        raise PotionError(f"checkpoint {what} must be a dict, got {type(obj).__name__}")
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise PotionError(f"checkpoint {what} must be JSON-able (str, numbers, lists, dicts): {e}") from None


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Start training from local weights: a Potion checkpoint, a safetensors file or a
    plain state_dict file (e.g. timm's ``pytorch_model.bin`` fetched beforehand).

    Entries whose shape differs from the model (typically the classifier head of another
    class count) are skipped and returned, so fine-tuning on a new label set works.
    """
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"initial weights {path} do not exist; give a local .pt/.bin/.safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PotionError(f"cannot read initial weights {path}: the file is truncated, damaged or not a "
                          "torch/safetensors file", detail=detail_of(e)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PotionError(f"initial weights {path} hold a {type(state).__name__}, not a dict of tensors (a state_dict)")
    own = model.state_dict()
    usable = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise PotionError(f"no tensor of {path} fits the model: it was saved for another architecture")
    ints = not_floating(own, usable)
    if ints:
        raise PotionError(f"initial weights {path}: {len(ints)} tensors are not floating point where the model's are "
                          f"(first: {ints[0]}); give the float weights")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    return skipped
