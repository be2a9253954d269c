"""The streamed data path: sharded Parquet read in name order, decoded on demand (in loader
workers), giving the same images, importances and k* as the in-memory path."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from image_sets import smooth_images, write_shards
from potion.datasets import load_dataset
from potion.datasets.sharded import ShardedParquetSource
from potion.datasets.stored import stored_view
from potion.errors import PotionError


def shard_set(root, n_train=23, n_test=7, shards=3, seed=0, size=8, row_group=4):
    images, test_images = smooth_images(n_train, seed, size), smooth_images(n_test, seed + 1, size)
    labels = np.arange(n_train) % 3
    write_shards(root, "train", images, labels, shards, row_group=row_group)
    write_shards(root, "test", test_images, np.arange(n_test) % 3, 1)
    return images, labels


def test_shards_are_read_in_name_order_and_equal_the_in_memory_path(tmp_path):
    images, labels = shard_set(tmp_path)
    streamed = load_dataset("parquet", root=tmp_path, stream=True, workers=0)
    memory = load_dataset("parquet", root=tmp_path, stream=False)
    assert isinstance(streamed.train, ShardedParquetSource) and streamed.train.streamed
    assert not memory.train.streamed
    # index i is row i of the shards concatenated in file-name order (PNG: lossless)
    np.testing.assert_array_equal(streamed.train.labels, labels)
    idx = np.array([22, 0, 8, 7, 15, 3])
    assert torch.equal(streamed.train.load(idx), torch.from_numpy(images[idx]))
    assert torch.equal(streamed.train.load(np.arange(23)), memory.train.images)
    assert streamed.mean == memory.mean and streamed.std == memory.std  # exact: fewer than STATS_SAMPLE images
    assert streamed.classes == memory.classes == ["a", "b", "c"] and streamed.hflip


def test_one_file_streamed_equals_todays_in_memory_path(tmp_path):
    images = smooth_images(20, 3)
    write_shards(tmp_path / "s", "x", images, np.arange(20) % 3, 1)
    (tmp_path / "s" / "x-00000-of-00001.parquet").rename(tmp_path / "train.parquet")
    shutil.copy(tmp_path / "train.parquet", tmp_path / "test.parquet")
    today = load_dataset("parquet", root=tmp_path, train_limit=9, seed=4)
    streamed = load_dataset("parquet", root=tmp_path, train_limit=9, seed=4, stream=True, workers=0)
    assert not today.train.streamed and streamed.train.streamed
    np.testing.assert_array_equal(today.train.labels, streamed.train.labels)  # the same seeded draw
    assert torch.equal(today.train.images, streamed.train.load(np.arange(9)))
    assert (today.mean, today.std) == (streamed.mean, streamed.std)


def test_decode_workers_give_the_same_batches(tmp_path):
    shard_set(tmp_path, n_train=30)
    s = load_dataset("parquet", root=tmp_path, stream=True)
    view = stored_view(s.train, s.mean, s.std)
    kw = dict(shuffle=True, seed=3, augment=True)
    inline = list(view.batches(8, num_workers=0, **kw))
    workers = list(view.batches(8, num_workers=2, **kw))
    assert len(inline) == len(workers) == 4
    for (x0, y0), (x1, y1) in zip(inline, workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_a_streamed_source_pickles_without_its_cached_bytes(tmp_path):
    shard_set(tmp_path, n_train=60, size=32, row_group=60)
    src = load_dataset("parquet", root=tmp_path, stream=True, workers=0).train
    src.load(np.arange(60))  # fills the row-group cache
    assert src._groups
    clone = pickle.loads(pickle.dumps(src))
    assert not clone._groups and len(pickle.dumps(src)) < 20_000
    assert torch.equal(clone.load(np.array([5, 59])), src.load(np.array([5, 59])))


def test_streamed_and_in_memory_importances_agree(tmp_path):
    from potion.models import create_model
    from potion.unlearning.importances import compute_importances

    shard_set(tmp_path, n_train=40)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, in_channels=3, image_size=8, width=4).eval()
    retain = np.setdiff1d(np.arange(40), [2, 5, 11])
    out = []
    for stream in (True, False):
        s = load_dataset("parquet", root=tmp_path, stream=stream, workers=1)
        view = stored_view(s.train, s.mean, s.std).subset(retain)
        out.append(compute_importances(model, view.batches(8), "xlf"))
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-5, atol=0)


def test_images_of_other_sizes_need_an_image_size(tmp_path):
    write_shards(tmp_path, "train", smooth_images(4, 0, 8), [0, 1, 2, 0], 1)
    write_shards(tmp_path, "test", smooth_images(3, 0, 12), [0, 1, 2], 1)
    with pytest.raises(PotionError, match="image_size"):
        load_dataset("parquet", root=tmp_path, stream=True)
    s = load_dataset("parquet", root=tmp_path, image_size=6, workers=0)
    assert s.image_shape == (3, 6, 6) and s.test.load(np.arange(3)).shape == (3, 3, 6, 6)


def test_a_truncated_shard_is_named(tmp_path):
    shard_set(tmp_path)
    shard = tmp_path / "train-00001-of-00003.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(PotionError, match=f"{shard} is not a readable Parquet file.*truncated"):
        load_dataset("parquet", root=tmp_path, stream=True)


def test_an_undecodable_image_names_its_shard_and_row_even_in_a_worker(tmp_path):
    shard_set(tmp_path)
    s = load_dataset("parquet", root=tmp_path, stream=True)
    shard = tmp_path / "train-00002-of-00003.parquet"
    table = pq.read_table(shard)
    blobs = table.column("image").to_pylist()
    blobs[2] = {"bytes": b"not a jpeg", "path": None}
    pq.write_table(table.set_column(0, "image", pa.array(blobs, table.schema.field("image").type)), shard)
    with pytest.raises(PotionError, match=f"row 2 of {shard} is not a decodable"):
        load_dataset("parquet", root=tmp_path, stream=True)  # the statistics read it
    source = pickle.loads(pickle.dumps(s.train))  # the index built before the damage, no cached bytes
    view = stored_view(source, s.mean, s.std)
    with pytest.raises(PotionError, match=f"row 2 of {shard} is not a decodable") as err:
        list(view.batches(5, num_workers=1))
    assert "\n" not in str(err.value)  # the one-line error, not the worker's traceback


def test_missing_shards_say_what_was_looked_for(tmp_path):
    shard_set(tmp_path)
    with pytest.raises(PotionError, match="no Parquet files match .*valid-\\*.parquet"):
        load_dataset("parquet", root=tmp_path, test_file="valid-*.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PotionError, match="train.parquet does not exist \\(nor train-\\*.parquet or data/train"):
        load_dataset("parquet", root=tmp_path / "empty")
    with pytest.raises(PotionError, match="stream must be true, false or null"):
        load_dataset("parquet", root=tmp_path, stream="yes")


@pytest.mark.slow
def test_a_heal_finds_the_same_k_star_on_both_paths(tmp_path):
    """A run trained on shards decoded into memory, healed once as trained and once with its
    data streamed: the same deletion set, k* and healed metrics."""
    from potion.cli import main
    from potion.config import dump_yaml, load_yaml

    digits = load_dataset("digits")
    root = tmp_path / "digits-shards"
    write_shards(root, "train", digits.train.images.numpy(), digits.train.labels, 4, classes=None)
    write_shards(root, "test", digits.test.images.numpy(), digits.test.labels, 2, classes=None)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "parquet", "--data-root", str(root), "--set", "data.args.stream=false",
                 "--poison-share", "0.05", "--seed", "0", "--iterations", "120", "--out", str(run), "--quiet"]) == 0
    streamed_run = tmp_path / "run-streamed"
    shutil.copytree(run, streamed_run)
    config = load_yaml(streamed_run / "config.yaml")
    config["data"]["args"].update(stream=True, workers=1)
    (streamed_run / "config.yaml").write_text(dump_yaml(config))
    reports = []
    for r, backend in ((run, []), (streamed_run, []), (streamed_run, ["--backend", "ray", "--num-cpus", "2"])):
        out = tmp_path / f"heal-{r.name}-{len(backend)}"
        assert main(["heal", "--run", str(r), "--discovery-share", "0.3", "--method", "xlf_ptn", "--quiet",
                     "--tracking-uri", "none", "--cache-dir", "none", "--out", str(out), *backend]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    memory, streamed, on_ray = reports
    assert memory["k_star"] is not None and memory["k_star"] == streamed["k_star"] == on_ray["k_star"]
    assert memory["after"] == streamed["after"]
    # on Ray the retain pass of a streamed set ran as Ray Data chunks: sums in another order, same α
    assert "importance_chunks" in on_ray["placement"]
    assert on_ray["alpha"] == pytest.approx(memory["alpha"], rel=1e-5)

    # The default, potion_plus: its clean images are decoded pass by pass, and its flags from the
    # first pass must meet the same rows in every later one, streamed as in memory
    plus = []
    for r in (run, streamed_run):
        out = tmp_path / f"plus-{r.name}"
        assert main(["heal", "--run", str(r), "--discovery-share", "0.5", "--quiet", "--tracking-uri", "none",
                     "--cache-dir", "none", "--out", str(out)]) == 0
        plus.append(json.loads((out / "report.json").read_text()))
    memory, streamed = plus
    assert memory["method"] == streamed["method"] == "potion_plus"
    assert memory["info"]["plus"]["neggrad"] == streamed["info"]["plus"]["neggrad"]  # every check alike
    assert memory["info"]["plus"]["neggrad"]["checks"] and memory["info"]["plus"]["repair_dropped"] > 0
    assert memory["info"]["plus"]["repair_images"] > 0 and memory["after"] == streamed["after"]


@pytest.mark.slow
@pytest.mark.ray
def test_the_scale_benchmark_smoke_run():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"scale rss_growth ([\d.]+) pass_ips_1node ([\d.]+) pass_ips_3nodes ([\d.]+)", last)
    assert m, last
    assert float(m.group(1)) < 1.25  # 8x the images, streamed: the heal's memory barely moves
    assert float(m.group(2)) > 0 and float(m.group(3)) > 0


TWO_NODES = """
import functools, json, sys

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

