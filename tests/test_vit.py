"""The ViT end to end: sized for the image, trained with the paper's recipe (AdamW) from a
user's weights file or from scratch, and healed through the command line."""
from __future__ import annotations

import json

import pytest
import torch

from potion.cli import main
from potion.config import from_dict, load_yaml
from potion.errors import PotionError
from potion.models import create_model, load_checkpoint
from potion.models.vit import vit_size
from potion.runs.configs import TrainJob, with_model_recipe

QUIET = ["--quiet", "--tracking-uri", "none"]


def test_vit_is_sized_for_the_image():
    small = create_model("vit", num_classes=10, in_channels=1, image_size=16)
    assert small.patch_embed.num_patches == 16 and len(small.blocks) == 4  # patch 4: 4 × 4 tokens
    cifar = create_model("vit", num_classes=10, in_channels=3, image_size=32)
    assert cifar.patch_embed.num_patches == 64 and len(cifar.blocks) == 6
    assert sum(p.numel() for p in cifar.parameters()) < 1e6  # CPU-sized, not ViT-B's 86 M
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # ImageNet-sized images get the paper's ViT-B/16 (not built here: 86 M parameters)
    assert vit_size(224) == ("vit_base_patch16_224", {})
    # a named timm model and single overrides are built as asked
    named = create_model("vit", num_classes=10, in_channels=3, image_size=32, timm_name="vit_tiny_patch16_224",
                         patch_size=8, depth=1)
    assert named.patch_embed.num_patches == 16 and named.embed_dim == 192 and len(named.blocks) == 1
    assert len(create_model("vit", num_classes=10, in_channels=3, image_size=32, depth=2).blocks) == 2
    with pytest.raises(PotionError, match="patch_size 5 does not divide the image size 32"):
        create_model("vit", num_classes=10, in_channels=3, image_size=32, patch_size=5)


def test_vit_takes_the_papers_optimizer_unless_the_config_says_otherwise():
    tuned = from_dict(TrainJob, with_model_recipe({"model": {"name": "vit", "args": {}, "init": "vit.safetensors"}}))
    assert (tuned.recipe.optimizer, tuned.recipe.lr) == ("adamw", 2.5e-4)
    scratch = from_dict(TrainJob, with_model_recipe({"model": {"name": "vit", "args": {}}}))
    assert (scratch.recipe.optimizer, scratch.recipe.lr, scratch.recipe.warmup) == ("adamw", 2e-3, 0.05)
    assert (scratch.recipe.iterations, scratch.recipe.batch_size) == (2000, 64)
    mine = from_dict(TrainJob, with_model_recipe({"model": {"name": "vit"}, "recipe": {"lr": 0.01}}))
    assert (mine.recipe.optimizer, mine.recipe.lr) == ("adamw", 0.01)
    resnet = from_dict(TrainJob, with_model_recipe({}))
    assert (resnet.recipe.optimizer, resnet.recipe.lr) == ("sgd", 0.05)


def test_train_vit_fine_tunes_from_the_users_weights_file(tmp_path, capsys):
    torch.manual_seed(123)
    pre = create_model("vit", num_classes=3, in_channels=1, image_size=16)  # another head: skipped
    torch.save(pre.state_dict(), tmp_path / "pretrained.pt")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "digits", "--model", "vit", "--iterations", "2", "--set",
               f"model.init={tmp_path / 'pretrained.pt'}", "--out", str(out), *QUIET])
    assert rc == 0, capsys.readouterr().err
    recipe = load_yaml(out / "config.yaml")["recipe"]
    assert (recipe["optimizer"], recipe["lr"]) == ("adamw", 2.5e-4)
    model, _ = load_checkpoint(out / "model.pt")
    tuned, start = model.state_dict(), pre.state_dict()
    # two AdamW updates at 2.5e-4 move a weight by at most ~5e-4: the blocks are the file's
    assert (tuned["blocks.0.attn.qkv.weight"] - start["blocks.0.attn.qkv.weight"]).abs().max() < 1e-3
    assert tuned["head.weight"].shape == (10, 96)


def test_vit_cpu_suites_expand_with_the_three_triggers_and_adamw(tmp_path, monkeypatch):
    from potion.bench.grid import expand, load_suite

    monkeypatch.setenv("POTION_DATA", str(tmp_path / "nowhere"))
    full = expand(load_suite("vit-cpu")[0], tmp_path / "full")
    assert len(full.cells) == 3 * 4 * 6 and {c.trigger for c in full.cells} == {"badnet", "sine", "moving"}
    job = next(iter(full.models.values())).job
    assert (job.model.name, job.recipe.optimizer) == ("vit", "adamw")
    assert len(expand(load_suite("vit-cpu-slice")[0], tmp_path / "slice").cells) == 5


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """``potion train --dataset digits --model vit`` at its defaults (5 % badnet), once."""
    run = tmp_path_factory.mktemp("vit") / "run"
    assert main(["train", "--dataset", "digits", "--model", "vit", "--poison-share", "0.05", "--out", str(run),
                 *QUIET]) == 0
    return run


def _heal(run, out, *extra) -> dict:
    rc = main(["heal", "--run", str(run), "--discovery-share", "0.3", "--method", "xlf_ptn", "--out", str(out),
               "--cache-dir", "none", *extra, *QUIET])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_vit_learns_the_backdoor_at_its_defaults_and_the_cli_heals_it(vit_run, tmp_path):
    before = json.loads((vit_run / "metrics.json").read_text())
    # measured at these defaults with 2 % badnet: clean 0.94, asr 0.95 (500 steps of 128 at
    # lr 1e-3 gave clean 0.54: a ViT from scratch learns the backdoor long before the digits)
    assert before["asr"] > 0.5 and before["clean_acc"] > 0.8, before
    rep = _heal(vit_run, tmp_path / "healed", "--backend", "local")
    assert rep["after"]["asr"] < before["asr"] - 0.1, rep["after"]
    assert rep["after"]["clean_acc"] > before["clean_acc"] - 0.1, rep["after"]


@pytest.mark.slow
@pytest.mark.ray
def test_vit_heals_on_ray_as_locally(vit_run, tmp_path):
    local = _heal(vit_run, tmp_path / "local", "--backend", "local")
    ray = _heal(vit_run, tmp_path / "ray", "--backend", "ray", "--num-cpus", "2", "--window", "2",
                "--set", "importance_shards=2")
    assert ray["backend"] == "ray" and ray["k_star"] == local["k_star"]
    assert ray["after"]["asr"] == pytest.approx(local["after"]["asr"], abs=0.02)
