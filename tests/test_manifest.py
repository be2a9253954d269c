import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from potion.datasets import (
    draw_deletion_set,
    load_manifest,
    make_manifest,
    make_trigger,
    resolve_count,
    save_manifest,
)
from potion.errors import PotionError

LABELS = np.arange(100) % 10


def test_make_manifest_matches_seeded_draw():
    trig = make_trigger("moving")
    m = make_manifest(LABELS, 20, target=0, trigger=trig, seed=3)
    rng = np.random.default_rng(3)
    drawn = rng.choice(100, size=20, replace=False)
    corners = rng.integers(0, 4, size=20)  # drawn after the indices, from the same generator
    assert np.array_equal(m.poisoned_indices, np.sort(drawn))
    expected_corners = np.full(100, -1)
    expected_corners[drawn] = corners
    assert np.array_equal(m.corners, expected_corners)
    assert np.array_equal(m.clean_labels, LABELS)
    expected_train = LABELS.copy()
    expected_train[drawn] = 0
    assert np.array_equal(m.train_labels, expected_train)
    assert not m.discovered_mask.any() and len(m.discovered_indices) == 0
    assert (m.target, m.seed, m.trigger_name, m.trigger_params) == (0, 3, "moving", {"size": 3})
    assert m.table.column("index").to_pylist() == list(range(100))
    rows = m.table.to_pylist()
    assert rows[drawn[0]]["trigger"] == "moving" and rows[drawn[0]]["trigger_params"] == '{"size": 3}'
    clean = int(np.flatnonzero(~m.poisoned_mask)[0])
    assert rows[clean]["trigger"] is None and rows[clean]["corner"] == -1


def test_samples_of_the_target_class_are_poisoned_too():
    m = make_manifest(np.zeros(10, dtype=np.int64), 10, 0, make_trigger("badnet"), seed=0)
    assert m.poisoned_mask.all() and np.array_equal(m.corners, np.full(10, 3))


def test_make_manifest_rejects_bad_input():
    with pytest.raises(PotionError, match="0..100"):
        make_manifest(LABELS, 101, 0, make_trigger("badnet"), seed=0)
    with pytest.raises(PotionError, match="target class"):
        make_manifest(LABELS, 5, 10, make_trigger("badnet"), seed=0)


def test_saved_bytes_reproducible(tmp_path):
    trig = make_trigger("moving")
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    save_manifest(make_manifest(LABELS, 20, 0, trig, seed=1), a)
    save_manifest(make_manifest(LABELS, 20, 0, trig, seed=1), b)
    save_manifest(make_manifest(LABELS, 20, 0, trig, seed=2), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "c.parquet"]  # no temp files


def test_roundtrip(tmp_path):
    m = make_manifest(LABELS, 20, 4, make_trigger("sine", freq=3, delta=0.1), seed=5)
    m = m.with_discovered(m.poisoned_indices[:3])
    save_manifest(m, tmp_path / "m.parquet")
    back = load_manifest(tmp_path / "m.parquet")
    assert back.table.equals(m.table)
    assert back.trigger_params == {"freq": 3, "delta": 0.1} and back.target == 4
    assert np.array_equal(back.discovered_indices, np.sort(m.poisoned_indices[:3]))


def test_with_discovered():
    m = make_manifest(LABELS, 20, 0, make_trigger("badnet"), seed=0)
    d = m.with_discovered(m.poisoned_indices[[4, 1, 1]])
    assert np.array_equal(d.discovered_indices, m.poisoned_indices[[1, 4]])
    assert not m.discovered_mask.any()  # the original is unchanged
    clean = np.flatnonzero(~m.poisoned_mask)[:1]
    with pytest.raises(PotionError, match="clean"):
        m.with_discovered(clean)
    with pytest.raises(PotionError, match="0..99"):
        m.with_discovered([100])


def test_resolve_count():
    assert resolve_count(0.25, None, 10, "x") == 3  # 2.5 rounds half up
    assert resolve_count(0.1, None, 50, "x") == 5
    assert resolve_count(0.002, None, 50000, "x") == 100
    assert resolve_count(0.001, None, 10, "x") == 1  # never below one sample
    assert resolve_count(None, 7, 10, "x") == 7
    assert resolve_count(0.0, None, 10, "x", minimum=0) == 0
    with pytest.raises(PotionError, match="exactly one"):
        resolve_count(0.1, 1, 10, "x")
    with pytest.raises(PotionError, match="exactly one"):
        resolve_count(None, None, 10, "x")
    with pytest.raises(PotionError, match="exceeds"):
        resolve_count(None, 11, 10, "deletion set")
    with pytest.raises(PotionError, match="share"):
        resolve_count(1.5, None, 10, "x")


def test_draw_deletion_set():
    m = make_manifest(LABELS, 20, 0, make_trigger("badnet"), seed=0)
    d = draw_deletion_set(m, share=0.5, seed=1)
    rng = np.random.default_rng(1)
    assert np.array_equal(d, np.sort(rng.choice(m.poisoned_indices, size=10, replace=False)))
    assert np.all(np.diff(d) > 0) and set(d) <= set(m.poisoned_indices)
    assert np.array_equal(d, draw_deletion_set(m, share=0.5, seed=1))
    assert not np.array_equal(d, draw_deletion_set(m, share=0.5, seed=2))
    assert len(draw_deletion_set(m, count=1, seed=0)) == 1  # one-shot
    assert len(draw_deletion_set(m, share=0.01)) == 1
    assert np.array_equal(draw_deletion_set(m, share=1.0), m.poisoned_indices)
    with pytest.raises(PotionError, match="exceeds the 20"):
        draw_deletion_set(m, count=21)
    with pytest.raises(PotionError, match="no poisoned"):
        draw_deletion_set(make_manifest(LABELS, 0, 0, make_trigger("badnet"), seed=0), count=1)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(PotionError, match=str(missing)):
        load_manifest(missing)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(PotionError, match=f"{junk}.*not a readable Parquet"):
        load_manifest(junk)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"index": [0, 1]}), other)
    with pytest.raises(PotionError, match=f"{other} lacks columns clean_label"):
        load_manifest(other)
