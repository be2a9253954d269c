"""The damage guard's clean proxy: θ0's baseline on it and per-step accuracies of its parts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from potion.unlearning.proxy_split import penultimate_features, poison_like

Tensor = torch.Tensor


@dataclass(frozen=True)
class ProxyBase:
    """θ0 on the proxy: accuracies and sizes of its target-labelled and other parts."""

    acc: float
    acc_target: float | None
    acc_other: float | None
    n: int
    n_target: int
    # target-labelled proxy images that look like the found poison (proxy_split): left out
    n_excluded: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_proxy(
    model: nn.Module,
    proxy_batches: Sequence[tuple[Tensor, Tensor]],
    forget_batches: Sequence[tuple[Tensor, Tensor]],
    target_labels: Tensor,
    device: torch.device,
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Which proxy images count (all but the poison-like target-labelled ones): per batch
    (target-labelled and counted, the rest), and how many were left out.

    ``model`` must hold θ0 and be in eval mode: the split is made once, before any θ_k.
    """
    is_t = [torch.isin(y, target_labels.to(device)) for _, y in proxy_batches]
    forget = penultimate_features(model, (x for x, _ in forget_batches))
    feats = penultimate_features(model, (x[t] for (x, _), t in zip(proxy_batches, is_t) if t.any()))
    like = poison_like(feats, forget).to(device)
    masks, at = [], 0
    for t in is_t:  # (target-labelled and counted, the rest) per batch, for every step
        counted = t.clone()
        n_t = int(t.sum())
        counted[t] = ~like[at:at + n_t]
        at += n_t
        masks.append((counted, ~t))
    return masks, int(like.sum())


def proxy_counts(
    model: nn.Module,
    proxy_batches: Sequence[tuple[Tensor, Tensor]],
    masks: Sequence[tuple[Tensor, Tensor]],
) -> tuple[int, int, int, int]:
    """(correct on target-labelled, target-labelled, correct on the rest, rest), over the
    proxy images that count. ``model`` must be in eval mode, under ``torch.no_grad()``."""
    ct = nt = co = no = 0
    for (x, y), (is_t, is_o) in zip(proxy_batches, masks):
        hit = model(x).argmax(dim=1) == y
        ct += int((hit & is_t).sum())
        nt += int(is_t.sum())
        co += int((hit & is_o).sum())
        no += int(is_o.sum())
    return ct, nt, co, no


def proxy_accs(counts: tuple[int, int, int, int]) -> tuple[float, float | None, float | None]:
    """(all, target-labelled, rest) accuracies from :func:`proxy_counts`; None for an empty part."""
    ct, nt, co, no = counts
    return (ct + co) / (nt + no), (ct / nt if nt else None), (co / no if no else None)


def proxy_base(counts: tuple[int, int, int, int], n_excluded: int) -> ProxyBase:
    """θ0's :class:`ProxyBase` from its :func:`proxy_counts`."""
    acc, acc_t, acc_o = proxy_accs(counts)
    return ProxyBase(acc=acc, acc_target=acc_t, acc_other=acc_o,
                     n=counts[1] + counts[3], n_target=counts[1], n_excluded=n_excluded)
