"""`potion data`: standard downloads → the Parquet layout, checked on tiny files made here."""
from __future__ import annotations

import gzip
import json
import pickle
import struct
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from potion.cli import main
from potion.datasets import load_dataset


def _idx(path, arr: np.ndarray, gz: bool):
    data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_mnist_idx_files_become_parquet_the_loader_reads_pixel_for_pixel(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "dl" / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("t10k", 5))}
    labs = {s: (np.arange(len(v)) % 10).astype(np.uint8) for s, v in imgs.items()}
    for s in imgs:
        _idx(raw / f"{s}-images-idx3-ubyte", imgs[s], gz=s == "train")
        _idx(raw / f"{s}-labels-idx1-ubyte", labs[s], gz=False)
    monkeypatch.setenv("POTION_DATA", str(tmp_path / "data"))
    assert main(["data", "mnist", "--from", str(tmp_path / "dl")]) == 0
    assert "12 train + 5 test images" in capsys.readouterr().out
    splits = load_dataset("parquet", root=str(tmp_path / "data" / "mnist"))
    assert np.array_equal(splits.train.images.numpy()[:, 0], imgs["train"])
    assert np.array_equal(splits.test.labels, labs["t10k"].astype(np.int64))
    assert splits.train.classes == [str(i) for i in range(10)]
    # an existing folder is kept unless --overwrite
    assert main(["data", "mnist", "--from", str(tmp_path / "dl")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "mnist", "--from", str(tmp_path / "nowhere")]) == 2


def _cifar_tarball(path, n_train=4, n_test=3):
    rng = np.random.default_rng(1)
    tmp = path.parent / "cifar-src" / "cifar-10-batches-py"
    tmp.mkdir(parents=True)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = (rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), [i % 10] * n_train)
    batches["test_batch"] = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), list(range(n_test)))
    for name, (data, labels) in batches.items():
        (tmp / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (tmp / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp, arcname="cifar-10-batches-py")
    return batches, names


def test_cifar10_tarball_becomes_parquet_lossless_and_jpeg(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    batches, names = _cifar_tarball(tarball)
    out = tmp_path / "c10"
    assert main(["data", "cifar10", "--from", str(tarball), "--out", str(out)]) == 0
    splits = load_dataset("parquet", root=str(out))
    want = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(splits.train.images.numpy(), want)  # PNG: lossless
    assert splits.train.classes == names and list(splits.test.labels) == [0, 1, 2]
    assert main(["data", "cifar10", "--from", str(tarball), "--data-root", str(tmp_path / "root"),
                 "--jpeg-quality", "75"]) == 0
    jpeg = load_dataset("parquet", root=str(tmp_path / "root" / "cifar10-jpeg"))
    diff = np.abs(jpeg.train.images.numpy().astype(int) - want.astype(int))
    assert jpeg.train.images.shape == splits.train.images.shape and 0 < diff.mean() < 80


def test_hugging_face_shards_with_img_column_and_classlabel_metadata(tmp_path):
    from PIL import Image
    import io

    src = tmp_path / "cifar10-hf" / "plain_text"
    src.mkdir(parents=True)
    rng = np.random.default_rng(2)
    names = ["cat", "dog", "fish"]
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "img": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}).encode()}
    pixels = {}
    for split, shards in (("train", 2), ("test", 1)):
        for i in range(shards):
            arrs = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
            blobs = []
            for a in arrs:
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG")
                blobs.append({"bytes": buf.getvalue(), "path": None})
            t = pa.table({"img": blobs, "label": pa.array([0, 1, 2], pa.int64())}).replace_schema_metadata(meta)
            pq.write_table(t, src / f"{split}-{i:05d}-of-{shards:05d}.parquet")
            pixels.setdefault(split, []).append(arrs)
    out = tmp_path / "out"
    assert main(["data", "hf", "--from", str(src), "--out", str(out)]) == 0
    splits = load_dataset("parquet", root=str(out))
    assert splits.train.classes == names and len(splits.train.labels) == 6 and len(splits.test.labels) == 3
    assert np.array_equal(splits.train.images.numpy(), np.concatenate(pixels["train"]).transpose(0, 3, 1, 2))
    with pytest.raises(SystemExit):
        main(["data", "imagenet", "--from", str(src)])
    assert main(["data", "hf", "--from", str(src), "--out", str(tmp_path / "o2"), "--label-column", "y"]) == 2
