"""One call for notebooks: heal a model you hold in memory.

>>> result = potion.heal_model(model, deletion=found_indices, train=train_dataset)
>>> result.report["k_star"], result.report["alpha"]

It builds a :class:`~potion.unlearning.methods.HealContext` from your model and data and
calls the same ``potion.unlearning.methods.heal`` as ``potion heal``; Ray (the PTN search
as Tune trials) and MLflow (a parent run with the trade-off curve) are optional.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from potion.errors import PotionError
from potion.unlearning.methods import METHODS, HealContext, heal
from potion.unlearning.rows import kept_rows
from potion.unlearning.ptn import PTNConfig

__all__ = ["Healed", "heal_model"]


@dataclass
class Healed:
    model: nn.Module  # the model you passed, now at the healed weights
    state_dict: dict[str, torch.Tensor]
    report: dict[str, Any]  # method, k_star, s, alpha, acc0, threshold, trace, timings, sizes


def heal_model(
    model: nn.Module,
    *,
    deletion,
    retain=None,
    train: Dataset | None = None,
    method: str | None = None,
    ptn: PTNConfig | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    backend: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = "potion-heal",
    progress: bool = False,
) -> Healed:
    """Heal ``model`` in place from the poisoned samples you found.

    ``deletion``: the samples you identified as poison, with the labels the model was
    trained on — a torch ``Dataset``, a ``DataLoader``, a list of ``(x, y)`` batches, or a
    sequence of integer indices into ``train``. ``retain``: the rest of the training set in
    one of the same forms; with indices it defaults to ``train`` without them. The inputs
    must already be transformed as the model expects (normalised tensors).
    """
    if method is None:  # the same default as `potion heal`
        from potion.runs.configs import HealJob

        method = HealJob().method
    METHODS.get(method)
    if backend not in ("local", "ray"):
        raise PotionError(f"backend must be 'local' or 'ray', got '{backend}'")
    if not isinstance(model, nn.Module):
        raise PotionError(f"heal_model needs a torch nn.Module, got {type(model).__name__}")
    deletion, retain = _split(deletion, retain, train)
    forget_batches = list(_batches(deletion, batch_size, "deletion"))
    retain_batches = _batches(retain, batch_size, "retain")
    if not isinstance(retain_batches, (DataLoader, list, tuple)):
        retain_batches = list(retain_batches)  # a one-shot iterator: the importance pass reads it once more
    n_forget, n_retain = _count(forget_batches), _count(retain_batches)
    if n_forget == 0 or n_retain == 0:
        raise PotionError(f"heal_model needs samples in both sets; got {n_forget} to delete and {n_retain} to retain")
    cfg = ptn or PTNConfig()
    model.to(device)
    from potion.heal.sets import GUARDED, draw_proxy, draw_repair, proxy_size

    ctx = HealContext(
        model=model, state0={k: v.detach().clone() for k, v in model.state_dict().items()},
        retain_batches=lambda: retain_batches, forget_batches=forget_batches,
        n_forget=n_forget, n_total=n_forget + n_retain, ptn=cfg, device=device, progress=progress,
        retain_total=len(retain_batches),
    )
    if method in GUARDED:
        plus = method == "potion_plus"
        # the same seeded draws as `potion heal` (potion.heal.run.select_sets), over retain positions
        positions = np.arange(n_retain)
        proxy = draw_proxy(positions, proxy_size(method, ctx.plus, 2000, n_retain), 0)
        repair = draw_repair(positions, proxy, ctx.plus.repair_size, 0) if plus else None
        targets = torch.unique(torch.cat([torch.as_tensor(b[1]).reshape(-1) for b in forget_batches]))
        sets = _retain_slices(retain_batches, n_retain, proxy, repair, targets)
        ctx.proxy_batches = kept_rows(sets["proxy"], None, batch_size)
        if plus:
            ctx.suspect_batches = kept_rows(sets["suspects"], None, batch_size)
            repair_rows = kept_rows(sets["repair"], None, ctx.plus.repair_batch_size, shuffle_seed=0)
            ctx.repair_batches = lambda: iter(repair_rows)
    t0 = time.perf_counter()
    owned_ray = False
    if backend == "ray":
        from potion.distributed.runtime import connect, owned
        from potion.distributed.search import make_ray_search

        connect(address, num_cpus)
        owned_ray = owned()
        ctx.search = make_ray_search(model_factory=_Clone(copy.deepcopy(model).cpu()), gpus_per_trial=0,
                                     progress=progress)
    try:
        result = heal(method, ctx)
    finally:
        if owned_ray:
            from potion.distributed.runtime import shutdown_if_owned

            shutdown_if_owned()
    info = dict(result.info)
    trace = [t.to_dict() if hasattr(t, "to_dict") else t for t in info.pop("trace", []) or []]
    report = {"method": method, "backend": backend, "k_star": info.pop("k_star", None), "s": info.pop("s", None),
              "alpha": info.pop("alpha", None), "n_forget": n_forget, "n_total": n_forget + n_retain,
              "ptn": dataclasses.asdict(cfg), "info": info, "trace": trace,
              "timings": {**result.timings, "wall_s": round(time.perf_counter() - t0, 3)}}
    if tracking_uri:
        _log(tracking_uri, experiment, report)
    return Healed(model, result.state_dict, report)


def _retain_slices(retain_batches, n_retain: int, proxy: np.ndarray, repair: np.ndarray | None,
                   targets: torch.Tensor) -> dict[str, list]:
    """From one pass over the retain samples (a shuffling DataLoader orders every pass anew):
    the rows at the ``proxy`` positions and, with ``repair``, at the ``repair`` positions and
    those under a label of ``targets``, each as a one-batch list for :func:`kept_rows`."""
    masks = {"proxy": np.isin(np.arange(n_retain), proxy)}
    if repair is not None:
        masks["repair"] = np.isin(np.arange(n_retain), repair)
    parts: dict[str, tuple[list, list]] = {}
    at = 0
    for b in retain_batches:
        x, y = b[0], b[1]
        n = len(y)
        sel = {name: torch.from_numpy(m[at:at + n]) for name, m in masks.items()}
        if repair is not None:
            sel["suspects"] = torch.isin(torch.as_tensor(y).reshape(-1).cpu(), targets)
        for name, m in sel.items():
            xs, ys = parts.setdefault(name, ([], []))
            xs.append(x[m])
            ys.append(y[m])
        at += n
    return {name: [(torch.cat(xs), torch.cat(ys))] for name, (xs, ys) in parts.items()}


class _Clone:
    """Rebuilds the architecture in a Ray trial (cloudpickle ships a notebook's class by value)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> nn.Module:
        return copy.deepcopy(self.model)


def _split(deletion, retain, train):
    if _is_indices(deletion):
        if train is None:
            raise PotionError("deletion given as indices needs train= (the Dataset they index)")
        idx = np.unique(np.asarray(deletion, dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= len(train)):
            raise PotionError(f"deletion indices must lie in 0..{len(train) - 1}")
        if retain is None:
            retain = Subset(train, np.setdiff1d(np.arange(len(train)), idx).tolist())
        deletion = Subset(train, idx.tolist())
    elif retain is None:
        raise PotionError("give retain= (the rest of the training set), or the deletion set as indices into train=")
    return deletion, retain


def _is_indices(x) -> bool:
    if isinstance(x, (Dataset, DataLoader)):
        return False
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return isinstance(arr, (Sequence, np.ndarray)) and len(arr) > 0 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in list(arr)[:1000])


def _batches(data, batch_size: int, what: str) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterable):
        return data
    raise PotionError(f"{what}: expected a Dataset, a DataLoader or (x, y) batches, got {type(data).__name__}")


def _count(batches: Iterable) -> int:
    if isinstance(batches, DataLoader) and hasattr(batches.dataset, "__len__") and not batches.drop_last:
        return len(batches.dataset)
    return sum(len(b[1]) for b in batches)


def _log(uri: str, experiment: str, report: dict) -> None:
    from potion.tracking.store import check_tracking
    from potion.tracking.tracker import SearchTracker

    check_tracking(uri)
    params = {"method": report["method"], "backend": report["backend"], "n_forget": report["n_forget"],
              "n_total": report["n_total"], **{f"ptn.{k}": v for k, v in report["ptn"].items()}}
    with SearchTracker(uri, experiment, run_name=f"{report['method']}:heal_model", params=params) as tracker:
        tracker.log_children(report["trace"], k_star=report["k_star"], guard=report["info"].get("guard"))
        tracker.log_curve(report["trace"], threshold=report["info"].get("threshold"), k_star=report["k_star"])
