"""What the console says: the heal's grouped --help, the table's legend and formats, the
closing progress line."""
from __future__ import annotations

import io

from potion.cli import build_parser
from potion.heal.report import METRIC_LEGEND, metric_table
from potion.progress import progress_bar


def _heal_help() -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["heal"].format_help()


def test_heal_help_groups_its_flags_in_plain_words():
    text = _heal_help()
    heads = ["input: the model and the poison you found:", "method:", "search: how far to dampen (PTN):",
             "damage guard (potion_plus, xlf_ptn_guard):", "Ray:", "output:"]
    at = [text.index("\n" + h + "\n") for h in heads]
    assert at == sorted(at)
    sections = dict(zip(heads, (text[a:b] for a, b in zip(at, at[1:] + [len(text)]))))
    assert "--rho" in sections["search: how far to dampen (PTN):"]
    assert "--max-damage" in sections["damage guard (potion_plus, xlf_ptn_guard):"]
    assert "--address" in sections["Ray:"] and "--window" in sections["Ray:"]
    assert "--out" in sections["output:"] and "--tracking-uri" in sections["output:"]
    # the first words of a flag's help are plain; the paper's symbol comes after, in brackets
    assert "stop once the deletion-set accuracy falls" in " ".join(text.split())
    assert "PTN stop threshold" not in text and "PTN step c" not in text


def _report():
    return {"method": "xlf_ptn", "before": {"clean_acc": 0.98, "ra": 0.1, "asr": 0.9},
            "after": {"clean_acc": 0.97, "ra": 0.8, "asr": 0.05, "poison_healed": 82.47, "model_damage": -1.0},
            "before_poison_healed": 10.2}


def test_the_table_has_one_format_per_column_and_a_legend_with_units():
    lines = metric_table(_report()).splitlines()
    assert lines[2].split() == ["none", "(θ0)", "0.9800", "0.1000", "0.9000", "10.2", "%", "+0.00"]
    assert lines[3].split() == ["xlf_ptn", "0.9700", "0.8000", "0.0500", "82.5", "%", "-1.00"]
    legend = "\n".join(lines[4:])
    assert legend == METRIC_LEGEND
    for term in ("clean_acc:", "ra:", "asr:", "poison_healed:", "model_damage:", "percentage points", "0-1"):
        assert term in legend, term


def test_the_closing_line_gives_the_total_once():
    out = io.StringIO()
    with progress_bar(desc="search", unit="step", stream=out) as bar:
        for _ in range(4):
            bar.update(1)
        bar.set_postfix_str("done: k*=3")
    lines = out.getvalue().splitlines()
    assert lines[-2].startswith("search: 4 step (") and lines[-1].startswith("search: 4 step in total (")
    assert lines[-1].endswith("done: k*=3") and len(lines) == 4  # 1, 2, 4, then the end
    out = io.StringIO()
    with progress_bar(total=3, desc="x", unit="it", stream=out) as bar:
        bar.update(3)
    assert out.getvalue().splitlines() == ["x: 3/3 it (0 s)"]  # nothing new at the end: no second line


def test_the_headline_metrics_come_first():
    from potion.heal.report import before_after_metrics

    keys = list(before_after_metrics(_report()))
    assert keys[:4] == ["after_poison_healed", "after_model_damage", "after_asr", "after_clean_acc"]
    assert len(keys) == 10 and keys[5:] == [k.replace("after_", "before_") for k in keys[:5]]
