"""Loading a user's weights file into a model built from a :class:`~potion.models.spec.ModelSpec`.

Accepted: a bare ``state_dict`` (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a
Potion checkpoint, or a dict holding the weights under ``state_dict`` or ``model``. Pickles
are opened with ``torch.load(weights_only=True)``: a file that holds code is refused, and
the code is never run. A ``module.`` prefix (DataParallel/DDP) is stripped and reported.
The fit is strict: missing or unexpected keys are an error that lists the first few.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from potion.errors import PotionError, detail_of
from potion.models.checkpoint import not_floating
from potion.models.spec import file_sha256

PREFIX = "module."
SHOW = 3


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    path: str
    sha256: str
    layout: str  # state_dict, safetensors, potion-checkpoint, dict['state_dict'], dict['model']
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "layout": self.layout, "notes": list(self.notes)}


def read_weights(path: str | Path) -> LoadedWeights:
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"--weights {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            payload, layout = load_file(str(path)), "safetensors"
        except Exception as e:
            raise PotionError(f"--weights {path} is not a readable safetensors file: it is truncated or damaged",
                              detail=detail_of(e)) from None
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise PotionError(
                f"--weights {path} holds Python objects other than tensors and was refused (Potion never runs "
                f"code from a weights file){_rejected(e)}; save model.state_dict() instead"
            ) from None
        except Exception as e:
            raise PotionError(f"--weights {path} is not a readable torch file: it is truncated, damaged or not a "
                              "torch file", detail=detail_of(e)) from None
        payload, layout = _unwrap(payload, path)
    state, notes = _strip_prefix(payload)
    return LoadedWeights(state, str(path.resolve()), file_sha256(path), layout, notes)


def load_weights(model: nn.Module, weights: LoadedWeights, what: str) -> nn.Module:
    """Load ``weights`` into ``model`` strictly (eval mode); a misfit names the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights.state_dict]
    unexpected = [k for k in weights.state_dict if k not in own]
    shapes = [f"{k} saved {tuple(weights.state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in weights.state_dict and weights.state_dict[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:SHOW])}{', …' if len(missing) > SHOW else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:SHOW])}"
                     f"{', …' if len(unexpected) > SHOW else ''})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:SHOW])})")
    if parts:
        raise PotionError(f"--weights {weights.path} do not fit {what}: " + "; ".join(parts)
                          + "; check --model and --model-args")
    ints = not_floating(own, weights.state_dict)
    if ints:
        raise PotionError(f"--weights {weights.path}: {len(ints)} tensors are not floating point where {what} "
                          f"has floats ({', '.join(ints[:SHOW])}{', …' if len(ints) > SHOW else ''}); "
                          "export the trained float weights (model.state_dict()) instead")
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval()


def _unwrap(payload, path: Path) -> tuple[dict, str]:
    if not isinstance(payload, dict):
        raise PotionError(f"--weights {path} holds a {type(payload).__name__}, not a dict of tensors (a state_dict)")
    if _is_state(payload):
        return payload, "state_dict"
    if payload.get("format", "").startswith("potion-checkpoint") and isinstance(payload.get("state_dict"), dict):
        return payload["state_dict"], "potion-checkpoint"
    for key in ("state_dict", "model"):
        if isinstance(payload.get(key), dict) and _is_state(payload[key]):
            return payload[key], f"dict['{key}']"
    raise PotionError(
        f"--weights {path} is a dict but neither a state_dict nor one holding it under 'state_dict' or 'model' "
        f"(keys: {', '.join(map(str, list(payload)[:5]))})"
    )


def _is_state(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_prefix(state: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    if state and all(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items()}, [
            f"stripped the '{PREFIX}' prefix (DataParallel/DDP) from {len(state)} keys"]
    return dict(state), []


def _rejected(e: Exception) -> str:
    for line in str(e).splitlines():
        if "Unsupported" in line:
            return ": " + line.split(" was not an allowed")[0].strip()
    return ""

