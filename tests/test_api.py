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


def test_heal_model_takes_datasets_loaders_and_batches_alike():
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import potion
    from potion.unlearning.ptn import PTNConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(200, 1, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)  # the model's own labels: it gets the deletion set right at θ0
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}
    forget, retain = TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])
    cfg = PTNConfig(step=1.5)
    k = []
    for deletion, kept in [(forget, retain),
                           (DataLoader(forget, batch_size=64), DataLoader(retain, batch_size=64)),
                           ([(x[:10], y[:10])], [(x[10:74], y[10:74]), (x[74:138], y[74:138]), (x[138:], y[138:])])]:
        net.load_state_dict(theta0)
        out = potion.heal_model(net, deletion=deletion, retain=kept, ptn=cfg, method="xlf_ptn")
        assert out.report["n_forget"] == 10 and out.report["n_total"] == 200
        k.append(out.report["k_star"])
    assert k[0] == k[1] == k[2] and isinstance(k[0], int)
