"""The trade-off figure logged on a heal's parent run."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from potion.tracking.steps import step_fields

# How the plot names a step's accuracy fields; a field not listed here (a new one) is
# plotted under its own name.
CURVE_LABELS = {
    "acc_forget": "a_k: accuracy on the deletion set Sf (poisoned labels)",
    "acc_val": "accuracy on clean validation images",
    "acc_proxy": "accuracy on the clean proxy (from Dr)",
}
S_AXIS_LABEL = "PTN dial s_k = (|Sf| / |D|) / b · c^k  (sets α; may exceed 1)"


def curve_fields(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The accuracy fields (``acc_*``) that at least one step has a value for."""
    keys = [f for f in step_fields() if f.startswith("acc_")]
    keys += sorted({k for d in steps for k in d if k.startswith("acc_") and k not in keys})
    return [k for k in keys if any(d.get(k) is not None for d in steps)]


def tradeoff_figure(steps: Sequence[Mapping[str, Any]], threshold: float | None = None, k_star: int | None = None,
                    guard: Mapping[str, Any] | None = None):
    """Every accuracy a step recorded against PTN's dial s_k, with the threshold ρ·acc0 and
    the chosen step k* marked (with ``guard``: the proxy's poison-corrected curve, θ0's
    proxy accuracy, the bound δ and the paper's k*): the trade-off PTN walks along. s_k is not a share of
    parameters (it feeds the percentile q(s) = 100 − ln(1 + 100·s) that sets α, and grows
    past 1), so the axis says what it is. Uses the Agg canvas, never a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = iter("os^vD<>")
    for key in curve_fields(steps):
        pts = [(d["s"], d[key]) for d in steps if d.get(key) is not None]
        ax.plot(*zip(*pts), f"{next(markers, 'o')}-", ms=3, label=CURVE_LABELS.get(key, key))
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold ρ·acc0 = {threshold:.3f}")
    title = "PTN trade-off"
    hit = [d for d in steps if d["k"] == k_star] if k_star is not None else []
    if hit:
        h = hit[0]
        ax.axvline(h["s"], color="red", lw=1, label=f"k* = {k_star} (s = {h['s']:.3g}, α = {h['alpha']:.3g})")
        ax.plot([h["s"]], [h["acc_forget"]], "*", color="red", ms=12)
        title += f": k* = {k_star} of {len(steps)} steps evaluated"
    base = (guard or {}).get("proxy0") or {}
    if guard and base.get("acc") is not None:
        pts = [(d["s"], base["acc"] + d["proxy_damage"] / 100) for d in steps if d.get("proxy_damage") is not None]
        if pts:
            ax.plot(*zip(*pts), "^-", ms=3, color="tab:green", label="proxy, poison-corrected")
        ax.axhline(base["acc"], color="tab:green", ls=":", lw=1, label="θ0 on the proxy")
        ax.axhline(base["acc"] - guard["max_damage"] / 100, color="tab:red", ls=":", lw=1,
                   label=f"damage bound δ = {guard['max_damage']:g} points")
        paper = [d for d in steps if d["k"] == guard.get("k_paper")]
        if paper and guard.get("k_paper") != k_star:
            ax.axvline(paper[0]["s"], color="gray", lw=1, ls="-.", label=f"paper's k* = {guard['k_paper']}")
    ax.set_title(title)
    ax.set_xscale("log")
    ax.set_xlabel(S_AXIS_LABEL)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="center left")  # the curves run along the top and fall on the right
    fig.tight_layout()
    return fig
