"""The README's Python example of `potion.heal_model`, run as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    text = README.read_text()
    section = text.split("## Heal your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's 'Heal your own model' section has no Python example"
    return blocks[0]


def test_readme_heal_model_example_runs_and_heals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__main__"}
    exec(compile(readme_python_example(), "README.md", "exec"), ns)
    report = ns["result"].report
    assert isinstance(report["k_star"], int) and report["trace"][-1]["k"] == report["k_star"]
    assert ns["asr_before"] > 0.9 and ns["asr_after"] < 0.5 * ns["asr_before"]
    assert ns["acc_after"] > ns["acc_before"] - 0.05
    assert (tmp_path / "healed_state.pt").is_file()
