"""benchmarks/mutations.py runs on request only; here just its --list and that every line it
breaks still exists, once, in the package (a mutation of a line that moved would break nothing)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_list_names_every_mutation_and_each_break_applies_once():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutations.py"), "--list"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from mutations import MUTATIONS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert out[-1] == f"{len(MUTATIONS)} mutations" and len(MUTATIONS) >= 20
    assert [line.split()[0] for line in out[:-1]] == [m.name for m in MUTATIONS]
    for m in MUTATIONS:
        assert (ROOT / m.path).read_text().count(m.old) == 1, m.name
        assert m.old != m.new and all((ROOT / t).exists() for t in m.tests if t.startswith("tests/"))
