"""benchmarks/heal_more.py: its smoke mode end to end, every number of its table read back
from the cells' heal reports; and the table arithmetic on hand-made rows."""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import heal_more  # noqa: E402


def _row(method, share, healed, damage, wall, status="ok"):
    return {"method": method, "share_label": share, "one_shot": share == "one", "status": status, "poison": "badnet",
            "n": 0.01, "poison_healed": healed, "model_damage": damage, "wall_s": wall, "note": None}


def test_summary_means_shares_and_one_shot_apart():
    rows = [_row("xlf_ptn", "0.1", 80.0, -1.0, 10.0), _row("xlf_ptn", "1.0", 90.0, -2.0, 30.0),
            _row("xlf_ptn", "one", 50.0, -0.5, 5.0), _row("xlf_ptn", "0.5", None, None, 1.0, status="failed")]
    s = heal_more.summarize(rows, ["xlf_ptn"])["xlf_ptn"]
    assert s["shares"] == {"healed": 85.0, "damage": -1.5, "wall": 20.0, "cells": 2}
    assert s["one"] == {"healed": 50.0, "damage": -0.5, "wall": 5.0, "cells": 1} and s["failed"] == 1
    table = heal_more.markdown(rows, ["xlf_ptn"])
    assert "| xlf_ptn | 85.0 | -1.50 | 20 | 2 | 50.0 | -0.50 | 1 |" in table
    assert "| xlf_ptn | 85.0 / -1.00 / 10 |" not in table and "80.0 / -1.00 / 10" in table and "failed" in table


@pytest.mark.slow
@pytest.mark.ray  # the cells run through potion benchmark's Ray tasks
def test_smoke_table_comes_from_the_heal_reports(tmp_path, capsys):
    out, figs = tmp_path / "work", tmp_path / "figs"
    code = heal_more.main(["--smoke", "--out", str(out), "--figures", str(figs), "--num-cpus", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    reports: dict[str, list[dict]] = {}
    for path in (out / "cells").glob("*/report.json"):
        method = re.fullmatch(r"badnet-n0\.05-(?:one|0\.5)-(.+)-seed0", path.parent.name).group(1)
        rep = json.loads(path.read_text())
        reports.setdefault(method, []).append(rep)
    methods = heal_more.default_methods()
    assert set(reports) == set(methods)
    for method in methods:
        line = next(x for x in printed.splitlines() if x.startswith(f"| {method} | ") and x.count("|") == 9)
        cols = [c.strip() for c in line.strip("|").split("|")]
        shares = [r for r in reports[method] if r["deletion_set"]["size"] > 1]
        one = [r for r in reports[method] if r["deletion_set"]["size"] == 1]
        assert float(cols[1]) == pytest.approx(statistics.fmean(r["after"]["poison_healed"] for r in shares), abs=0.05)
        assert float(cols[2]) == pytest.approx(statistics.fmean(r["after"]["model_damage"] for r in shares), abs=0.005)
        assert int(cols[4]) == len(shares) and int(cols[7]) == len(one)
        if one:
            assert float(cols[5]) == pytest.approx(one[0]["after"]["poison_healed"], abs=0.05)
    # none leaves θ0: nothing healed beyond θ0's own share, no damage
    assert all(r["after"]["model_damage"] == 0 for r in reports["none"])
    png = figs / "heal_more-digits-heal-more-smoke.png"
    assert png.stat().st_size > 5000 and str(png) in printed
