"""Turns a PTN step k into a measured StepResult, the one way every search backend does it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from potion.errors import PotionError
from potion.metrics import batches_accuracy
from potion.unlearning.dampening import RatioQuantiles, dampen, importance_ratios, percentile_for_share
from potion.unlearning.proxy import ProxyBase, proxy_accs, proxy_base, proxy_counts, split_proxy
from potion.unlearning.ptn import PTNConfig, StepResult, share_at_step

Tensor = torch.Tensor


def _to_device(batches: Iterable, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    out = []
    for batch in batches:
        x, y = batch[0], batch[1]
        out.append((x.to(device), y.to(device)))
    return out


class StepEvaluator:
    """Evaluates PTN steps k for one (θ0, I_f, I_r, Sf).

    θ0 is cloned on construction and never modified; every θ_k is built from it afresh.
    ``model`` is scratch space: each evaluation loads θ_k into it.
    ``val_batches`` (optional) is a sequence of (x, y) batches or a callable returning
    an iterable of them; it is re-read for every step. ``proxy_batches`` (optional, the
    damage guard's clean slice of Dr) is measured at every step (outside ``forget_only``)
    and split into its target-labelled part (labels that occur in Sf) and the rest;
    target-labelled images that θ0 sees like the found poison
    (:mod:`potion.unlearning.proxy_split`) are left out.
    """

    def __init__(
        self,
        model: nn.Module,
        state0: Mapping[str, Tensor],
        imp_f: Mapping[str, Tensor] | None,
        imp_r: Mapping[str, Tensor] | None,
        forget_batches: Sequence,
        n_forget: int,
        n_total: int,
        config: PTNConfig | None = None,
        val_batches: Sequence | Callable[[], Iterable] | None = None,
        device: str | torch.device = "cpu",
        fast: bool = False,
        proxy_batches: Sequence | None = None,
    ):
        self.config = config or PTNConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # CUDA only: channels-last weights and half-precision autocast for the accuracy
        # checks; θ_k itself is still built in fp32 from fp32 importances.
        self.fast = bool(fast) and self.device.type == "cuda"
        if self.fast:
            self.model.to(memory_format=torch.channels_last)
        self.state0 = {n: t.detach().to(self.device).clone() for n, t in state0.items()}
        # without importances it only measures given states (evaluate_state): no step k to build
        self.imp_f = {n: t.to(self.device) for n, t in (imp_f or {}).items()}
        self.imp_r = {n: t.to(self.device) for n, t in (imp_r or {}).items()}
        self.forget_batches = _to_device(forget_batches, self.device)
        if not self.forget_batches:
            raise PotionError("the deletion set is empty: PTN needs at least one identified poisoned sample")
        self.n_forget, self.n_total = int(n_forget), int(n_total)
        share_at_step(0, self.n_forget, self.n_total, self.config.buffer, self.config.step)  # validates sizes
        if val_batches is not None and not callable(val_batches) and not isinstance(val_batches, Sequence):
            val_batches = list(val_batches)  # a one-shot iterator would be empty from step 2 on
        self.val_batches = val_batches
        self.quantiles = RatioQuantiles(importance_ratios(imp_f, imp_r)) if imp_f is not None else None
        self._acc0: float | None = None
        self.proxy_batches = None if proxy_batches is None else _to_device(proxy_batches, self.device)
        if self.proxy_batches is not None and not self.proxy_batches:
            raise PotionError("the clean proxy is empty: give the damage guard at least one retain sample")
        # Sf carries the poisoned labels: they name the target class(es) without ground truth
        self.target_labels = torch.unique(torch.cat([y.reshape(-1) for _, y in self.forget_batches]))
        self._proxy_base: ProxyBase | None = None
        self._proxy_masks: list[tuple[Tensor, Tensor]] | None = None
        self._proxy_excluded = 0

    # -- the maths of one step ------------------------------------------------------
    def share(self, k: int) -> float:
        return share_at_step(k, self.n_forget, self.n_total, self.config.buffer, self.config.step)

    def alpha(self, k: int) -> float:
        if self.quantiles is None:
            raise PotionError("this StepEvaluator was built without importances: it measures states, not steps k")
        return self.quantiles.percentile(percentile_for_share(self.share(k)))

    def _dampened(self, k: int) -> tuple[dict[str, Tensor], float, int]:
        alpha = self.alpha(k)
        state, n_sel = dampen(self.state0, self.imp_f, self.imp_r, alpha, 1.0)
        return state, alpha, n_sel

    def healed_state(self, k: int) -> dict[str, Tensor]:
        return self._dampened(k)[0]

    # -- measuring ------------------------------------------------------------------
    @contextmanager
    def _eval_mode(self):
        """The model in eval mode, every module's own mode restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _accuracy(self, batches: Iterable) -> float:
        with self._eval_mode():
            return batches_accuracy(self.model, batches, self.device, self.fast)

    def _val_accuracy(self) -> float | None:
        if self.val_batches is None:
            return None
        batches = self.val_batches() if callable(self.val_batches) else self.val_batches
        return self._accuracy(batches)

    def _split_proxy(self) -> None:
        """Once, at θ0: which proxy images count (all but the poison-like target-labelled ones)."""
        if self._proxy_masks is not None:
            return
        self.model.load_state_dict(self.state0)
        with self._eval_mode():
            self._proxy_masks, self._proxy_excluded = split_proxy(
                self.model, self.proxy_batches, self.forget_batches, self.target_labels, self.device)

    def _proxy_counts(self) -> tuple[int, int, int, int]:
        """The proxy counts of the model's current weights (see :func:`proxy_counts`)."""
        with self._eval_mode(), torch.no_grad():
            return proxy_counts(self.model, self.proxy_batches, self._proxy_masks)

    @property
    def proxy_base(self) -> ProxyBase | None:
        """θ0 on the proxy (computed once), or None without a proxy."""
        if self.proxy_batches is None:
            return None
        if self._proxy_base is None:
            self._split_proxy()
            self.model.load_state_dict(self.state0)
            self._proxy_base = proxy_base(self._proxy_counts(), self._proxy_excluded)
        return self._proxy_base

    @property
    def acc0(self) -> float:
        """θ0's accuracy on Sf against the poisoned labels (computed once)."""
        if self._acc0 is None:
            self.model.load_state_dict(self.state0)
            self._acc0 = self._accuracy(self.forget_batches)
        return self._acc0

    def forget_accuracy(self) -> float:
        """The model's current weights on Sf (its poisoned labels)."""
        return self._accuracy(self.forget_batches)

    @property
    def threshold(self) -> float:
        return self.config.rho * self.acc0

    def crossed(self, result: StepResult) -> bool:
        return result.acc_forget <= self.threshold

    @contextmanager
    def forget_only(self):
        """Steps measured on Sf (and the validation batches) alone while inside: the damage
        guard runs the paper's search this way and measures the proxy only where it asks."""
        proxy, self.proxy_batches = self.proxy_batches, None
        try:
            yield self
        finally:
            self.proxy_batches = proxy

    def evaluate(self, k: int) -> StepResult:
        state, alpha, n_sel = self._dampened(k)
        return self.evaluate_state(state, k, alpha, n_sel)

    def evaluate_state(self, state: Mapping[str, Tensor], k: int, alpha: float = float("nan"),
                       n_selected: int = 0) -> StepResult:
        """Any θ (e.g. a dampened model after a repair) measured as step k is: Sf, validation, proxy."""
        if self.proxy_batches is not None:
            self._split_proxy()  # at θ0, before θ is loaded
        self.model.load_state_dict(state)
        del state
        proxy = (None, None, None) if self.proxy_batches is None else proxy_accs(self._proxy_counts())
        return StepResult(
            k=int(k),
            s=self.share(k),
            alpha=alpha,
            lam=1.0,
            n_selected=n_selected,
            acc_forget=self.forget_accuracy(),
            acc_val=self._val_accuracy(),
            acc_proxy=proxy[0],
            acc_proxy_target=proxy[1],
            acc_proxy_other=proxy[2],
        )

    def evaluate_many(self, ks: Sequence[int]) -> list[StepResult]:
        """Hook for parallel backends; locally the steps run one after another."""
        return [self.evaluate(k) for k in ks]
