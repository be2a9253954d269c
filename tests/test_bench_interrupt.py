"""Ctrl-C during `potion benchmark`: the message says how many finished cells are kept, and
they are: the same command resumes and runs only the rest."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_benchmark import TINY

REPO = Path(__file__).resolve().parents[1]

# two cells ("one" and 0.5 of the poison) healed with "none" from one tiny model
SUITE = {**TINY, "name": "interrupt", "model": {"name": "small_cnn", "args": {"width": 8}},
         "recipe": {**TINY["recipe"], "iterations": 20}, "methods": ["none"]}

# Ctrl-C arrives right after the first cell was recorded, as a user's would between two cells.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import potion.bench.run as run
    from potion.cli import main
    record = run.Runner.record
    def record_then_ctrl_c(self, cell, row):
        record(self, cell, row)
        os.kill(os.getpid(), signal.SIGINT)
    run.Runner.record = record_then_ctrl_c
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.ray  # the cells run as Ray tasks
def test_ctrl_c_keeps_finished_cells_and_the_same_command_resumes(tmp_path):
    suite = tmp_path / "interrupt.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    out = tmp_path / "bench"
    args = ["benchmark", "--suite", str(suite), "--out", str(out), "--num-cpus", "2",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    first = subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 128 + signal.SIGINT, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last == ("potion: interrupted by Ctrl-C (SIGINT); 1 finished cell is kept, "
                    "rerun the same command to resume"), first.stderr[-3000:]
    kept = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert [r["row"]["status"] for r in kept] == ["ok"]

    again = subprocess.run([sys.executable, "-m", "potion", *args], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"suite interrupt: 2 cells, 1 already finished", again.stdout), again.stdout
    assert again.stdout.count("[1/1] ok") == 1  # only the other cell ran
    rows = {r["cell_id"]: r for r in
            (json.loads(p.read_text())["row"] for p in (out / "cells").glob("*.json"))}
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values())
    assert kept[0]["row"]["cell_id"] in rows
