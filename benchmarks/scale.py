"""How the streamed data path scales: memory as the retain set grows, and images/s of the retain pass.

    python benchmarks/scale.py            # 5k and 40k images (minutes on 2 cores)
    python benchmarks/scale.py --smoke    # 250 and 2,000 images (CI: about a minute)

It writes synthetic image sets into a temporary folder (64 px JPEG, 10 classes, Parquet
shards of 5,000 rows in row groups of 500, HF's names; and the smallest set again as an
image-folder tree), then measures:

- rss: the peak resident memory of a whole heal (``run_heal``: an owner's small_cnn, its
  random weights, 1 % of the images identified, method ``ssd``, i.e. the two importance
  passes, the dampening and the before/after evaluation; no cache, no MLflow), each in a
  fresh process, on the smallest and on the 8× set, streamed and decoded into memory;
- pass_ips: images per second of the retain pass (``importance_sums``, XLF, batch 256) on
  the smallest set, decoded inline and with 1 and 2 loader workers, for the shards and for
  the folder tree;
- nodes: the same pass through the Ray Data actor pool (``data_importance_sums``) on a
  ``ray.cluster_utils.Cluster`` of 3 nodes of 1 CPU each, with 1, 2 and 3 actors (one per
  node), decoding inline, and the object store's peak use sampled every 0.2 s.

Its last line is ``scale rss_growth R pass_ips_1node A pass_ips_3nodes B``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIZE = 64
CLASSES = 10
SHARD_ROWS = 5000
ROW_GROUP = 500
MODEL = ("small_cnn", {"width": 16})
BATCH = 256


# ---------------------------------------------------------------- the synthetic sets
def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 3, 64, 64): blurred 8×8 colour noise plus fine noise (JPEG-compressible, not flat)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32)
    img = np.kron(low, np.ones((1, 1, SIZE // 8, SIZE // 8), np.float32)) + rng.normal(0, 10, (n, 3, SIZE, SIZE))
    return np.clip(img, 0, 255).astype(np.uint8), rng.integers(0, CLASSES, n)


def write_sets(base: Path, sizes: list[int], n_test: int) -> dict[int, Path]:
    """Shards of the largest set once; each size is a folder linking its first shards."""
    import pyarrow.parquet as pq

    from potion.jobs.data import Split, encode_split

    shards_dir = base / "shards"
    shards_dir.mkdir(parents=True)
    rows = min(SHARD_ROWS, min(sizes))
    n_shards = -(-max(sizes) // rows)
    meta = {"classes": ",".join(f"c{i}" for i in range(CLASSES))}
    for s in range(n_shards):
        images, labels = synthetic(rows, seed=s)
        table = encode_split(Split(images, labels), 90).replace_schema_metadata(meta)
        pq.write_table(table, shards_dir / f"train-{s:05d}-of-{n_shards:05d}.parquet", row_group_size=ROW_GROUP)
    images, labels = synthetic(n_test, seed=10_000)
    pq.write_table(encode_split(Split(images, labels), 90).replace_schema_metadata(meta),
                   shards_dir / "test-00000-of-00001.parquet")
    sets = {}
    for n in sizes:
        d = base / f"set-{n}"
        d.mkdir()
        for s in range(n // rows):
            (d / f"train-{s:05d}-of-{n // rows:05d}.parquet").symlink_to(
                shards_dir / f"train-{s:05d}-of-{n_shards:05d}.parquet")
        (d / "test-00000-of-00001.parquet").symlink_to(shards_dir / "test-00000-of-00001.parquet")
        sets[n] = d
    return sets


def write_tree(base: Path, shards: Path) -> Path:
    """The same images as files: <tree>/train/<class>/<i>.jpg (the JPEG bytes of the shards)."""
    import pyarrow.parquet as pq

    tree = base / "tree"
    for split, pattern in (("train", "train-*.parquet"), ("val", "test-*.parquet")):
        i = 0
        for f in sorted(shards.glob(pattern)):
            t = pq.read_table(f)
            for blob, label in zip(t.column("image").to_pylist(), t.column("label").to_pylist()):
                p = tree / split / f"c{label}" / f"{i:06d}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(blob["bytes"])
                i += 1
    return tree


# ---------------------------------------------------------------- one heal in its own process
def heal_child(root: str, stream: bool, out: str) -> None:
    """Runs in a fresh interpreter: one heal, then its peak RSS (this process and its loaders) as JSON."""
    import torch

    from potion.heal.inputs import OwnerSource
    from potion.heal.run import run_heal
    from potion.models import create_model
    from potion.runs.configs import HealJob

    torch.set_num_threads(1)
    work = Path(out)
    torch.manual_seed(0)
    weights = work / "weights.pt"
    torch.save(create_model(MODEL[0], num_classes=CLASSES, in_channels=3, image_size=SIZE, **MODEL[1]).state_dict(),
               weights)
    source = OwnerSource(model=MODEL[0], model_args=dict(MODEL[1]), weights=weights, dataset="parquet",
                         data_args={"root": root, "stream": stream})
    from potion.datasets import load_dataset

    n = len(load_dataset("parquet", root=root, stream=True, workers=0).train)  # the index only
    identified = work / "identified.csv"
    identified.write_text("index\n" + "".join(f"{i}\n" for i in range(0, n, 100)))
    job = HealJob(method="ssd", tracking_uri="none", cache_dir="none", device="cpu", importance_batch_size=BATCH,
                  eval_batch_size=BATCH)
    t = time.perf_counter()
    run_heal(source, job, work / "heal", identified=identified, progress=False)
    seconds = time.perf_counter() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rss_mb": own / 1024, "loader_rss_mb": kids / 1024, "n": n, "seconds": seconds}))


def heal_rss(root: Path, stream: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-heal-") as work:
        proc = subprocess.run([sys.executable, __file__, "--heal-child", str(root), "--stream", str(int(stream)),
                               "--out", work], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the heal on {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the retain pass
def model_factory():
    import torch

    from potion.models import create_model, model_from_state

    kwargs = dict(num_classes=CLASSES, in_channels=3, image_size=SIZE, **MODEL[1])
    torch.manual_seed(0)
    return functools.partial(model_from_state, MODEL[0], kwargs, create_model(MODEL[0], **kwargs).state_dict())


def pass_ips(view, workers: int) -> float:
    from potion.unlearning.importances import importance_sums

    t = time.perf_counter()
    _, k = importance_sums(model_factory()(), view.batches(BATCH, num_workers=workers), "xlf")
    return len(view) / (time.perf_counter() - t)


def local_passes(root: Path, tree: Path) -> dict:
    import torch

    from potion.datasets import load_dataset
    from potion.datasets.stored import stored_view

    torch.set_num_threads(1)  # one core for the model, the other for a loader
    out = {}
    for name, splits in (("shards", load_dataset("parquet", root=str(root), stream=True)),
                         ("tree", load_dataset("imagefolder", root=str(tree), image_size=SIZE))):
        view = stored_view(splits.train, splits.mean, splits.std)
        out[name] = {f"workers_{w}": round(pass_ips(view, w), 1) for w in (0, 1, 2)}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args() -> dict:
    return dict(dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
                runtime_env_agent_port=free_port(), metrics_agent_port=free_port(), num_cpus=1)


def object_store_mib() -> float:
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(m.group(1)) if m else 0.0


def node_passes(root: Path, nodes: int) -> dict:
    """The Ray Data pass with 1..nodes actors on a local cluster of ``nodes`` 1-CPU nodes."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from potion.distributed import runtime
    from potion.distributed.data_pass import data_importance_sums
    from potion.heal.inputs import _owner_train_view

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args=dict(gcs_server_port=free_port(), include_dashboard=False,
                                          ray_client_server_port=free_port(), dashboard_port=free_port(), **node_args()))
    for _ in range(nodes - 1):
        cluster.add_node(**node_args())
    cluster.wait_for_nodes()
    out: dict = {}
    try:
        runtime.connect(cluster.address)
        view_factory = functools.partial(_owner_train_view, "parquet", {"root": str(root), "stream": True, "workers": 0},
                                         (0.5,) * 3, (0.25,) * 3, None)
        n = len(view_factory())
        peak = [0.0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], object_store_mib())
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for k in range(1, nodes + 1):
            placement: dict = {}
            t = time.perf_counter()
            data_importance_sums(model_factory(), view_factory, np.arange(n), "xlf", None, BATCH, num_actors=k,
                                 device="cpu", placement=placement)
            seconds = time.perf_counter() - t
            out[f"nodes_{k}"] = {"ips": round(n / seconds, 1), "seconds": round(seconds, 2),
                                 "nodes_used": len(placement["importance_chunks"])}
        stop.set()
        sampler.join()
        out["object_store_peak_mib"] = peak[0]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="250 and 2,000 images (default: 5,000 and 40,000)")
    ap.add_argument("--heal-child", help=argparse.SUPPRESS)
    ap.add_argument("--stream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.heal_child:
        heal_child(args.heal_child, bool(args.stream), args.out)
        return
    small, big, n_test = (250, 2000, 200) if args.smoke else (5000, 40000, 1000)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="potion-scale-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        sets = write_sets(base, [small, big], n_test)
        tree = write_tree(base, sets[small])
        print(f"wrote {big:,} + {n_test:,} 64 px JPEGs as shards and {small:,} + {n_test:,} as a tree "
              f"in {time.perf_counter() - t:.0f} s")
        rss = {}
        for stream in (True, False):
            for n in (small, big):
                r = heal_rss(sets[n], stream)
                rss[(stream, n)] = r
                print(f"heal rss: {'streamed' if stream else 'in memory'} {n:>6,} images: peak {r['rss_mb']:.0f} MB "
                      f"(largest loader {r['loader_rss_mb']:.0f} MB), {r['seconds']:.1f} s")
        growth = rss[(True, big)]["rss_mb"] / rss[(True, small)]["rss_mb"]
        growth_mem = rss[(False, big)]["rss_mb"] / rss[(False, small)]["rss_mb"]
        print(f"rss growth for {big // small}x the images: streamed {growth:.3f}x, in memory {growth_mem:.3f}x")
        local = local_passes(sets[small], tree)
        for name, figures in local.items():
            print(f"retain pass, {name} of {small:,} images, images/s: "
                  + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items()))
        nodes = node_passes(sets[small], 3)
        for k in (1, 2, 3):
            f = nodes[f"nodes_{k}"]
            print(f"Ray Data pass on {k} node(s): {f['ips']} images/s ({f['seconds']} s, nodes used {f['nodes_used']})")
        print(f"object store peak: {nodes['object_store_peak_mib']:.0f} MiB")
    print(f"scale rss_growth {growth:.3f} pass_ips_1node {nodes['nodes_1']['ips']} "
          f"pass_ips_3nodes {nodes['nodes_3']['ips']}")


if __name__ == "__main__":
    main()
