"""A hostile user's table: every bad input ends in one clear line, no traceback, nothing clobbered.

Each case runs the real command line in process (``potion.cli.main``) against a small
world of files: a trained run folder, data roots, checkpoints, identified-sample files.
For every case we check the exit status, that the last line of stderr is one message
naming the problem, that no traceback was printed, that every file that existed before
is byte-identical afterwards and that nothing new was left behind (no --out, no staging
folder, no lock). Almost all cases fail before any compute; the table counts them:

    pytest -q tests/test_bad_inputs.py    # one test per case
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from potion.cli import main
from potion.models import create_model, save_checkpoint

KW = {"num_classes": 10, "in_channels": 1, "image_size": 16, "width": 0.25}


@dataclass
class World:
    root: Path
    run: Path
    scratch: Path

    def __getattr__(self, name):  # w.csv_37 → root/inputs/csv_37
        return self.root / "inputs" / name.replace("__", ".")


def _write_run_copy(src: Path, dst: Path, model_state=None, config_text=None, manifest=None):
    dst.mkdir(parents=True)
    for name in ("config.yaml", "poison.parquet", "model.pt", "metrics.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    if config_text is not None:
        (dst / "config.yaml").write_text(config_text)
    if manifest is not None:
        (dst / "poison.parquet").write_bytes(manifest)
    if model_state is not None:
        (dst / "model.pt").unlink()
        save_checkpoint(dst / "model.pt", model_state, "resnet9", KW)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    run = root / "run"
    assert main(["train", "--dataset", "digits", "--poison-share", "0.05", "--iterations", "30", "--out", str(run),
                 "--quiet"]) == 0
    inp = root / "inputs"
    inp.mkdir()
    poisoned = pq.read_table(run / "poison.parquet").to_pandas()
    pidx = poisoned.loc[poisoned.poisoned, "index"].to_numpy()
    clean = poisoned.loc[~poisoned.poisoned, "index"].to_numpy()

    texts = {
        "csv_37": "index\n3.7\n", "csv_float_int": "index\n3.0\n", "csv_empty": "", "csv_header_only": "index\n",
        "csv_words": "foo\n1\n2\n", "csv_semicolon": "1;2;3\n", "csv_one_line": "1,2,3\n", "csv_negative": "-1\n",
        "csv_too_big": "1000000\n", "csv_mid_word": "1\nabc\n3\n", "csv_empty_field": "index,name\n,foo\n",
        "csv_ragged": "index,name\n1,a\n2\n", "csv_header_no_index": "idx,name\n1,a\n", "csv_hex": "0x10\n",
        "csv_blank_value": "index\n \n\t\n",
        "csv_clean": "index\n" + "\n".join(map(str, clean[:5])) + "\n",
        "csv_good": "index\n" + "\n".join(map(str, pidx[:3])) + "\n",
        "yaml_broken": "recipe: [unclosed\n", "yaml_list": "- 1\n- 2\n", "yaml_unknown": "recipe:\n  iterationz: 3\n",
        "yaml_top_unknown": "colour: red\n", "yaml_bad_type": "recipe:\n  lr: fast\n",
        "yaml_heal_unknown": "ptn:\n  rhoo: 0.1\n", "not_a_db__db": "this is not sqlite",
        "garbage__parquet": "not parquet at all", "garbage__pt": "not a checkpoint",
        "suite_bad__yaml": "name: x\ncolour: red\n", "afile": "plain file",
    }
    for name, text in texts.items():
        (inp / name.replace("__", ".")).write_text(text)
    (inp / "csv_binary").write_bytes(b"\xff\xfe\x00\x01garbage")
    tables = {
        "pq_no_index": pa.table({"idx": pa.array([1, 2], pa.int64())}),
        "pq_nulls": pa.table({"index": pa.array([1, None, 3], pa.int64())}),
        "pq_floats": pa.table({"index": pa.array([1.0, 3.7], pa.float64())}),
        "pq_strings": pa.table({"index": pa.array(["1", "2"])}),
        "pq_nan": pa.table({"index": pa.array([1.0, float("nan")], pa.float64())}),
        "pq_empty": pa.table({"index": pa.array([], pa.int64())}),
        "pq_outside": pa.table({"index": pa.array([int(pidx[0]), 10**7], pa.int64())}),
    }
    for name, t in tables.items():
        pq.write_table(t, inp / f"{name}.parquet")

    torch.manual_seed(0)
    base = create_model("resnet9", **KW)
    nan = create_model("resnet9", **KW)
    with torch.no_grad():
        next(nan.parameters()).view(-1)[0] = math.nan
    inf_model = create_model("resnet9", **KW)
    with torch.no_grad():
        list(inf_model.parameters())[-1].view(-1)[0] = math.inf
    save_checkpoint(inp / "nan.pt", nan, "resnet9", KW)
    save_checkpoint(inp / "inf.pt", inf_model, "resnet9", KW)
    save_checkpoint(inp / "three.pt", create_model("resnet9", **{**KW, "num_classes": 3}), "resnet9",
                    {**KW, "num_classes": 3})
    save_checkpoint(inp / "size32.pt", create_model("resnet9", **{**KW, "image_size": 32}), "resnet9",
                    {**KW, "image_size": 32})
    save_checkpoint(inp / "rgb.pt", create_model("resnet9", **{**KW, "in_channels": 3}), "resnet9",
                    {**KW, "in_channels": 3})
    torch.save({"format": "x", "payload": object.__new__(World)}, inp / "pickle.pt")  # not weights-only
    save_checkpoint(inp / "init.pt", base, "resnet9", KW)

    cfg = (run / "config.yaml").read_text()
    _write_run_copy(run, root / "run_nan", model_state=nan)
    _write_run_copy(run, root / "run_bigger", config_text=cfg.replace("args: {}", "args: {upscale: 3}")
                    if "args: {}" in cfg else cfg.replace("dataset: digits", "dataset: digits\n  args: {upscale: 3}"))
    _write_run_copy(run, root / "run_badcfg", config_text="recipe:\n  iterationz: 1\n")
    _write_run_copy(run, root / "run_brokenyaml", config_text="data: [\n")
    _write_run_copy(run, root / "run_badmanifest", manifest=b"garbage")
    short = pq.read_table(run / "poison.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(short.slice(0, 10).replace_schema_metadata(short.schema.metadata), sink)
    _write_run_copy(run, root / "run_shortmanifest", manifest=sink.getvalue().to_pybytes())
    (root / "run_nomodel").mkdir()
    for name in ("config.yaml", "poison.parquet"):
        (root / "run_nomodel" / name).write_bytes((run / name).read_bytes())
    (root / "run_empty").mkdir()
    _write_run_copy(run, root / "run_garbagemodel")
    (root / "run_garbagemodel" / "model.pt").write_bytes(b"garbage")

    data = root / "data_root"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"user's train split")
    (data / "test.parquet").write_bytes(b"user's test split")
    ifold = root / "imgs"
    for split, classes in (("train", ["a", "b", "c"]), ("val", ["a", "b"])):
        for c in classes:
            (ifold / split / c).mkdir(parents=True)
    from PIL import Image

    for c in ("a", "c"):
        Image.new("RGB", (8, 8)).save(ifold / "train" / c / "x.png")
    Image.new("RGB", (8, 8)).save(ifold / "val" / "a" / "x.png")
    noimg = root / "noimgs"
    (noimg / "train" / "a").mkdir(parents=True)
    (noimg / "val" / "a").mkdir(parents=True)
    unknown = root / "imgs_unknown"
    for split, c in (("train", "a"), ("val", "z")):
        (unknown / split / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(unknown / split / c / "x.png")
    taken = root / "taken"
    taken.mkdir()
    (taken / "model.pt").write_bytes(b"the user's own checkpoint")
    (root / "metrics.json").write_text('{"mine": 1}')
    scratch = root / "scratch"
    scratch.mkdir()
    _owner_inputs(root / "owner", run)
    return World(root, run, scratch)


def _owner_inputs(folder: Path, run: Path) -> None:
    """An owner's model and data (tests/owner_case.py, barely trained) and broken copies of
    its pieces: integer weights, truncated files, a damaged PNG, triggered images stored at
    twice the size, an --identified file that lists all of D."""
    import owner_case
    from safetensors.torch import save_file

    case = owner_case.build(folder, iterations=5)
    state = case["state"]
    save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, str(folder / "int.safetensors"))
    blob = (folder / "weights.pt").read_bytes()
    (folder / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    torch.save({**state, "head.weight": state["head.weight"][:, :10]}, folder / "shape.pt")
    ckpt = (run / "model.pt").read_bytes()
    (folder / "trunc_ckpt.pt").write_bytes(ckpt[: len(ckpt) // 2])
    payload = torch.load(run / "model.pt", weights_only=True)
    first = next(iter(payload["state_dict"]))
    for name, value in (("ckpt_int", payload["state_dict"][first].to(torch.int32)), ("ckpt_list", [1, 2])):
        torch.save({**payload, "state_dict": {**payload["state_dict"], first: value}}, folder / f"{name}.pt")
    n_train = pq.read_metadata(folder / "data" / "train.parquet").num_rows
    (folder / "all.csv").write_text("index\n" + "\n".join(map(str, range(n_train))) + "\n")

    rows = pq.read_table(folder / "data" / "train.parquet")
    images = rows.column("image").to_pylist()
    png = images[5]["bytes"]
    # bits flipped inside IDAT's compressed data: torchvision's decoder crashes the process on these
    for name, broken in (("bad_png_bits", png[:60] + bytes(b ^ 0xFF for b in png[60:120]) + png[120:]),
                         ("bad_png_cut", png[: len(png) // 2])):
        (folder / name).mkdir()
        (folder / name / "test.parquet").write_bytes((folder / "data" / "test.parquet").read_bytes())
        damaged = images[:5] + [{"bytes": broken, "path": None}] + images[6:]
        pq.write_table(rows.set_column(0, "image", pa.array(damaged, rows.schema.field("image").type)),
                       folder / name / "train.parquet")
    trig = pq.read_table(folder / "triggered_test.parquet")
    from PIL import Image
    import io

    small = [np.asarray(Image.open(io.BytesIO(r["bytes"]))) for r in trig.column("image").to_pylist()]
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.NEAREST)) for im in small])[:, None]
    owner_case.write_parquet(folder / "trig32.parquet", big, trig.column("label").to_numpy())
    rgb = []
    for im in small[:4]:
        buf = io.BytesIO()
        Image.fromarray(im).convert("RGB").save(buf, format="PNG")
        rgb.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"image": pa.array(rgb, trig.schema.field("image").type),
                             "label": pa.array([1, 2, 3, 4], pa.int64())}), folder / "trig_rgb.parquet")


def own(w, *extra, data="data"):
    """The owner's model on their data (or a damaged copy of it), as a user types it."""
    f = w.root / "owner"
    return ["--model", f"{f / 'mynet_owner.py'}:MyNet", "--dataset", "parquet", "--data-root", str(f / data),
            "--mean", str(0.3), "--std", str(0.4), *[str(f / a) if (f / a).exists() else a for a in extra]]


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


