"""ILSVRC's three layouts on small generated sets: the synset train tree, the flat validation
folder with its ground-truth file (Kaggle's CSV, a name list, the devkit's ID list), and
Hugging Face's sharded Parquet export; and the errors that name the bad file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from image_sets import save_image, smooth_images, write_shards
from potion.datasets import load_dataset
from potion.datasets.stored import stored_view
from potion.errors import PotionError

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: the class order of the folders


def ilsvrc_tree(root, per_class=3, n_val=5, gt="kaggle"):
    """train/<wnid>/<wnid>_<i>.JPEG of mixed sizes and val/ILSVRC2012_val_0000000i.JPEG."""
    for c, wnid in enumerate(WNIDS):
        for i, img in enumerate(smooth_images(per_class, c, size=12 + 4 * c)):
            save_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", img)
    val_labels = [(3 * i + 1) % 3 for i in range(n_val)]
    for i, img in enumerate(smooth_images(n_val, 9, size=10)):
        save_image(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", img)
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(n_val)]
    if gt == "kaggle":
        lines = ["ImageId,PredictionString"] + [f"{n},{WNIDS[y]} 1 2 30 40" for n, y in zip(names, val_labels)]
        (root / "LOC_val_solution.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]))  # any line order
    elif gt == "devkit":
        order = [WNIDS[2], WNIDS[0], WNIDS[1]]  # the devkit's ID order is not the sorted wnids
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} some name\n" for w in order))
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{order.index(WNIDS[y]) + 1}\n" for y in val_labels))
    return val_labels


@pytest.mark.parametrize("gt", ["kaggle", "devkit"])
def test_the_folder_layout_with_a_flat_validation_folder(tmp_path, gt):
    val_labels = ilsvrc_tree(tmp_path, gt=gt)
    s = load_dataset("ilsvrc", root=tmp_path, image_size=8, workers=0)
    assert s.classes == WNIDS and s.train.streamed and s.test.streamed and s.hflip
    np.testing.assert_array_equal(s.train.labels, np.repeat([0, 1, 2], 3))
    np.testing.assert_array_equal(s.test.labels, val_labels)
    assert s.train.load(np.array([8, 0])).shape == (2, 3, 8, 8)  # every size fitted to 8 × 8
    x, y = next(stored_view(s.test, s.mean, s.std).batches(5, num_workers=1))
    assert x.shape == (5, 3, 8, 8) and y.tolist() == val_labels


def test_a_validation_folder_sorted_into_synsets(tmp_path):
    ilsvrc_tree(tmp_path, gt=None)
    for f in (tmp_path / "val").iterdir():
        (tmp_path / "val" / WNIDS[1]).mkdir(exist_ok=True)
        f.rename(tmp_path / "val" / WNIDS[1] / f.name)
    s = load_dataset("ilsvrc", root=tmp_path, image_size=8, workers=0)
    assert s.test.labels.tolist() == [1] * 5


def test_the_hugging_face_export(tmp_path):
    images = smooth_images(20, 0, size=10)
    labels = np.arange(20) % 3
    write_shards(tmp_path / "data", "train", images, labels, 3, jpeg=90, row_group=4)
    write_shards(tmp_path / "data", "validation", images[:6], labels[:6], 2, jpeg=90)
    write_shards(tmp_path / "data", "test", images[:4], np.full(4, -1), 1, jpeg=90)  # HF's test: no labels
    s = load_dataset("ilsvrc", root=tmp_path, image_size=8, workers=0)
    assert s.train.streamed and len(s.train) == 20 and len(s.test) == 6
    np.testing.assert_array_equal(s.train.labels, labels)  # shards in name order, rows in file order
    assert s.train.load(np.arange(20)).shape == (20, 3, 8, 8)
    assert s.mean == (0.485, 0.456, 0.406)
    # the same rows as the generic parquet reader of the same shards
    p = load_dataset("parquet", root=tmp_path, test_file="data/validation-*.parquet", image_size=8, workers=0)
    assert torch.equal(p.train.load(np.arange(20)), s.train.load(np.arange(20)))


def test_a_missing_synset_names_the_ground_truth_line(tmp_path):
    ilsvrc_tree(tmp_path)
    gt = tmp_path / "LOC_val_solution.csv"
    gt.write_text(gt.read_text().replace(WNIDS[1], "n09999999"))
    with pytest.raises(PotionError, match=f"line \\d of {gt} names synset n09999999, which train/ has no folder"):
        load_dataset("ilsvrc", root=tmp_path, image_size=8)


def test_an_empty_synset_folder_and_an_unlabelled_image_are_named(tmp_path):
    ilsvrc_tree(tmp_path)
    (tmp_path / "train" / "n02000000").mkdir()
    with pytest.raises(PotionError, match=f"class folder {tmp_path / 'train' / 'n02000000'} has no image files"):
        load_dataset("ilsvrc", root=tmp_path)
    (tmp_path / "train" / "n02000000").rmdir()
    extra = tmp_path / "val" / "ILSVRC2012_val_00000099.JPEG"
    save_image(extra, smooth_images(1, 0)[0])
    with pytest.raises(PotionError, match=f"{extra} has no line in the ground-truth file"):
        load_dataset("ilsvrc", root=tmp_path)
    extra.unlink()
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(PotionError, match="no ground-truth file for the flat validation folder"):
        load_dataset("ilsvrc", root=tmp_path)


def test_an_unreadable_image_is_named_even_in_a_worker(tmp_path):
    ilsvrc_tree(tmp_path)
    bad = tmp_path / "train" / WNIDS[2] / f"{WNIDS[2]}_1.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    s = load_dataset("ilsvrc", root=tmp_path, image_size=8)
    view = stored_view(s.train, s.mean, s.std)
    with pytest.raises(PotionError, match=f"cannot decode {bad}") as err:
        list(view.batches(4, num_workers=1))
    assert "\n" not in str(err.value)


def test_a_truncated_shard_of_the_export_is_named(tmp_path):
    write_shards(tmp_path, "train", smooth_images(9, 0), np.arange(9) % 3, 3, jpeg=90)
    write_shards(tmp_path, "validation", smooth_images(3, 1), [0, 1, 2], 1, jpeg=90)
    shard = tmp_path / "train-00002-of-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(PotionError, match=f"{shard} is not a readable Parquet file.*truncated"):
        load_dataset("ilsvrc", root=tmp_path, image_size=8)