from potion.distributed import runtime
from potion.distributed.data_pass import data_importance_sums
from potion.errors import PotionError
from potion.heal.inputs import _owner_train_view
from potion.models import create_model, model_from_state
from potion.unlearning.importances import importance_sums
from test_multinode import _node_ports, free_port

root = sys.argv[1]
c = Cluster(initialize_head=True, connect=False,
            head_node_args=dict(gcs_server_port=free_port(), include_dashboard=False,
                                ray_client_server_port=free_port(), dashboard_port=free_port(), **_node_ports()))
c.add_node(**_node_ports())
c.wait_for_nodes()
runtime.connect(c.address)
try:
    view_factory = functools.partial(_owner_train_view, "parquet", {"root": root, "stream": True, "workers": 0},
                                     (0.5,) * 3, (0.25,) * 3, None)
    kwargs = dict(num_classes=3, in_channels=3, image_size=8, width=4)
    torch.manual_seed(0)
    model_factory = functools.partial(model_from_state, "small_cnn", kwargs,
                                      create_model("small_cnn", **kwargs).state_dict())
    retain = np.random.default_rng(1).permutation(90)[:71]  # Dr's order is kept, not sorted
    want, k_local = importance_sums(model_factory(), view_factory().subset(retain).batches(8), "xlf")
    placement = {}
    got, k = data_importance_sums(model_factory, view_factory, retain, "xlf", None, 8, device="cpu",
                                  placement=placement)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12)
    shard = f"{root}/train-00003-of-00004.parquet"
    with open(shard, "rb") as f:
        head = f.read(100)
    with open(shard, "wb") as f:  # the actors open it after the driver indexed the set
        f.write(head)
    try:
        data_importance_sums(model_factory, view_factory, retain, "xlf", None, 8, device="cpu")
        truncated = "no error"
    except PotionError as e:
        truncated = str(e)
    print(json.dumps({"k": k, "k_local": k_local, "nodes": len(placement["importance_chunks"]),
                      "truncated": truncated}))
finally:
    ray.shutdown()
    c.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_data_pass_on_two_nodes_equals_the_local_pass(tmp_path):
    """On a head and one more node of 1 CPU each. The driver runs in a process of its own: a
    driver still joined when ``Cluster.shutdown`` stops the nodes is ended by Ray (seen once
    in a full run: the test process itself went)."""
    import subprocess
    import sys
    from pathlib import Path

    shard_set(tmp_path, n_train=90, shards=4, row_group=8)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["k"] == got["k_local"] == 9
    assert got["nodes"] == 2  # an actor on each node, each reading its own chunks
    shard = tmp_path / "train-00003-of-00004.parquet"
    assert f"{shard} is not a readable Parquet file" in got["truncated"]
