"""Progress output that says what is happening, and stays readable in a log file."""
from __future__ import annotations

import io

import torch

from potion.progress import LineProgress, progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_progress_is_whole_lines_at_tenths():
    out = io.StringIO()
    with progress_bar(total=1000, desc="train", unit="it", stream=out) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(loss="0.123", refresh=False)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train: 1000/1000 it") and "loss=0.123" in lines[-1]


def test_without_a_total_lines_thin_out_and_the_last_count_is_printed():
    out = io.StringIO()
    bar = progress_bar(desc="search", unit="step", stream=out)
    for _ in range(100):
        bar.update(1)
    bar.close()
    counts = [int(line.split(": ")[1].split()[0]) for line in out.getvalue().splitlines()]
    assert counts == [1, 2, 4, 8, 16, 32, 64, 100]


def test_on_a_terminal_it_is_tqdm_and_disabled_means_silent():
    from tqdm.auto import tqdm

    bar = progress_bar(total=3, desc="x", stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    with progress_bar(total=3, desc="x", stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_heal_stages_report_progress_without_carriage_returns(capsys):
    """The training bar, both importance passes and the PTN search, as a log file sees them."""
    from potion.datasets import draw_deletion_set, load_dataset, make_manifest, make_trigger, train_view
    from potion.models import create_model
    from potion.training import TrainRecipe, train_model
    from potion.unlearning.methods import HealContext, heal
    from potion.unlearning.ptn import PTNConfig

    torch.manual_seed(0)
    splits = load_dataset("digits", upscale=1)
    trig = make_trigger("badnet", size=2)
    manifest = make_manifest(splits.train.labels, 60, 0, trig, 0)
    view = train_view(splits, manifest, trig)
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    train_model(model, view, TrainRecipe(iterations=60, batch_size=64, lr=0.05, amp=False), progress=True)
    deletion = draw_deletion_set(manifest, share=0.5, seed=0)
    retain = view.subset(sorted(set(range(len(view))) - set(deletion.tolist())))
    ctx = HealContext(model=model, state0=model.state_dict(), retain_batches=lambda: retain.batches(128),
                      forget_batches=list(view.subset(deletion).batches(16)), n_forget=len(deletion),
                      n_total=len(view), ptn=PTNConfig(rho=0.95, step=1.5, max_steps=80), progress=True,
                      retain_total=-(-len(retain) // 128))
    res = heal("xlf_ptn", ctx)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "train: 60/60 it" in err
    n_r = -(-len(retain) // 128)
    assert f"importances on retain set Dr (xlf): {n_r}/{n_r} batch" in err
    assert "importances on deletion set Sf (xlf): 2/2 batch" in err
    last = [line for line in err.splitlines() if line.startswith("PTN search (linear)")][-1]
    assert f": {res.info['evaluations']} step" in last and "<= threshold" in last
    assert f"done: k*={res.info['k_star']} " in last
