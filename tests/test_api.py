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
    # the default, potion_plus, given the same sets as `potion heal`: it grew the deletion set
    # from the target-labelled retain samples and had clean samples for NegGrad+ (measured: 25
    # found → 80, NegGrad+ not kept on this MLP, so the guard dampened: a measured step, and why)
    plus = report["info"]["plus"]
    assert report["method"] == "potion_plus" and plus["n_forget_grown"] > report["n_forget"]
    assert plus["repair_images"] > 0 and plus["neggrad"]["checks"]
    assert isinstance(report["k_star"], int) and report["k_star"] in [t["k"] for t in report["trace"]]
    assert report["info"]["guard"]["reason"]
    assert ns["asr_before"] > 0.9 and ns["asr_after"] < 0.5 * ns["asr_before"]
    assert ns["acc_after"] > ns["acc_before"] - 0.05
    assert (tmp_path / "healed_state.pt").is_file()


def _digits_mlp():
    """An MLP on 600 digits with a corner-patch backdoor to label 0 on 30 of them."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    d = load_digits()
    x = torch.tensor(d.images[:600], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target[:600])
    bad = np.flatnonzero(d.target[:600] != 0)[:30]  # a corner patch and label 0 on 30 of them
    x[bad, :, :2, :2] = 1.0
    y[bad] = 0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, x, y, bad


def test_heal_model_takes_datasets_loaders_and_batches_alike():
    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset

    import potion
    from potion.unlearning.ptn import PTNConfig

    net, x, y, bad = _digits_mlp()
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}
    found = bad[:10]
    rest = np.setdiff1d(np.arange(600), found)
    forget, retain = TensorDataset(x[found], y[found]), TensorDataset(x[rest], y[rest])
    cfg = PTNConfig(step=1.5)
    ks = []
    for deletion, kept in [(forget, retain),
                           (DataLoader(forget, batch_size=64), DataLoader(retain, batch_size=64)),
                           ([(x[found], y[found])], [(x[rest[i:i + 64]], y[rest[i:i + 64]]) for i in range(0, 590, 64)]),
                           (found.tolist(), None)]:
        net.load_state_dict(theta0)
        out = potion.heal_model(net, deletion=deletion, retain=kept, train=TensorDataset(x, y), ptn=cfg,
                                method="xlf_ptn")
        assert out.report["n_forget"] == 10 and out.report["n_total"] == 600
        ks.append(out.report["k_star"])
    assert len(set(ks)) == 1 and isinstance(ks[0], int), ks


def test_the_default_takes_its_sets_from_one_pass_of_a_shuffling_loader():
    """A shuffling DataLoader orders every pass anew: the proxy, the repair slice and the
    target-labelled rows potion_plus grows Sf from are cut from one pass, so each holds what
    it should (all 0-labelled rows as candidates; x and y still paired)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import potion

    net, x, y, bad = _digits_mlp()
    found = bad[:10]
    rest = np.setdiff1d(np.arange(600), found)
    retain = DataLoader(TensorDataset(x[rest], y[rest]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    out = potion.heal_model(net, deletion=TensorDataset(x[found], y[found]), retain=retain)
    plus = out.report["info"]["plus"]
    assert out.report["method"] == "potion_plus"
    assert plus["expansion"]["candidates"] == int((y[rest] == 0).sum())
    assert plus["n_forget_grown"] > 10 and plus["repair_images"] > 0

    # the rows themselves: tag each retain row with its index in x, then split a shuffled pass
    from potion.api import _retain_slices
    from potion.heal.sets import draw_proxy, draw_repair

    tagged = DataLoader(TensorDataset(torch.as_tensor(rest), y[rest]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    proxy = draw_proxy(np.arange(len(rest)), 200, 0)
    sets = _retain_slices(tagged, len(rest), proxy, draw_repair(np.arange(len(rest)), proxy, 300, 0),
                          torch.tensor([0]))
    rows = {name: sets[name][0] for name in sets}
    assert all(torch.equal(y[rows[name][0]], rows[name][1]) for name in rows)  # x and y still paired
    assert (rows["suspects"][1] == 0).all() and len(rows["suspects"][1]) == int((y[rest] == 0).sum())
    assert len(rows["proxy"][0]) == 200 and len(rows["repair"][0]) == 300
    assert not np.isin(rows["proxy"][0].numpy(), rows["repair"][0].numpy()).any()