H = ["--tracking-uri", "none", "--cache-dir", "none", "--quiet"]


def heal(w, *extra, run=None, out="o"):
    return ["heal", "--run", str(run or w.run), *extra, "--out", str(w.scratch / out) if out else None]


def heal_share(w, *extra, **kw):
    return [a for a in heal(w, "--discovery-share", "0.3", *extra, **kw) if a is not None] + H


def train(w, *extra, out="o"):
    return ["train", "--quiet", "--iterations", "2", *extra, "--out", str(w.scratch / out)]


def ev(w, *extra, run=None):
    return ["evaluate", "--run", str(run or w.run), *extra]


# (id, argv(w), expected text in the message, exit status)
CASES: list[tuple[str, Callable[[World], list[str]], str, int]] = [
    # ---- command line (argparse)
    ("no-command", lambda w: [], "required", 2),
    ("unknown-command", lambda w: ["heel"], "invalid choice", 2),
    ("train-no-out", lambda w: ["train"], "--out", 2),
    ("heal-no-run", lambda w: ["heal", "--out", "x", "--discovery-count", "1"], "--run", 2),
    ("heal-no-deletion", lambda w: ["heal", "--run", str(w.run), "--out", "x"], "one of the arguments", 2),
    ("heal-two-deletions", lambda w: heal_share(w, "--discovery-count", "1"), "not allowed with", 2),
    ("train-share-and-count", lambda w: train(w, "--poison-share", "0.1", "--poison-count", "3"), "not allowed", 2),
    ("iterations-word", lambda w: train(w, "--iterations", "abc"), "invalid int value", 2),
    ("seed-float", lambda w: train(w, "--seed", "1.5"), "invalid int value", 2),
    ("strategy-unknown", lambda w: heal_share(w, "--strategy", "spiral"), "invalid choice", 2),
    ("backend-unknown", lambda w: heal_share(w, "--backend", "gpu"), "invalid choice", 2),
    ("evaluate-no-run", lambda w: ["evaluate"], "--run", 2),
    ("max-steps-word", lambda w: heal_share(w, "--max-steps", "x"), "invalid int value", 2),
    ("share-word", lambda w: heal(w, "--discovery-share", "lots"), "invalid float value", 2),
    # ---- config files and --set
    ("set-unknown-key", lambda w: train(w, "--set", "recipe.iterationz=3"), "recipe.iterationz", 2),
    ("set-wrong-type", lambda w: train(w, "--set", "recipe.lr=fast"), "recipe.lr", 2),
    ("set-not-a-pair", lambda w: train(w, "--set", "recipe.lr"), "key.sub=value", 2),
    ("set-section-scalar", lambda w: train(w, "--set", "recipe=3"), "recipe", 2),
    ("config-missing", lambda w: train(w, "--config", str(w.root / "nope.yaml")), "nope.yaml", 2),
    ("config-broken-yaml", lambda w: train(w, "--config", str(w.yaml_broken)), "yaml_broken", 2),
    ("config-binary", lambda w: train(w, "--config", str(w.csv_binary)), "csv_binary", 2),
    ("config-a-list", lambda w: train(w, "--config", str(w.yaml_list)), "yaml_list", 2),
    ("config-unknown-key", lambda w: train(w, "--config", str(w.yaml_unknown)), "recipe.iterationz", 2),
    ("config-unknown-top", lambda w: train(w, "--config", str(w.yaml_top_unknown)), "colour", 2),
    ("config-bad-type", lambda w: train(w, "--config", str(w.yaml_bad_type)), "recipe.lr", 2),
    ("heal-config-unknown", lambda w: heal_share(w, "--config", str(w.yaml_heal_unknown)), "ptn.rhoo", 2),
    ("config-is-folder", lambda w: train(w, "--config", str(w.root)), str("config"), 2),
    ("on-no-crossing-bad", lambda w: heal_share(w, "--set", "on_no_crossing=maybe"), "on_no_crossing", 2),
    # ---- numbers: train
    ("train-seed-negative", lambda w: train(w, "--seed", "-1"), "seed", 2),
    ("train-seed-huge", lambda w: train(w, "--seed", str(2**40)), "seed", 2),
    ("lr-zero", lambda w: train(w, "--lr", "0"), "lr", 2),
    ("lr-negative", lambda w: train(w, "--lr", "-1"), "lr", 2),
    ("lr-inf", lambda w: train(w, "--lr", "inf"), "lr", 2),
    ("lr-nan", lambda w: train(w, "--lr", "nan"), "lr", 2),
    ("iterations-zero", lambda w: train(w, "--iterations", "0"), "iterations", 2),
    ("iterations-negative", lambda w: train(w, "--iterations", "-3"), "iterations", 2),
    ("batch-size-zero", lambda w: train(w, "--batch-size", "0"), "batch_size", 2),
    ("poison-share-big", lambda w: train(w, "--poison-share", "1.5"), "share", 2),
    ("poison-share-negative", lambda w: train(w, "--poison-share", "-0.1"), "share", 2),
    ("poison-share-nan", lambda w: train(w, "--poison-share", "nan"), "share", 2),
    ("poison-count-zero", lambda w: train(w, "--poison-count", "0"), "count", 2),
    ("poison-count-huge", lambda w: train(w, "--poison-count", str(10**9)), "exceeds", 2),
    ("target-negative", lambda w: train(w, "--target", "-1"), "target", 2),
    ("target-too-big", lambda w: train(w, "--target", "10"), "target", 2),
    ("trigger-unknown", lambda w: train(w, "--poison", "laser"), "laser", 2),
    ("model-unknown", lambda w: train(w, "--model", "resnet1000"), "resnet1000", 2),
    ("dataset-unknown", lambda w: train(w, "--dataset", "mnist-ish"), "mnist-ish", 2),
    ("device-unknown", lambda w: train(w, "--device", "tpu"), "device", 2),
    ("device-cuda-absent", lambda w: train(w, "--device", "cuda"), "cuda", 2),
    ("momentum-bad", lambda w: train(w, "--set", "recipe.momentum=1.5"), "momentum", 2),
    ("weight-decay-bad", lambda w: train(w, "--set", "recipe.weight_decay=-1"), "weight_decay", 2),
    ("warmup-bad", lambda w: train(w, "--set", "recipe.warmup=2"), "warmup", 2),
    ("eval-batch-zero", lambda w: train(w, "--set", "eval_batch_size=0"), "eval_batch_size", 2),
    ("trigger-param-unknown", lambda w: train(w, "--set", "poison.params.colour=1"), "colour", 2),
    ("model-arg-unknown", lambda w: train(w, "--set", "model.args.depth=3"), "depth", 2),
    ("data-arg-unknown", lambda w: train(w, "--set", "data.args.colour=1"), "colour", 2),
    # ---- numbers: heal
    ("heal-seed-negative", lambda w: heal_share(w, "--seed", "-1"), "seed", 2),
    ("val-size-negative", lambda w: heal_share(w, "--val-size", "-5"), "val_size", 2),
    ("rho-zero", lambda w: heal_share(w, "--rho", "0"), "rho", 2),
    ("rho-big", lambda w: heal_share(w, "--rho", "2"), "rho", 2),
    ("step-one", lambda w: heal_share(w, "--step", "1"), "step", 2),
    ("step-small", lambda w: heal_share(w, "--step", "0.5"), "step", 2),
    ("buffer-zero", lambda w: heal_share(w, "--buffer", "0"), "buffer", 2),
    ("max-steps-negative", lambda w: heal_share(w, "--max-steps", "-1"), "max_steps", 2),
    ("max-steps-zero", lambda w: heal_share(w, "--max-steps", "0"), "max_steps", 2),
    ("window-zero", lambda w: heal_share(w, "--window", "0"), "window", 2),
    ("importance-batch-zero", lambda w: heal_share(w, "--batch-size", "0"), "batch", 2),
    ("num-cpus-zero", lambda w: heal_share(w, "--num-cpus", "0"), "num_cpus", 2),
    ("method-unknown", lambda w: heal_share(w, "--method", "magic"), "magic", 2),
    ("shares-negative", lambda w: heal_share(w, "--set", "importance_shards=-1"), "importance_shards", 2),
    ("gpus-negative", lambda w: heal_share(w, "--set", "gpus_per_trial=-1"), "gpus_per_trial", 2),
    ("ssd-alpha-zero", lambda w: heal_share(w, "--set", "ssd_alpha=0"), "ssd_alpha", 2),
    ("discovery-share-zero", lambda w: [a for a in heal(w, "--discovery-share", "0")] + H, "discovery-share", 2),
    ("discovery-share-big", lambda w: heal(w, "--discovery-share", "1.5") + H, "discovery-share", 2),
    ("discovery-share-nan", lambda w: heal(w, "--discovery-share", "nan") + H, "discovery-share", 2),
    ("discovery-count-zero", lambda w: heal(w, "--discovery-count", "0") + H, "discovery-count", 2),
    ("discovery-count-huge", lambda w: heal(w, "--discovery-count", "100000") + H, "exceeds", 2),
    ("heal-device-unknown", lambda w: heal_share(w, "--device", "tpu"), "device", 2),
    # ---- tracking, Ray addresses
    ("tracking-scheme", lambda w: heal(w, "--discovery-share", "0.3", "--tracking-uri", "foo://bar"), "foo", 2),
    ("tracking-server-down", lambda w: heal(w, "--discovery-share", "0.3", "--tracking-uri",
                                            "http://127.0.0.1:9"), "does not answer", 2),
    ("tracking-not-sqlite", lambda w: heal(w, "--discovery-share", "0.3", "--tracking-uri",
                                           f"sqlite:///{w.not_a_db__db}"), "not a usable sqlite", 2),
    ("tracking-unwritable", lambda w: heal(w, "--discovery-share", "0.3", "--tracking-uri",
                                           "sqlite:////proc/potion/mlflow.db"), "/proc/potion", 2),
    ("address-dashboard", lambda w: heal_share(w, "--backend", "ray", "--address", "http://127.0.0.1:8265"),
     "dashboard", 2),
    ("address-no-port", lambda w: heal_share(w, "--backend", "ray", "--address", "somehost"), "host:port", 2),
    ("address-unreachable", lambda w: heal_share(w, "--backend", "ray", "--address", "127.0.0.1:9"),
     "cannot reach", 2),
    ("address-and-num-cpus", lambda w: heal_share(w, "--backend", "ray", "--address", "127.0.0.1:9",
                                                  "--num-cpus", "2"), "num-cpus", 2),
    # ---- output paths
    ("train-out-proc", lambda w: ["train", "--iterations", "2", "--out", "/proc/potion/run"], "/proc/potion", 2),
    ("train-out-file", lambda w: ["train", "--iterations", "2", "--out", str(w.afile)], "not a folder", 2),
    ("train-out-taken", lambda w: ["train", "--iterations", "2", "--out", str(w.root / "taken")], "--overwrite", 2),
    ("train-out-is-data-root", lambda w: ["train", "--dataset", "parquet", "--data-root", str(w.root / "data_root"),
                                          "--out", str(w.root / "data_root"), "--overwrite"], "data root", 2),
    ("train-out-inside-data", lambda w: ["train", "--dataset", "parquet", "--data-root", str(w.root / "data_root"),
                                         "--out", str(w.root / "data_root" / "run")], "data root", 2),
    ("train-out-holds-data", lambda w: ["train", "--dataset", "parquet", "--data-root", str(w.root / "data_root"),
                                        "--out", str(w.root), "--overwrite"], "contains", 2),
    ("train-out-holds-init", lambda w: ["train", "--set", f"model.init=\"{w.init__pt}\"", "--out",
                                        str(w.root / "inputs"), "--overwrite"], "initial weights", 2),
    ("heal-out-is-run", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out", str(w.run),
                                   "--overwrite", *H], "run folder", 2),
    ("heal-out-inside-run", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out",
                                       str(w.run / "h"), *H], "inside", 2),
    ("heal-out-holds-run", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out", str(w.root),
                                      "--overwrite", *H], "contains", 2),
    ("heal-out-is-identified", lambda w: ["heal", "--run", str(w.run), "--identified", str(w.csv_good), "--out",
                                          str(w.root / "inputs"), "--overwrite", *H], "identified", 2),
    ("heal-out-proc", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out", "/proc/potion/h",
                                 *H], "/proc/potion", 2),
    ("heal-out-file", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out", str(w.afile), *H],
     "not a folder", 2),
    ("heal-out-taken", lambda w: ["heal", "--run", str(w.run), "--discovery-count", "1", "--out",
                                  str(w.root / "taken"), *H], "--overwrite", 2),
    ("heal-out-question", lambda w: heal(w, "--discovery-count", "1", out="a?b"), "'?'", 2),
    ("heal-out-hash", lambda w: heal(w, "--discovery-count", "1", out="a#b"), "'#'", 2),
    ("heal-out-percent", lambda w: heal(w, "--discovery-count", "1", out="a%20b"), "'%'", 2),
    ("heal-out-locked", lambda w: heal(w, "--discovery-count", "1", out="locked") + H, "another potion process", 2),
    ("train-out-locked", lambda w: train(w, out="locked"), "another potion process", 2),
    ("cache-dir-file", lambda w: heal(w, "--discovery-count", "1", "--tracking-uri", "none", "--cache-dir",
                                      str(w.afile)), "cache folder", 2),
    ("cache-dir-proc", lambda w: heal(w, "--discovery-count", "1", "--tracking-uri", "none", "--cache-dir",
                                      "/proc/potion/cache"), "cache folder", 2),
    # ---- run folders and checkpoints
    ("run-missing", lambda w: heal_share(w, run=w.root / "nope"), "does not exist", 2),
    ("run-is-file", lambda w: heal_share(w, run=w.afile), "does not exist", 2),
    ("run-empty", lambda w: heal_share(w, run=w.root / "run_empty"), "missing", 2),
    ("run-no-model", lambda w: heal_share(w, run=w.root / "run_nomodel"), "model.pt", 2),
    ("run-bad-config", lambda w: heal_share(w, run=w.root / "run_badcfg"), "recipe.iterationz", 2),
    ("run-broken-yaml", lambda w: heal_share(w, run=w.root / "run_brokenyaml"), "config.yaml", 2),
    ("run-garbage-manifest", lambda w: heal_share(w, run=w.root / "run_badmanifest"), "poison.parquet", 2),
    ("run-short-manifest", lambda w: heal_share(w, run=w.root / "run_shortmanifest"), "rows", 2),
    ("run-garbage-model", lambda w: heal_share(w, run=w.root / "run_garbagemodel"), "model.pt", 2),
    ("run-nan-model", lambda w: heal_share(w, run=w.root / "run_nan"), "non-finite", 2),
    ("run-data-changed", lambda w: heal_share(w, run=w.root / "run_bigger"), "image_size", 2),
    ("evaluate-run-missing", lambda w: ev(w, run=w.root / "nope"), "does not exist", 2),
    ("evaluate-ckpt-missing", lambda w: ev(w, "--checkpoint", str(w.root / "nope.pt")), "nope.pt", 2),
    ("evaluate-ckpt-garbage", lambda w: ev(w, "--checkpoint", str(w.garbage__pt)), "garbage.pt", 2),
    ("evaluate-ckpt-pickle", lambda w: ev(w, "--checkpoint", str(w.pickle__pt)), "pickle.pt", 2),
    ("evaluate-ckpt-nan", lambda w: ev(w, "--checkpoint", str(w.nan__pt)), "non-finite", 2),
    ("evaluate-ckpt-inf", lambda w: ev(w, "--checkpoint", str(w.inf__pt)), "non-finite", 2),
    ("evaluate-ckpt-3-classes", lambda w: ev(w, "--checkpoint", str(w.three__pt)), "3 output classes", 2),
    ("evaluate-ckpt-size", lambda w: ev(w, "--checkpoint", str(w.size32__pt)), "image_size=32", 2),
    ("evaluate-ckpt-channels", lambda w: ev(w, "--checkpoint", str(w.rgb__pt)), "in_channels=3", 2),
    ("evaluate-run-data-changed", lambda w: ev(w, run=w.root / "run_bigger"), "image_size", 2),
    ("evaluate-run-nan", lambda w: ev(w, run=w.root / "run_nan"), "non-finite", 2),
    ("evaluate-out-exists", lambda w: ev(w, "--out", str(w.root / "metrics.json")), "--overwrite", 2),
    ("evaluate-out-run-metrics", lambda w: ev(w, "--out", str(w.run / "metrics.json")), "--overwrite", 2),
    ("evaluate-out-proc", lambda w: ev(w, "--out", "/proc/potion/m.json"), "/proc/potion", 2),
    ("evaluate-out-folder", lambda w: ev(w, "--out", str(w.scratch), "--overwrite"), "folder", 2),
    # ---- --identified
    ("identified-missing", lambda w: heal(w, "--identified", str(w.root / "nope.csv")) + H, "does not exist", 2),
    ("identified-folder", lambda w: heal(w, "--identified", str(w.root)) + H, "does not exist", 2),
    ("identified-3.7", lambda w: heal(w, "--identified", str(w.csv_37)) + H, "'3.7'", 2),
    ("identified-3.0", lambda w: heal(w, "--identified", str(w.csv_float_int)) + H, "'3.0'", 2),
    ("identified-empty", lambda w: heal(w, "--identified", str(w.csv_empty)) + H, "empty", 2),
    ("identified-header-only", lambda w: heal(w, "--identified", str(w.csv_header_only)) + H, "empty", 2),
    ("identified-word-first", lambda w: heal(w, "--identified", str(w.csv_words)) + H, "'foo'", 2),
    ("identified-semicolons", lambda w: heal(w, "--identified", str(w.csv_semicolon)) + H, "1;2;3", 2),
    ("identified-one-line", lambda w: heal(w, "--identified", str(w.csv_one_line)) + H, "3 values on one line", 2),
    ("identified-negative", lambda w: heal(w, "--identified", str(w.csv_negative)) + H, "outside", 2),
    ("identified-too-big", lambda w: heal(w, "--identified", str(w.csv_too_big)) + H, "outside", 2),
    ("identified-word-middle", lambda w: heal(w, "--identified", str(w.csv_mid_word)) + H, "line 2", 2),
    ("identified-empty-field", lambda w: heal(w, "--identified", str(w.csv_empty_field)) + H, "line 2", 2),
    ("identified-ragged", lambda w: heal(w, "--identified", str(w.csv_ragged)) + H, "line 3", 2),
    ("identified-header-no-index", lambda w: heal(w, "--identified", str(w.csv_header_no_index)) + H, "index", 2),
    ("identified-hex", lambda w: heal(w, "--identified", str(w.csv_hex)) + H, "0x10", 2),
    ("identified-blank-values", lambda w: heal(w, "--identified", str(w.csv_blank_value)) + H, "empty", 2),
    ("identified-binary", lambda w: heal(w, "--identified", str(w.csv_binary)) + H, "csv_binary", 2),
    ("identified-clean-samples", lambda w: heal(w, "--identified", str(w.csv_clean)) + H, "none of the 5", 2),
    ("identified-pq-no-index", lambda w: heal(w, "--identified", str(w.pq_no_index__parquet)) + H, "'index'", 2),
    ("identified-pq-nulls", lambda w: heal(w, "--identified", str(w.pq_nulls__parquet)) + H, "null", 2),
    ("identified-pq-3.7", lambda w: heal(w, "--identified", str(w.pq_floats__parquet)) + H, "3.7", 2),
    ("identified-pq-strings", lambda w: heal(w, "--identified", str(w.pq_strings__parquet)) + H, "not integers", 2),
    ("identified-pq-nan", lambda w: heal(w, "--identified", str(w.pq_nan__parquet)) + H, "nan", 2),
    ("identified-pq-empty", lambda w: heal(w, "--identified", str(w.pq_empty__parquet)) + H, "empty", 2),
    ("identified-pq-outside", lambda w: heal(w, "--identified", str(w.pq_outside__parquet)) + H, "outside", 2),
    ("identified-pq-garbage", lambda w: heal(w, "--identified", str(w.garbage__parquet)) + H, "garbage.parquet", 2),
    # ---- data
    ("parquet-root-missing", lambda w: train(w, "--dataset", "parquet", "--data-root", str(w.root / "nope")),
     "nope", 2),
    ("parquet-root-garbage", lambda w: train(w, "--dataset", "parquet", "--data-root", str(w.root / "data_root")),
     "train.parquet", 2),
    ("cifar-root-missing", lambda w: train(w, "--dataset", "cifar10", "--data-root", str(w.root / "nope")), "nope", 2),
    ("imagefolder-missing", lambda w: train(w, "--dataset", "imagefolder", "--data-root", str(w.root / "nope")),
     "nope", 2),
    ("imagefolder-empty-class", lambda w: train(w, "--dataset", "imagefolder", "--data-root", str(w.root / "imgs")),
     "has no image files", 2),
    ("imagefolder-no-images", lambda w: train(w, "--dataset", "imagefolder", "--data-root",
                                              str(w.root / "noimgs")), "no image files", 2),
    ("imagefolder-unknown-class", lambda w: train(w, "--dataset", "imagefolder", "--data-root",
                                                  str(w.root / "imgs_unknown")), "does not have", 2),
    ("imagefolder-size-zero", lambda w: train(w, "--dataset", "imagefolder", "--data-root", str(w.root / "imgs"),
                                              "--set", "data.args.image_size=0"), "image_size", 2),
    # ---- cache, benchmark, report
    ("cache-secret-not-hex", lambda w: heal(w, "--discovery-count", "1", "--tracking-uri", "none",
                                            "--cache-dir", str(w.scratch / "c")), "POTION_CACHE_SECRET", 2),
    ("benchmark-suite-missing", lambda w: ["benchmark", "--suite", "no-such-suite", "--dry-run"], "no-such-suite", 2),
    ("benchmark-suite-bad", lambda w: ["benchmark", "--suite", str(w.suite_bad__yaml), "--dry-run"], "colour", 2),
    ("report-missing", lambda w: ["report", str(w.root / "nope.parquet")], "nope.parquet", 2),
    ("report-garbage", lambda w: ["report", str(w.garbage__parquet)], "garbage.parquet", 2),
    # ---- the owner's weights and data (issue 23)
    ("weights-int", lambda w: ["evaluate", *own(w, "--weights", "int.safetensors")], "not floating point", 2),
    ("weights-truncated", lambda w: ["evaluate", *own(w, "--weights", "trunc.pt")], "truncated", 2),
    ("weights-wrong-shape", lambda w: ["evaluate", *own(w, "--weights", "shape.pt")],
     "head.weight saved (10, 10) vs model (10, 512)", 2),
    ("ckpt-truncated", lambda w: ev(w, "--checkpoint", str(w.root / "owner" / "trunc_ckpt.pt")), "truncated", 2),
    ("ckpt-int", lambda w: ev(w, "--checkpoint", str(w.root / "owner" / "ckpt_int.pt")), "not floating point", 2),
    ("ckpt-list-entry", lambda w: ev(w, "--checkpoint", str(w.root / "owner" / "ckpt_list.pt")), "saved list", 2),
    ("image-damaged-png", lambda w: ["evaluate", *own(w, "--weights", "weights.pt", data="bad_png_bits")],
     "row 5", 2),
    ("image-truncated-png", lambda w: ["evaluate", *own(w, "--weights", "weights.pt", data="bad_png_cut")],
     "row 5", 2),
    ("triggered-test-size", lambda w: ["evaluate", *own(w, "--weights", "weights.pt", "--triggered-test",
                                                        "trig32.parquet", "--target", "7")], "--image-size 16", 2),
    ("triggered-test-channels", lambda w: ["evaluate", *own(w, "--weights", "weights.pt", "--image-size", "16",
                                                            "--triggered-test", "trig_rgb.parquet",
                                                            "--target", "7")], "--image-size 16", 2),
    ("identified-all-of-d", lambda w: ["heal", *own(w, "--weights", "weights.pt", "--identified", "all.csv"),
                                       "--out", str(w.scratch / "o"), *H], "retain set", 2),
]

