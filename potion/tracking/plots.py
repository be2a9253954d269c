"""The trade-off figure logged on a heal's parent run."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from potion.tracking.steps import step_fields

# How the plot names a step's accuracy fields; a field not listed here (a new one) is
# plotted under its own name.
CURVE_LABELS = {
    "acc_forget": "accuracy on the deletion set",
    "acc_val": "clean validation accuracy",
    "acc_proxy": "clean proxy accuracy",
}
K_AXIS_LABEL = "search step k (each step dampens more parameters)"
DAMAGE_AXIS_LABEL = "proxy damage (points; 0 = θ0)"
# The guard's own measurements are drawn as damage in points, on their own axis.
GUARD_FIELDS = ("acc_proxy", "acc_proxy_target", "acc_proxy_other")


def _points(x: float) -> str:
    return f"{x:g} point" + ("" if x == 1 else "s")


def curve_fields(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The accuracy fields (``acc_*``) that at least one step has a value for."""
    keys = [f for f in step_fields() if f.startswith("acc_")]
    keys += sorted({k for d in steps for k in d if k.startswith("acc_") and k not in keys})
    return [k for k in keys if any(d.get(k) is not None for d in steps)]


def decision_title(steps: Sequence[Mapping[str, Any]], k_star: int | None, guard: Mapping[str, Any] | None) -> str:
    """The decision in one or two lines: which step was kept, and why."""
    by_k = {int(d["k"]): d for d in steps}
    if k_star is None or k_star not in by_k:
        if guard:
            return (f"No step kept: every step that heals costs more than δ = "
                    f"{_points(float(guard.get('max_damage') or 0.0))} of proxy accuracy")
        return f"No step kept: no step of {len(steps)} reached the stop line"
    alpha = by_k[k_star].get("alpha")
    head = f"Kept step k = {k_star}" + (f" (α = {alpha:.3g})" if alpha is not None else "")
    if not guard:
        return f"{head}: the first step below the stop line, of {len(steps)} evaluated"
    status, paper = guard.get("status"), guard.get("k_paper")
    dmg = (guard.get("damage") or {}).get(str(k_star))
    delta = _points(float(guard.get("max_damage") or 0.0))
    cost = f"proxy damage {dmg:+.2f} points" if dmg is not None else "proxy damage not measured"
    why = {
        "k_star": f"the first step below the stop line; {cost}, within δ = {delta}",
        "ahead": f"past the first crossing k = {paper}, heals more; {cost}, within δ",
        "partial": f"a partial heal: k = {paper} would break δ = {delta}; {cost}",
        "damage_allowed": f"--allow-damage took the first crossing although it breaks δ; {cost}",
    }.get(status, cost)
    return f"{head}:\n{why}"


