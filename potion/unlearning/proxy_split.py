"""Which target-labelled proxy images look like the poison the owner found.

The damage guard's proxy is a slice of the retain set Dr, and Dr still holds the poison the
owner did not find, under the target label. Once PTN heals the trigger those images leave
the target class, which is healing, not damage. They are told apart from clean
target-class images by θ0's own penultimate features: an image counts as poison-like when
its feature vector is closer (cosine) to the mean feature of the deletion set Sf than to the
mean feature of the target-labelled proxy (mostly clean). Backdoored models map triggered
images of every class to one region of feature space, which is why the found samples
characterise the unfound ones. Measured against the poison manifests (benchmark only):
benchmarks/results/guard.md.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

Tensor = torch.Tensor


def penultimate_features(model: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """The input of the model's last ``nn.Linear`` for every image (its logits when it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: list[Tensor] = []
    hook = linears[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().flatten(1))) if linears else None
    try:
        with torch.no_grad():
            for x in batches:
                out = model(x)
                if hook is None:
                    seen.append(out.detach().flatten(1))
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(seen).float() if seen else torch.zeros(0, 0)


def poison_like(target_features: Tensor, forget_features: Tensor) -> Tensor:
    """Bool mask over ``target_features``: closer (cosine) to Sf's mean than to their own mean."""
    if target_features.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    unit = nn.functional.normalize
    f = unit(target_features, dim=1)
    to_forget = f @ unit(forget_features.mean(0, keepdim=True), dim=1).T
    to_target = f @ unit(target_features.mean(0, keepdim=True), dim=1).T
    return (to_forget > to_target).squeeze(1)
