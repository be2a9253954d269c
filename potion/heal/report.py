"""Plain-text tables for the terminal."""
from __future__ import annotations

import math


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict], columns: list[str], formats: dict | None = None) -> str:
    """Right-aligned columns; ``formats`` maps a column to its own formatter (default :func:`fmt`)."""
    formats = formats or {}
    cells = [[formats.get(c, fmt)(r.get(c)) if r.get(c) is not None else "-" for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


METRIC_COLUMNS = ["model", "clean_acc", "ra", "asr", "poison_healed", "model_damage"]
# One number format per column: fractions with four decimals, the healed share in percent,
# the damage signed, in points.
METRIC_FORMATS = {"clean_acc": "{:.4f}".format, "ra": "{:.4f}".format, "asr": "{:.4f}".format,
                  "poison_healed": "{:.1f} %".format, "model_damage": "{:+.2f}".format}
METRIC_LEGEND = ("clean_acc: share of clean test images right; ra: share of triggered test images given their true "
                 "class;\nasr: share of triggered images of other classes given the target (all 0-1); poison_healed: "
                 "ra as % of clean_acc;\nmodel_damage: change in clean_acc, percentage points (negative = lost)")


def heal_rows(report: dict) -> list[dict]:
    """'none' (θ0) and the healed model, as rows of the before/after table."""
    b, a = report["before"], report["after"]
    return [
        {"model": "none (θ0)", **b, "poison_healed": report["before_poison_healed"], "model_damage": 0.0},
        {"model": report["method"], **a},
    ]


def heal_table(report: dict) -> str:
    total = report["deletion_set"].get("n_poison_total")
    of = f" of {total} poisoned" if total is not None else ""
    kept = _neggrad_kept(report)
    step = (f"NegGrad+ update {kept['step']}" if kept else
            f"k*={report.get('k_star')} alpha={fmt(report.get('alpha'))}")
    head = f"method {report['method']} ({report['backend']}), deletion set {report['deletion_set']['size']}{of}; {step}"
    note = report["before"].get("note")
    return (head + "\n" + metric_table(report) + (f"\n{note}" if note else "") + guard_lines(report)
            + plus_lines(report))


def plus_lines(report: dict) -> str:
    """The terminal's line on what potion_plus did ('' for other methods)."""
    story = plus_story(report)
    return f"\npotion_plus: {story}" if story else ""


def _neggrad_kept(report: dict) -> dict | None:
    """The NegGrad+ check potion_plus kept as the healed model, if it kept one."""
    ng = ((report.get("info") or {}).get("plus") or {}).get("neggrad") or {}
    return next((c for c in ng.get("checks") or [] if c.get("step") == ng.get("picked")), None)


def _eroded(check: dict) -> str:
    """How much of a kept NegGrad+ check's proxy damage the erosion control put down to the
    fine-tune itself ('' when the control did not run)."""
    e = check.get("erosion")
    if e is None:
        return ""
    return (f", of which {e:+.2f} a plain fine-tune on the same clean images costs the proxy too (θ0's memory of "
            f"its training images fading, which the test split does not see), so {check['damage'] - e:+.2f} beyond it")


def plus_story(report: dict) -> str:
    """What potion_plus did beyond the guard, in plain words ('' for other methods): how far it
    grew the deletion set, and whether its NegGrad+ step was kept and why."""
    p = (report.get("info") or {}).get("plus")
    if not p:
        return ""
    size, grown = report["deletion_set"]["size"], p.get("n_forget_grown", report["deletion_set"]["size"])
    exp = p.get("expansion") or {}
    block = exp.get("block")
    by = f"θ0's block {block['layer']}" if block else "θ0's penultimate features"
    if not p.get("expand"):
        parts = ["the deletion set was not grown (plus.expand=false)"]
    elif grown > size:
        parts = [f"the deletion set grew from {size} to {grown} samples: {grown - size} of the "
                 f"{exp.get('candidates')} training images under its label look like the found poison to {by}"]
    else:
        parts = [f"none of the {exp.get('candidates', 0)} training images under the deletion set's label looked "
                 f"like the found poison to θ0, so the deletion set stayed at {size}"]
    ng, kept = p.get("neggrad"), _neggrad_kept(report)
    dampened = "the damage guard dampened the " + ("grown set" if grown > size else "deletion set")
    delta = ((report.get("config") or {}).get("guard") or {}).get("max_damage")
    if not p.get("neggrad_steps"):
        parts.append(f"NegGrad+ was off (plus.neggrad_steps=0), so {dampened}")
    elif ng is None:
        parts.append(f"NegGrad+ was skipped ({grown} samples, fewer than plus.neggrad_min_forget="
                     f"{p.get('neggrad_min_forget')} to hold a fifth out), so {dampened}")
    elif kept:
        pasted = (f", {ng['transplant']} of them per update with the trigger estimated from the deletion set "
                  f"pasted on" if ng.get("transplant") else "")
        parts.append(f"NegGrad+ (training on clean images{pasted} while unlearning the deletion set) was kept at "
                     f"update {kept['step']} of {p.get('neggrad_steps')}: the {ng.get('held_out')} held-out deletion "
                     f"samples fell to {kept['acc_held_out']:.3f} accuracy (stop line {ng['threshold']:.3f}) at proxy "
                     f"damage {kept['damage']:+.2f} points{_eroded(kept)}, within δ={delta:g}; no dampening was needed")
    else:
        parts.append(f"NegGrad+ was not kept ({ng.get('reason')}), so {dampened}")
    return "; ".join(parts) + "."


def metric_table(report: dict) -> str:
    """The before/after table with its legend line."""
    return format_table(heal_rows(report), METRIC_COLUMNS, METRIC_FORMATS) + "\n" + METRIC_LEGEND


HEADLINE = ["poison_healed", "model_damage", "asr", "clean_acc", "ra"]  # what a run page shows first


def before_after_metrics(report: dict) -> dict[str, float]:
    """``after_<m>`` then ``before_<m>`` for every column of the before/after table, the
    headline first: the numbers an MLflow parent run carries, in the order it lists them."""
    out = {}
    for row, prefix in reversed(list(zip(heal_rows(report), ("before_", "after_")))):
        for key in HEADLINE:
            if isinstance(row.get(key), (int, float)):
                out[prefix + key] = float(row[key])
    return out


def guard_lines(report: dict) -> str:
    """What the damage guard saw and why it chose its step (xlf_ptn_guard only)."""
    g = (report.get("info") or {}).get("guard")
    if not g:
        return ""
    p0, proxy = g.get("proxy0") or {}, report.get("proxy") or {}
    k = report.get("k_star")
    dmg = (g.get("damage") or {}).get(str(k))
    return (f"\ndamage guard: δ={g.get('max_damage'):g} points on a clean proxy of {proxy.get('size', p0.get('n'))} "
            f"retain images, {p0.get('n_excluded', 0)} of them left out as poison-like (θ0: {fmt(p0.get('acc'))}); "
            f"chosen k={k} (proxy damage {'-' if dmg is None else f'{dmg:+.2f}'} points), paper's "
            f"k*={g.get('k_paper')}\n  why: {g.get('reason')}")


# ---------------------------------------------------------------- the MLflow run's description
DESCRIPTION_ROWS = [  # (column, name, unit, what it is)
    ("clean_acc", "clean accuracy", "fraction", "clean test images classified correctly"),
    ("asr", "ASR", "fraction", "triggered test images of other classes classified as the attack's target"),
    ("poison_healed", "poison healed", "%", "triggered test images classified as their true class, "
                                            "relative to clean accuracy"),
    ("model_damage", "damage", "points", "change in clean accuracy, in percentage points (negative = lost)"),
]


def run_description(report: dict) -> str:
    """Markdown for the parent run's description: what was chosen, why, what it healed, what it cost."""
    k, alpha = report.get("k_star"), report.get("alpha")
    size = report["deletion_set"]["size"]
    lines = [f"**{report['method']}** ({report['backend']}) healed with a deletion set of {size} images.", ""]
    if k is not None:
        lines += [f"Kept step **k\\* = {k}**, dampening strength **α = {fmt(alpha)}** (parameters whose importance "
                  "for the deletion set exceeds α times their importance for the rest of the training data are "
                  "scaled down).", ""]
    lines += ["| | " + " | ".join(name for _, name, _, _ in DESCRIPTION_ROWS) + " |",
              "|---|" + "---:|" * len(DESCRIPTION_ROWS)]
    for row in heal_rows(report):
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row.get(col), unit) for col, _, unit, _ in
                                                          DESCRIPTION_ROWS) + " |")
    lines += [""] + [f"- *{name}*: {what}." for _, name, _, what in DESCRIPTION_ROWS]
    story = guard_story(report)
    if story:
        lines += ["", f"**Damage guard:** {story}"]
    story = plus_story(report)
    if story:
        lines += ["", f"**potion_plus:** {story[0].upper()}{story[1:]}"]
    return "\n".join(lines)