# None: unset (the default MLflow store OUT/mlflow.db is what these cases are about)
ENV = {"cache-secret-not-hex": {"POTION_CACHE_SECRET": "not-hex"},
       **{f"heal-out-{c}": {"MLFLOW_TRACKING_URI": None} for c in ("question", "hash", "percent")}}


def _flat(argv):
    return [a for a in argv if a is not None]


@pytest.mark.parametrize("case_id,argv,expect,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(world, case_id, argv, expect, status, capsys, monkeypatch):
    for k, v in ENV.get(case_id, {}).items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    args = _flat(argv(world))
    before = snapshot(world.root)
    lock_fd = None
    if case_id.endswith("-locked"):  # another writer holds --out's lock
        lock_fd = os.open(world.scratch / ".locked.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        before = snapshot(world.root)
    try:
        try:
            rc = main(args)
        except SystemExit as e:  # argparse
            rc = e.code
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
            os.unlink(world.scratch / ".locked.lock")
            before.pop("scratch/.locked.lock", None)
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == status, err
    assert "Traceback" not in cap.err + cap.out
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(("potion: error:", "usage:", "potion ")) and "error" in last, err
    assert expect in last, last
    assert len(last) < 1000
    # a library's words stay behind --debug: no numpy reprs, torch/torchvision internals
    assert not re.search(r"np\.\w+\(|csrc/|PytorchStreamReader|miniz", last), last
    after = snapshot(world.root)
    assert after == before  # nothing changed, nothing left behind


def test_the_table_is_large_and_every_case_is_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 100


def test_debug_shows_what_the_library_said_before_the_one_line(world, capsys):
    ckpt = str(world.root / "owner" / "trunc_ckpt.pt")
    assert main(ev(world, "--checkpoint", ckpt)) == 2
    plain = capsys.readouterr().err.strip().splitlines()
    assert len(plain) == 1 and plain[0].endswith("--debug shows the detail"), plain
    assert main([*ev(world, "--checkpoint", ckpt), "--debug"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("potion: detail: RuntimeError:") and "PytorchStreamReader" in lines[0], lines
    assert lines[-1] == plain[0].removesuffix("; --debug shows the detail")


def test_triggered_test_at_another_stored_size_is_resized_with_image_size(world, capsys):
    """32×32 copies (2× nearest) of the 16×16 triggered images reach the model as nearly the
    same 16×16 images once --image-size 16 resizes them (antialiased bilinear, not a 2×2 mean):
    about the same ra and asr as the originals."""
    base = ["evaluate", *own(world, "--weights", "weights.pt", "--target", "7", "--image-size", "16")]
    assert main([*base, "--triggered-test", str(world.root / "owner" / "triggered_test.parquet")]) == 0
    native = json.loads(capsys.readouterr().out)
    assert main([*base, "--triggered-test", str(world.root / "owner" / "trig32.parquet")]) == 0
    big = json.loads(capsys.readouterr().out)
    assert big["ra"] == pytest.approx(native["ra"], abs=0.01) and big["asr"] == pytest.approx(native["asr"], abs=0.01)
    assert big["clean_acc"] == native["clean_acc"]


def test_identified_all_of_d_is_refused_before_any_importance(world, capsys, monkeypatch):
    import potion.heal.run as heal_run

    def no_compute(*a, **k):
        raise AssertionError("importances were computed")

    monkeypatch.setattr(heal_run, "make_importance_fn", no_compute)
    monkeypatch.setattr(heal_run, "measure_before", no_compute)
    args = ["heal", *own(world, "--weights", "weights.pt", "--identified", "all.csv"), "--out",
            str(world.scratch / "o"), *H]
    assert main(args) == 2
    assert "retain set Dr = D − Sf empty" in capsys.readouterr().err
