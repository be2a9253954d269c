"""Model factories by name, and checkpoints that remember how to rebuild their model.

Every factory takes the data's shape (``num_classes``, ``in_channels``, ``image_size``)
plus its own keyword arguments, so a checkpoint that records the name and the kwargs can
always rebuild the exact architecture before loading weights.
"""
from __future__ import annotations

import inspect

from torch import nn

from potion.errors import PotionError
from potion.registry import Registry

MODELS: Registry = Registry("model")

_SHAPE_KWARGS = ("num_classes", "in_channels", "image_size")


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    """Build model ``name``; unknown keyword arguments are refused, never ignored."""
    factory = MODELS.get(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PotionError(f"model '{name}': {key} must be a positive integer, got {value!r}")
    _check_kwargs(name, factory, kwargs)
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def model_kwargs(name: str) -> list[str]:
    """The model-specific keyword arguments ``name`` accepts (for help texts and errors)."""
    params = inspect.signature(MODELS.get(name)).parameters
    return [p for p, v in params.items() if p not in _SHAPE_KWARGS and v.kind is not v.VAR_KEYWORD]


def _check_kwargs(name: str, factory, kwargs: dict) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # the factory passes the rest on (vit → timm) and reports unknown ones itself
    unknown = sorted(k for k in kwargs if k not in params or k in _SHAPE_KWARGS)
    if unknown:
        valid = ", ".join(model_kwargs(name)) or "(none)"
        raise PotionError(f"model '{name}' has no parameter '{unknown[0]}'; valid parameters: {valid}")


# Registration happens on import; these must come after MODELS exists.
from potion.models import resnet9, small_cnn, vit, wrn  # noqa: E402,F401
from potion.models.checkpoint import (  # noqa: E402
    Checkpoint,
    load_checkpoint,
    load_init_weights,
    model_from_state,
    save_checkpoint,
)
from potion.models.spec import ModelSpec, parse_model_spec  # noqa: E402
from potion.models.weights import LoadedWeights, load_weights, read_weights  # noqa: E402

__all__ = [
    "MODELS",
    "Checkpoint",
    "LoadedWeights",
    "ModelSpec",
    "load_weights",
    "parse_model_spec",
    "read_weights",
    "create_model",
    "load_checkpoint",
    "load_init_weights",
    "model_from_state",
    "model_kwargs",
    "save_checkpoint",
]
