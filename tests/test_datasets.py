import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from potion.datasets import DATASETS, clean_test_view, load_dataset
from potion.errors import PotionError

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def brute_stats(images: torch.Tensor):
    x = images.double() / 255
    return x.mean(dim=(0, 2, 3)).numpy(), x.std(dim=(0, 2, 3), unbiased=False).numpy()


def test_registered_sources():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "ilsvrc", "imagefolder", "parquet"]


def test_unknown_dataset_and_parameter():
    with pytest.raises(PotionError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(PotionError, match="no parameter 'upscal'"):
        load_dataset("digits", upscal=2)
    with pytest.raises(PotionError, match="needs the parameter 'root'"):
        load_dataset("parquet")


# ---------------------------------------------------------------- digits


def test_digits():
    from sklearn.datasets import load_digits

    s = load_dataset("digits", upscale=2, test_share=0.2, seed=0)
    assert s.classes == [str(i) for i in range(10)] and s.hflip is False
    assert s.image_shape == (1, 16, 16) and len(s.train) + len(s.test) == 1797 and len(s.test) == 360
    assert s.train.images.dtype == torch.uint8
    # Stratified: every class is in the test set in proportion.
    assert np.all(np.abs(np.bincount(s.test.labels) - 36) <= 2)
    # Pixels: 0..16 stretched to 0..255, each pixel repeated 2×2. Find train images in the original.
    bunch = load_digits()
    ref = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    first = s.train.images[0, 0].numpy()
    small = first[::2, ::2]
    assert np.array_equal(np.kron(small, np.ones((2, 2), np.uint8)), first)
    assert any(np.array_equal(small, r) for r in ref[bunch.target == s.train.labels[0]])
    assert s.train.images.max() == 255
    mean, std = brute_stats(s.train.images)
    assert np.allclose(s.mean, mean) and np.allclose(s.std, std)
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(again.test.images, s.test.images)
    assert not torch.equal(other.test.images, s.test.images)
    assert load_dataset("digits", upscale=1).image_shape == (1, 8, 8)
    with pytest.raises(PotionError, match="upscale"):
        load_dataset("digits", upscale=0)


# ---------------------------------------------------------------- parquet


def write_parquet(path: Path, images: list[np.ndarray], labels, classes="a,b,c", column="image", struct=True):
    blobs = [png(a) for a in images]
    col = pa.array([{"bytes": b, "path": None} for b in blobs], IMAGE_TYPE) if struct else pa.array(blobs, pa.binary())
    table = pa.table({column: col, "label": pa.array(labels, pa.int64())})
    if classes is not None:
        table = table.replace_schema_metadata({"classes": classes})
    pq.write_table(table, path)


def rgb_images(n, seed, size=(5, 6)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def test_parquet_rgb(tmp_path):
    train, test = rgb_images(12, 0), rgb_images(4, 1)
    write_parquet(tmp_path / "train.parquet", train, [i // 4 for i in range(12)])  # sorted by class
    write_parquet(tmp_path / "test.parquet", test, [0, 1, 2, 0])
    s = load_dataset("parquet", root=tmp_path)
    assert s.classes == ["a", "b", "c"] and s.hflip is True and s.image_shape == (3, 5, 6)
    assert torch.equal(s.train.images, torch.from_numpy(np.stack(train)).permute(0, 3, 1, 2))
    assert s.train.labels.tolist() == [i // 4 for i in range(12)] and s.test.labels.tolist() == [0, 1, 2, 0]
    mean, std = brute_stats(s.train.images)
    assert np.allclose(s.mean, mean) and np.allclose(s.std, std)
    assert next(iter(clean_test_view(s).batches(4)))[0].shape == (4, 3, 5, 6)


def test_parquet_limit_is_a_seeded_random_draw(tmp_path):
    train = rgb_images(12, 0)
    write_parquet(tmp_path / "train.parquet", train, [i // 4 for i in range(12)])
    write_parquet(tmp_path / "test.parquet", rgb_images(4, 1), [0, 1, 2, 0])
    s = load_dataset("parquet", root=tmp_path, train_limit=6, test_limit=2, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(12, 6, replace=False))
    assert not np.array_equal(rows, np.arange(6))
    assert torch.equal(s.train.images, torch.from_numpy(np.stack(train)[rows]).permute(0, 3, 1, 2))
    assert s.train.labels.tolist() == (rows // 4).tolist() and len(s.test) == 2
    s2 = load_dataset("parquet", root=tmp_path, train_limit=6, seed=4)
    assert not torch.equal(s2.train.images, s.train.images)
    with pytest.raises(PotionError, match="train_limit"):
        load_dataset("parquet", root=tmp_path, train_limit=0)


def test_parquet_pil_fallback_decodes_the_same(tmp_path, monkeypatch):
    from potion.datasets import parquet as pqmod

    write_parquet(tmp_path / "train.parquet", rgb_images(4, 0), [0, 1, 2, 0])
    rng = np.random.default_rng(2)
    grey = [rng.integers(0, 256, (5, 6), dtype=np.uint8) for _ in range(3)]
    write_parquet(tmp_path / "test.parquet", grey, [0, 1, 2])
    fast = pqmod.read_split(tmp_path / "train.parquet", "image", "label", None, 0, "", "train_limit")[0]
    fast_grey = pqmod.read_split(tmp_path / "test.parquet", "image", "label", None, 0, "", "test_limit")[0]
    monkeypatch.setattr(pqmod, "USE_TORCHVISION", False)
    slow = pqmod.read_split(tmp_path / "train.parquet", "image", "label", None, 0, "", "train_limit")[0]
    slow_grey = pqmod.read_split(tmp_path / "test.parquet", "image", "label", None, 0, "", "test_limit")[0]
    assert torch.equal(fast, slow) and torch.equal(fast_grey, slow_grey) and slow_grey.shape == (3, 1, 5, 6)


def test_parquet_grey_binary_column_no_classes(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (7, 7), dtype=np.uint8) for _ in range(5)]
    for f in ("tr.parquet", "te.parquet"):
        write_parquet(tmp_path / f, grey, [0, 1, 3, 1, 0], classes=None, column="img", struct=False)
    s = load_dataset("parquet", root=tmp_path, image_column="img", train_file="tr.parquet", test_file="te.parquet")
    assert s.image_shape == (1, 7, 7) and s.hflip is False
    assert s.classes == ["0", "1", "2", "3"]
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(np.stack(grey)))


def test_parquet_errors_name_the_path(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(PotionError, match=f"{missing} does not exist.*train.parquet"):
        load_dataset("parquet", root=missing)
    with pytest.raises(PotionError, match=f"{tmp_path / 'train.parquet'} does not exist"):
        load_dataset("parquet", root=tmp_path)
    (tmp_path / "train.parquet").write_text("hello")
    with pytest.raises(PotionError, match=f"{tmp_path / 'train.parquet'} is not a readable Parquet"):
        load_dataset("parquet", root=tmp_path)
    write_parquet(tmp_path / "train.parquet", rgb_images(3, 0), [0, 1, 2])
    write_parquet(tmp_path / "test.parquet", rgb_images(3, 0), [0, 1, 2])
    with pytest.raises(PotionError, match="no column 'img'.*columns: image, label.*image_column"):
        load_dataset("parquet", root=tmp_path, image_column="img")
    with pytest.raises(PotionError, match="'image'.*not an integer"):
        load_dataset("parquet", root=tmp_path, label_column="image")
    write_parquet(tmp_path / "test.parquet", rgb_images(3, 0), [0, 1, 5])
    with pytest.raises(PotionError, match="labels range over 0..5 but there are 3 class names"):
        load_dataset("parquet", root=tmp_path)
    write_parquet(tmp_path / "test.parquet", rgb_images(2, 0, size=(5, 6)) + rgb_images(1, 0, size=(4, 4)), [0, 1, 2])
    with pytest.raises(PotionError, match=f"row 2 of {tmp_path / 'test.parquet'}.*one size"):
        load_dataset("parquet", root=tmp_path)
    table = pa.table({"image": pa.array([{"bytes": b"garbage", "path": None}], IMAGE_TYPE), "label": [0]})
    pq.write_table(table.replace_schema_metadata({"classes": "a,b,c"}), tmp_path / "test.parquet")
    with pytest.raises(PotionError, match=f"row 0 of {tmp_path / 'test.parquet'} is not a decodable"):
        load_dataset("parquet", root=tmp_path)


# ---------------------------------------------------------------- cifar


def dump(obj, path: Path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def fake_cifar10(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, 10, 3).tolist())
        dump({"batch_label": name, "data": batches[name][0], "labels": batches[name][1]}, folder / name)
    dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, folder / "batches.meta")
    return batches


def test_cifar10_fake_folder(tmp_path):
    batches = fake_cifar10(tmp_path)
    s = load_dataset("cifar10", root=tmp_path)
    assert len(s.train) == 15 and len(s.test) == 3 and s.image_shape == (3, 32, 32)
    assert s.classes == [f"c{i}" for i in range(10)] and s.hflip is True
    data, labels = batches["data_batch_2"]
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32×32.
    assert torch.equal(s.train.images[3, 1, 0], torch.from_numpy(data[0, 1024:1056]))
    assert torch.equal(s.train.images[4, 2, 31, 31], torch.tensor(data[1, 3071]))
    assert s.train.labels[3:6].tolist() == labels
    assert s.test.labels.tolist() == batches["test_batch"][1]
    assert s.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    # Pointing at the unpacked folder itself works too.
    assert len(load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py").train) == 15


def test_cifar100_fake_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n)),
              "coarse_labels": [0] * n}, folder / name)
    dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, folder / "meta")
    s = load_dataset("cifar100", root=tmp_path)
    assert len(s.train) == 6 and len(s.classes) == 100 and s.train.labels.tolist() == list(range(6))


def test_cifar_errors_name_the_path(tmp_path):
    with pytest.raises(PotionError, match=f"{tmp_path / 'cifar-10-batches-py'} does not exist.*data_batch_1"):
        load_dataset("cifar10", root=tmp_path)
    fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(PotionError, match=f"{folder / 'data_batch_3'} is missing"):
        load_dataset("cifar10", root=tmp_path)
    dump({"labels": [0]}, folder / "data_batch_3")
    with pytest.raises(PotionError, match=f"{folder / 'data_batch_3'}: no 'data' entry"):
        load_dataset("cifar10", root=tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(PotionError, match=f"{folder / 'data_batch_3'} is not a CIFAR python batch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_refuses_code_in_pickles(tmp_path):
    fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    dump({"label_names": Evil()}, tmp_path / "cifar-10-batches-py" / "batches.meta")
    with pytest.raises(PotionError, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- imagefolder


def write_tree(root: Path) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 3), ("val", 1)):
        for cls, rgb in colours.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (40, 30) if i % 2 == 0 else (20, 50)  # landscape and portrait
                Image.new("RGB", size, rgb).save(d / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder(tmp_path):
    write_tree(tmp_path)
    s = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert s.classes == ["cat", "dog"] and s.train.streamed and s.hflip is True
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and s.test.labels.tolist() == [0, 1]
    assert s.image_shape == (3, 16, 16) and s.mean == (0.485, 0.456, 0.406)
    x = s.train.load(np.array([4, 0]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8
    assert (x[0, 2] == 255).all() and (x[0, :2] == 0).all()  # a blue dog
    assert (x[1, 0] == 255).all() and (x[1, 1:] == 0).all()  # a red cat
    view = clean_test_view(type(s)(s.name, s.train, s.train, (0.0,) * 3, (1.0,) * 3, True))
    serial = [b[0] for b in view.batches(4, shuffle=True, augment=True, seed=1)]
    parallel = [b[0] for b in view.batches(4, shuffle=True, augment=True, seed=1, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(parallel) == 2


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(PotionError, match=f"{tmp_path / 'x'} does not exist.*one folder per class"):
        load_dataset("imagefolder", root=tmp_path / "x")
    write_tree(tmp_path)
    with pytest.raises(PotionError, match=f"{tmp_path / 'test'} does not exist"):
        load_dataset("imagefolder", root=tmp_path, test_dir="test")
    (tmp_path / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(PotionError, match=f"{tmp_path / 'val' / 'bird'} is a class"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PotionError, match=f"no image files in class folders under {tmp_path / 'empty'}"):
        load_dataset("imagefolder", root=tmp_path, train_dir="empty")
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"broken")
    s = load_dataset("imagefolder", root=tmp_path, test_dir="train", image_size=8)
    with pytest.raises(PotionError, match=f"cannot decode {tmp_path / 'train' / 'cat' / '0.png'}"):
        s.train.load(np.array([0]))


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "data.bin"
    f.write_text("x")
    for name in ("parquet", "imagefolder", "cifar10"):
        with pytest.raises(PotionError, match=f"{f} is not a folder"):
            load_dataset(name, root=f)