def _cell(v, unit: str) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return "-"
    return {"fraction": lambda x: f"{100 * x:.1f} %", "%": lambda x: f"{x:.1f} %",
            "points": lambda x: f"{x:+.2f}"}[unit](v)


def guard_story(report: dict) -> str:
    """The damage guard's decision in plain words (xlf_ptn_guard only; '' otherwise)."""
    g = (report.get("info") or {}).get("guard")
    if not g:
        return ""
    k, paper, delta = report.get("k_star"), g.get("k_paper"), f"{g.get('max_damage'):g}"
    n = (report.get("proxy") or {}).get("size", (g.get("proxy0") or {}).get("n"))
    dmg = (g.get("damage") or {}).get(str(k))
    cost = f"costs {max(0.0, -dmg):.2f} points" if dmg is not None else "has no measured cost"
    proxy = f"{n} held-out clean training images (the proxy)"
    told = {
        "k_star": f"the search's step k*={k} {cost} of accuracy on {proxy}, within the allowed {delta} points, "
                  "so it was kept.",
        "ahead": f"a step past the search's first crossing (k={paper}), k={k}, heals more and {cost} on {proxy}, "
                 f"within the allowed {delta} points.",
        "partial": f"the search's step k={paper} would cost more than the allowed {delta} points on {proxy}; "
                   f"k={k} {cost}, so the model is only partly healed.",
        "damage_allowed": f"the search's step k={paper} costs more than the allowed {delta} points on {proxy}, "
                          "but --allow-damage kept it anyway.",
    }.get(g.get("status"), "")
    return f"{told} (Guard's record: {g.get('reason')}.)".strip()