def tradeoff_figure(steps: Sequence[Mapping[str, Any]], threshold: float | None = None, k_star: int | None = None,
                    guard: Mapping[str, Any] | None = None):
    """Accuracy against the search step k (top), with the stop line ρ·acc0 and the kept step
    marked; with ``guard`` a second panel holds the proxy damage in points against the bound
    −δ (0 is θ0). At most six legend entries; the vertical lines are labelled on the plot.
    Uses the Agg canvas, never a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = sorted(steps, key=lambda d: d["k"])
    fig = Figure(figsize=(7.5, 6 if guard else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    if guard:
        ax, dx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, dx = fig.add_subplot(), None
    markers = iter("os^vD<>")
    fields = [f for f in curve_fields(steps) if not (guard and f in GUARD_FIELDS)]
    for key in fields:
        pts = [(d["k"], d[key]) for d in steps if d.get(key) is not None]
        ax.plot(*zip(*pts), f"{next(markers, 'o')}-", ms=3, label=CURVE_LABELS.get(key, key))
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"stop line ρ·acc0 = {threshold:.3f}")
    axes = [ax] + ([dx] if dx is not None else [])
    hit = [d for d in steps if d["k"] == k_star] if k_star is not None else []
    if hit:
        ax.plot([k_star], [hit[0]["acc_forget"]], "*", color="red", ms=12)
        _vline(axes, k_star, "red", "-", f"kept k = {k_star}")
    if guard and guard.get("k_paper") is not None and guard.get("k_paper") != k_star:
        _vline(axes, guard["k_paper"], "gray", "-.", f"first crossing k = {guard['k_paper']}")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")  # the curves run along the top and fall on the right
    if dx is not None:
        pts = [(d["k"], d["proxy_damage"]) for d in steps if d.get("proxy_damage") is not None]
        _damage_panel(dx, pts, float(guard.get("max_damage") or 0.0), "proxy damage where measured", "lower left")
    axes[-1].set_xlabel(K_AXIS_LABEL)
    ax.set_title(decision_title(steps, k_star, guard), fontsize=10)
    fig.tight_layout()
    return fig


def neggrad_figure(record: Mapping[str, Any], max_damage: float):
    """potion_plus's NegGrad+ checks (``record``: its ``info.plus.neggrad``), from θ0 at update
    0: held-out and deletion-set accuracy against the update (top) with the stop line, proxy
    damage against −δ (bottom), the kept update marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start = {"step": 0, "acc_held_out": record.get("acc0_held_out"), "acc_forget": record.get("acc0"), "damage": 0.0}
    checks = [start, *sorted(record.get("checks") or [], key=lambda c: c["step"])]
    threshold, picked = record.get("threshold"), record.get("picked")
    fig = Figure(figsize=(7.5, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax, dx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps = [c["step"] for c in checks]
    ax.plot(steps, [c.get("acc_held_out") for c in checks], "o-", ms=3, label="held-out part of the deletion set")
    ax.plot(steps, [c.get("acc_forget") for c in checks], "s-", ms=3, label="deletion set (whole)")
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"stop line ρ·acc0 = {threshold:.3f}")
    pts = [(c["step"], c["damage"]) for c in checks if c.get("damage") is not None]
    _damage_panel(dx, pts, max_damage, "proxy damage", "lower right")
    net = [(c["step"], c["damage"] - c["erosion"]) for c in checks if c.get("erosion") is not None]
    if net:  # the erosion control ran (potion.unlearning.neggrad_guard): what counts against δ
        dx.plot(*zip(*net), "v--", ms=4, color="tab:olive", label="beyond a plain fine-tune's erosion")
        dx.legend(fontsize=7, loc="lower right")
    if picked is not None:
        _vline([ax, dx], picked, "red", "-", f"kept update {picked}")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper right")  # the accuracies start high on the left and fall
    dx.set_xlabel("NegGrad+ update (clean batch descended, deletion set ascended)")
    eroded = any(c["step"] == picked and c.get("erosion") is not None for c in checks)
    beyond = " beyond a plain fine-tune's erosion" if eroded else ""
    ax.set_title(f"Kept update {picked}: the latest check within δ{beyond} below the stop line" if picked is not None
                 else "No update kept: the heal went on to dampening", fontsize=10)
    fig.tight_layout()
    return fig


def _damage_panel(dx, pts: Sequence[tuple[float, float]], delta: float, label: str, legend_at: str) -> None:
    """Proxy damage in points at the measured ``pts`` (x, damage), against 0 (θ0) and −δ."""
    if pts:
        dx.plot(*zip(*pts), "^-", ms=4, color="tab:green", label=label)
    dx.axhline(0.0, color="gray", lw=0.8)
    dx.axhline(-delta, color="tab:red", ls=":", lw=1.2, label=f"allowed damage δ = {_points(delta)}")
    low = min([-delta, *(v for _, v in pts)])
    dx.set_ylim(min(-1.0, low * 1.3), max(0.5, 0.3 * abs(low)))
    dx.set_ylabel(DAMAGE_AXIS_LABEL)
    dx.legend(fontsize=7, loc=legend_at)


def _vline(axes, k: int, color: str, ls: str, text: str) -> None:
    """A vertical line at step k on every panel, labelled at the top of the first."""
    for a in axes:
        a.axvline(k, color=color, lw=1, ls=ls)
    axes[0].annotate(text, (k, 0.5), xytext=(-4, 0), textcoords="offset points", fontsize=7, color=color,
                     ha="right", va="center", rotation=90, bbox={"fc": "white", "ec": "none", "pad": 1})

