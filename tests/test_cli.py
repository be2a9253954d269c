"""The command line end to end on the embedded digits data (tiny training budgets)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from potion.cli import main
from potion.models import create_model, save_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--dataset", "digits", "--poison", "badnet", "--poison-share", "0.05", "--seed", "0",
               "--iterations", "120", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_train_writes_the_run_folder(run_dir, capsys):
    # with no store configured, train logs to sqlite in the run folder (mlflow_run.json names the run)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.json", "mlflow.db",
                                                         "mlflow_run.json", "mlruns", "model.pt", "poison.parquet"]
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("clean_acc", "ra", "asr"):
        assert 0.0 <= m[key] <= 1.0
    # Even 120 iterations learn the digits and most of the trigger.
    assert m["clean_acc"] > 0.8 and m["asr"] > 0.5
    assert "recipe:" in (run_dir / "config.yaml").read_text()


def test_train_refuses_existing_output(run_dir, capsys):
    before = (run_dir / "model.pt").read_bytes()
    assert main(["train", "--dataset", "digits", "--iterations", "2", "--out", str(run_dir), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "model.pt").read_bytes() == before


def test_evaluate_matches_train_metrics(run_dir, capsys):
    assert main(["evaluate", "--run", str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in ("clean_acc", "ra", "asr"):
        assert printed[key] == pytest.approx(stored[key])


def test_heal_local_writes_model_and_report(run_dir, tmp_path, capsys, monkeypatch):
    from potion.datasets.views import LabeledView

    passes = []  # the size of every view the heal iterates over
    real_batches = LabeledView.batches

    def counting(self, *args, **kwargs):
        passes.append(len(self))
        return real_batches(self, *args, **kwargs)

    monkeypatch.setattr(LabeledView, "batches", counting)
    out = tmp_path / "healed"
    rc = main(["heal", "--run", str(run_dir), "--discovery-share", "0.3", "--method", "xlf_ptn", "--backend", "local",
               "--out", str(out), "--quiet", "--step", "1.5", "--strategy", "linear", "--tracking-uri", "none", "--cache-dir", "none"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    for key in ("k_star", "s", "alpha", "rho", "trace", "timings", "before", "after"):
        assert key in rep
    assert rep["trace"][-1]["k"] == rep["k_star"]
    assert rep["deletion_set"]["size"] == round(0.3 * rep["deletion_set"]["n_poison_total"])
    assert {"poison_healed", "model_damage"} <= set(rep["after"])
    # One pass over the retain set (the importances); the search never reads it again.
    n_retain = rep["deletion_set"]["n_train"] - rep["deletion_set"]["size"]
    assert passes.count(n_retain) == 1, passes
    assert rep["timings"]["importance_retain_s"] > 0 and rep["timings"]["search_s"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert main(["evaluate", "--run", str(run_dir), "--checkpoint", str(out / "model.pt")]) == 0
    assert sorted(p.name for p in out.iterdir()) == files  # printed only: nothing written beside the model
    assert main(["evaluate", "--run", str(run_dir), "--checkpoint", str(out / "model.pt"),
                 "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["clean_acc"] == pytest.approx(rep["after"]["clean_acc"])


def test_heal_identified_file_and_its_errors(run_dir, tmp_path, capsys):
    poisoned = pq.read_table(run_dir / "poison.parquet").to_pandas()
    idx = poisoned.loc[poisoned.poisoned, "index"].to_numpy()[:3]
    csv = tmp_path / "found.csv"
    csv.write_text("index\n" + "\n".join(map(str, idx)) + "\n")
    out = tmp_path / "h"
    assert main(["heal", "--run", str(run_dir), "--identified", str(csv), "--method", "none", "--out", str(out),
                 "--quiet", "--tracking-uri", "none"]) == 0
    assert pq.read_table(out / "deletion_set.parquet").column("index").to_pylist() == sorted(idx.tolist())

    empty = tmp_path / "empty.csv"
    empty.write_text("index\n")
    assert main(["heal", "--run", str(run_dir), "--identified", str(empty), "--out", str(tmp_path / "e"),
                 "--tracking-uri", "none"]) == 2
    assert "empty" in capsys.readouterr().err

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"index": pa.array([1, 10**6], pa.int64())}), bad)
    assert main(["heal", "--run", str(run_dir), "--identified", str(bad), "--out", str(tmp_path / "b"),
                 "--tracking-uri", "none"]) == 2
    assert "outside the training set" in capsys.readouterr().err


def test_heal_refuses_run_folder_and_existing_out(run_dir, tmp_path, capsys):
    assert main(["heal", "--run", str(run_dir), "--discovery-count", "1", "--out", str(run_dir / "healed"),
                 "--tracking-uri", "none"]) == 2
    assert "inside" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.pt").write_bytes(b"user's own checkpoint")
    assert main(["heal", "--run", str(run_dir), "--discovery-count", "1", "--out", str(out),
                 "--tracking-uri", "none"]) == 2
    assert (out / "model.pt").read_bytes() == b"user's own checkpoint"


def test_heal_rejects_a_deletion_set_the_model_already_gets_wrong(run_dir, tmp_path, capsys):
    # A model that always predicts class 9 never predicts the target 0 on Sf: acc0 = 0.
    other = tmp_path / "run9"
    other.mkdir()
    for name in ("config.yaml", "poison.parquet"):
        (other / name).write_bytes((run_dir / name).read_bytes())
    model = create_model("resnet9", num_classes=10, in_channels=1, image_size=16, width=0.25)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.weight[9].fill_(1.0)
    save_checkpoint(other / "model.pt", model, "resnet9",
                    {"num_classes": 10, "in_channels": 1, "image_size": 16, "width": 0.25})
    rc = main(["heal", "--run", str(other), "--discovery-share", "0.5", "--out", str(tmp_path / "o"),
               "--tracking-uri", "none", "--cache-dir", "none", "--quiet"])
    assert rc == 2
    assert "misclassifies" in capsys.readouterr().err
    # on_no_crossing=keep (what benchmarks use) keeps θ0 and says why instead.
    rc = main(["heal", "--run", str(other), "--discovery-share", "0.5", "--out", str(tmp_path / "k"),
               "--tracking-uri", "none", "--cache-dir", "none", "--quiet", "--set", "on_no_crossing=keep"])
    assert rc == 0
    rep = json.loads((tmp_path / "k" / "report.json").read_text())
    assert rep["info"]["nothing_to_heal"] and "misclassifies" in rep["info"]["message"]
    assert rep["after"]["model_damage"] == 0 and rep["k_star"] is None
    healed = torch.load(tmp_path / "k" / "model.pt", weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in healed["state_dict"].items())


def test_clear_errors(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = tmp_path / "job.yaml"
    cfg.write_text("recipe:\n  iterationz: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "recipe.iterationz" in capsys.readouterr().err
    assert main(["train", "--dataset", "parquet", "--data-root", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "y")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_class_count_mismatch_is_a_clear_error(run_dir, tmp_path, capsys):
    ckpt = tmp_path / "three.pt"
    save_checkpoint(ckpt, create_model("resnet9", num_classes=3, in_channels=1, image_size=16, width=0.25),
                    "resnet9", {"num_classes": 3, "in_channels": 1, "image_size": 16, "width": 0.25})
    assert main(["evaluate", "--run", str(run_dir), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "3 output classes" in err and "10" in err


def test_every_flag_of_every_command_states_its_default_and_help_opens_with_user_text(capsys):
    import argparse

    from potion.cli import build_parser

    parser = build_parser()
    assert parser.description.startswith("Heal an image classifier")
    assert "Flags become config overrides" not in parser.format_help()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            text = action.help or ""
            if not ("default" in text or "required" in text):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"flags without a stated default: {missing}"


def test_python_dash_m_potion_is_the_same_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "potion", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: potion")


def test_guard_refuses_where_the_papers_k_star_damages_unless_allowed(run_dir, tmp_path, capsys):
    """On this digits model the importance batch size 512 (one batch for all of Dr) makes the
    paper's k* wreck the model; xlf_ptn_guard writes no model, --allow-damage does, and the
    default (potion_plus, the guard's bound on NegGrad+ and on its dampening) wrecks nothing."""
    common = ["--run", str(run_dir), "--discovery-share", "0.3", "--backend", "local", "--quiet",
              "--tracking-uri", "none", "--cache-dir", str(tmp_path / "cache"), "--batch-size", "512",
              "--step", "1.5", "--proxy-size", "300"]
    paper = tmp_path / "paper"
    assert main(["heal", *common, "--method", "xlf_ptn", "--out", str(paper)]) == 0
    rep = json.loads((paper / "report.json").read_text())
    assert rep["after"]["model_damage"] < -5, "the scenario must be one where the paper's k* damages"
    ib = rep["importance_batch_size"]
    assert {k: ib[k] for k in ("value", "auto", "n_retain")} == {
        "value": 512, "auto": False, "n_retain": rep["deletion_set"]["n_train"] - rep["deletion_set"]["size"]}  # an explicit B wins
    assert ib["label_runs"] > ib["n_retain"] // 2 and "note" not in ib  # digits are stored in mixed order
    assert "runs of one label" not in capsys.readouterr().err

    default = tmp_path / "default"
    rc_d = main(["heal", *common, "--out", str(default)])
    if rc_d == 0:
        rep_d = json.loads((default / "report.json").read_text())
        assert rep_d["method"] == "potion_plus" and rep_d["after"]["model_damage"] > rep["after"]["model_damage"] + 3
    else:
        assert rc_d == 2 and not (default / "model.pt").exists()
    capsys.readouterr()

    guarded = tmp_path / "guarded"
    rc = main(["heal", *common, "--method", "xlf_ptn_guard", "--out", str(guarded)])
    healed_model = guarded / "model.pt"
    if rc == 2:  # no step heals within δ: said plainly, with the curve, and no model
        assert "NOT changed" in capsys.readouterr().err and not healed_model.exists()
        refusal = json.loads((guarded / "report.json").read_text())
        assert refusal["healed"] is False and refusal["trace"] and refusal["guard"]["reason"]
        assert refusal["guard"]["proxy0"]["n"] + refusal["guard"]["proxy0"]["n_excluded"] == 300
    else:  # a step within δ: its real damage is far below the paper's
        rep_g = json.loads((guarded / "report.json").read_text())
        assert rep_g["info"]["guard"]["damage"][str(rep_g["k_star"])] >= -1.0
        assert rep_g["after"]["model_damage"] > rep["after"]["model_damage"] + 3

    allowed = tmp_path / "allowed"
    assert main(["heal", *common, "--method", "xlf_ptn_guard", "--allow-damage", "--out", str(allowed)]) == 0
    rep_a = json.loads((allowed / "report.json").read_text())
    # the effect whatever the guarded run did: the paper's k* where the guard would not take
    # it (no step within δ, or only a partial heal), else the guard's own step
    status = "none" if rc == 2 else rep_g["info"]["guard"]["status"]
    if status in ("partial", "none"):
        assert rep_a["k_star"] == rep["k_star"] and rep_a["info"]["guard"]["status"] == "damage_allowed"
        assert rep_a["after"]["clean_acc"] == pytest.approx(rep["after"]["clean_acc"])
    else:
        assert rep_a["k_star"] == rep_g["k_star"] and rep_a["info"]["guard"]["status"] == status


@pytest.mark.parametrize("method", [None, "xlf_ptn_guard"])
def test_the_guarded_methods_with_the_automatic_batch_size(method, run_dir, tmp_path, capsys):
    """The default (potion_plus) and xlf_ptn_guard: the kept model is within δ on the proxy."""
    out = tmp_path / "default"
    rc = main(["heal", "--run", str(run_dir), "--discovery-share", "0.3", "--backend", "local", "--out", str(out),
               "--quiet", "--tracking-uri", "none", "--cache-dir", "none", *(["--method", method] if method else [])])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == (method or "potion_plus") and rep["importance_batch_size"]["auto"] is True
    proxy, info = rep["proxy"], rep["info"]
    if info.get("step") == "neggrad":  # potion_plus kept its NegGrad+ step
        ng = info["plus"]["neggrad"]
        damage = next(c for c in ng["checks"] if c["step"] == ng["picked"])["damage"]
    else:
        g = info["guard"]
        assert proxy["size"] == g["proxy0"]["n"] + g["proxy0"]["n_excluded"] and g["reason"]
        damage = g["damage"][str(rep["k_star"])]
    assert damage >= -1.0 and proxy["seed"] == 0 and len(proxy["indices_sha256"]) == 64
    assert rep["after"]["poison_healed"] > rep["before_poison_healed"] + 30  # it heals
    # the proxy is the seeded slice of Dr: no deletion-set index, and the test split is another source
    from potion.heal.sets import draw_proxy
    from potion.unlearning.cache import hash_arrays

    deletion = pq.read_table(out / "deletion_set.parquet").column("index").to_numpy()
    n = rep["deletion_set"]["n_train"]
    retain = np.setdiff1d(np.arange(n), deletion)
    p = draw_proxy(retain, 2000 if method else min(2000, len(retain) // 2), 0)  # potion_plus leaves half
    assert hash_arrays(p.astype(np.int64)) == proxy["indices_sha256"] and not np.isin(deletion, p).any()
