import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potion.datasets import (
    ArraySource,
    DatasetSplits,
    LabeledView,
    clean_test_view,
    make_manifest,
    make_trigger,
    train_view,
    triggered_test_view,
)
from potion.datasets.views import random_crop_flip
from potion.errors import PotionError

H = W = 12


def tiny_splits(n_train=40, n_test=10, channels=3, hflip=True, mean=None, std=None) -> DatasetSplits:
    gen = torch.Generator().manual_seed(0)
    # Values in 1..200 so that no pixel equals the zero padding or the white trigger.
    tr = torch.randint(1, 201, (n_train, channels, H, W), generator=gen, dtype=torch.uint8)
    te = torch.randint(1, 201, (n_test, channels, H, W), generator=gen, dtype=torch.uint8)
    classes = [str(i) for i in range(4)]
    mean = mean or (0.0,) * channels
    std = std or (1.0,) * channels
    return DatasetSplits(
        "tiny",
        ArraySource(tr, np.arange(n_train) % 4, classes),
        ArraySource(te, np.arange(n_test) % 4, classes),
        mean,
        std,
        hflip,
    )


def all_batches(view, **kw):
    xs, ys = zip(*view.batches(**kw))
    return torch.cat(xs), torch.cat(ys)


def candidates(img: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """Every crop (and flip) RandomCrop(pad 4) can produce, by brute force."""
    p = F.pad(img, (4, 4, 4, 4))
    out = []
    for oy in range(9):
        for ox in range(9):
            crop = p[:, oy : oy + H, ox : ox + W]
            out.append(crop)
            if flips:
                out.append(crop.flip(-1))
    return out


def test_eval_batches_in_index_order_and_normalised():
    s = tiny_splits(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    view = clean_test_view(s)
    x, y = all_batches(view, batch_size=3)
    expected = s.test.images.float() / 255
    expected = (expected - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(s.test.labels))
    sizes = [len(b[1]) for b in view.batches(3)]
    assert sizes == [3, 3, 3, 1]
    assert [len(b[1]) for b in view.batches(3, drop_last=True)] == [3, 3, 3]


def test_trigger_only_on_flagged_samples():
    s = tiny_splits()
    m = make_manifest(s.train.labels, 8, target=1, trigger=make_trigger("badnet"), seed=0)
    x, y = all_batches(train_view(s, m), batch_size=16)
    raw = s.train.images.float() / 255
    poisoned = torch.from_numpy(m.poisoned_mask)
    assert torch.equal(y, torch.from_numpy(m.train_labels))
    assert (x[poisoned][:, :, -3:, -3:] == 1).all()
    assert torch.equal(x[~poisoned], raw[~poisoned])
    rest = x[poisoned].clone()
    rest[:, :, -3:, -3:] = raw[poisoned][:, :, -3:, -3:]
    assert torch.equal(rest, raw[poisoned])  # nothing but the patch changed


@pytest.mark.parametrize("name", ["badnet", "moving"])
def test_augmentation_does_not_move_the_trigger(name):
    s = tiny_splits()
    trig = make_trigger(name)
    view = triggered_test_view(s, trig, seed=4)
    x, _ = all_batches(view, batch_size=4, augment=True, seed=1)
    plain, _ = all_batches(view, batch_size=4, augment=False)
    slices = {0: (slice(0, 3), slice(0, 3)), 1: (slice(0, 3), slice(W - 3, W)),
              2: (slice(H - 3, H), slice(0, 3)), 3: (slice(H - 3, H), slice(W - 3, W))}
    for i, corner in enumerate(view.corners):
        r, c = slices[int(corner)]
        assert (x[i, :, r, c] == 1).all(), f"sample {i}: patch moved"
        assert int((x[i] == 1).sum()) == 27  # only the patch is white
    assert not torch.equal(x, plain)  # the augmentation did move the image


def test_sine_applied_after_augmentation():
    s = tiny_splits(channels=1, hflip=False)
    trig = make_trigger("sine", freq=2, delta=0.5)
    view = triggered_test_view(s, trig)
    x, _ = all_batches(view, batch_size=5, augment=True, seed=3)
    raw = s.test.images.float() / 255
    pattern = trig.pattern(W)
    shifted = 0
    for i in range(len(x)):
        # The stripes stay aligned with the output columns: x = clip(crop + pattern) for some crop.
        cands = candidates(raw[i], flips=False)
        match = [k for k, c in enumerate(cands) if torch.allclose((c + pattern).clamp(0, 1), x[i], atol=1e-6)]
        assert match, f"sample {i}: not a crop with the sine pattern added afterwards"
        shifted += 4 * 9 + 4 not in match  # index of the un-shifted crop
    assert shifted > 0


def test_augmented_images_are_crops_and_flips():
    s = tiny_splits(n_train=24, channels=1)
    view = clean_test_view(DatasetSplits("t", s.train, s.train, s.mean, s.std, True))
    x, _ = all_batches(view, batch_size=8, augment=True, seed=0)
    raw = s.train.images.float() / 255
    flipped = 0
    for i in range(len(x)):
        cands = candidates(raw[i], flips=True)
        match = [k for k, c in enumerate(cands) if torch.equal(c, x[i])]
        assert match, f"sample {i} is not a crop/flip of its source"
        flipped += all(k % 2 == 1 for k in match)
    assert 0 < flipped < len(x)


def test_no_flip_when_hflip_false():
    s = tiny_splits(n_train=24, channels=1, hflip=False)
    view = clean_test_view(DatasetSplits("t", s.train, s.train, s.mean, s.std, False))
    x, _ = all_batches(view, batch_size=8, augment=True, seed=0)
    raw = s.train.images.float() / 255
    for i in range(len(x)):
        assert any(torch.equal(c, x[i]) for c in candidates(raw[i], flips=False))


def test_random_crop_flip_uint8_matches_brute_force():
    img = torch.arange(2 * 5 * 6, dtype=torch.uint8).view(1, 2, 5, 6).repeat(3, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(img, gen, hflip=True, padding=2)
    gen = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 5, (3,), generator=gen), torch.randint(0, 5, (3,), generator=gen)
    flip = torch.rand(3, generator=gen) < 0.5
    p = F.pad(img, (2, 2, 2, 2))
    for b in range(3):
        crop = p[b, :, oy[b] : oy[b] + 5, ox[b] : ox[b] + 6]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)


def test_batches_are_deterministic():
    s = tiny_splits()
    m = make_manifest(s.train.labels, 8, 0, make_trigger("moving"), seed=0)
    view = train_view(s, m)
    a = all_batches(view, batch_size=8, shuffle=True, augment=True, seed=5)
    b = all_batches(view, batch_size=8, shuffle=True, augment=True, seed=5)
    c = all_batches(view, batch_size=8, shuffle=True, augment=True, seed=6)
    d = all_batches(view, batch_size=8, shuffle=True, augment=True, seed=5, epoch=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # num_workers is ignored for in-memory sources and must not change the result.
    e = all_batches(view, batch_size=8, shuffle=True, augment=True, seed=5, num_workers=2)
    assert torch.equal(a[0], e[0])


def test_shuffle_is_a_seeded_permutation():
    s = tiny_splits()
    view = clean_test_view(DatasetSplits("t", s.train, s.train, s.mean, s.std, True))
    x, y = all_batches(view, batch_size=7, shuffle=True, seed=2)
    order = np.random.default_rng([2, 0]).permutation(len(view))
    assert torch.equal(x, s.train.images[order].float() / 255)
    assert not np.array_equal(order, np.arange(len(view)))


def test_subset_and_views():
    s = tiny_splits()
    trig = make_trigger("moving")
    m = make_manifest(s.train.labels, 10, 2, trig, seed=0)
    tv = train_view(s, m)  # trigger rebuilt from the manifest
    assert tv.trigger.name == "moving" and len(tv) == 40
    sub = tv.subset(m.poisoned_indices[:4])
    assert len(sub) == 4 and sub.triggered.all() and (sub.labels == 2).all()
    assert np.array_equal(sub.corners, m.corners[m.poisoned_indices[:4]])
    tt = triggered_test_view(s, trig, seed=9)
    assert tt.triggered.all() and np.array_equal(tt.labels, s.test.labels)
    assert np.array_equal(tt.corners, trig.draw_corners(np.random.default_rng(9), 10))
    ct = clean_test_view(s)
    assert not ct.triggered.any() and ct.trigger is None
    with pytest.raises(PotionError, match="40 images"):
        train_view(s, make_manifest(np.zeros(5, dtype=np.int64), 1, 0, trig, seed=0))


def test_view_rejects_inconsistent_arrays():
    s = tiny_splits()
    with pytest.raises(ValueError):
        LabeledView(s.test, np.arange(3), np.zeros(2), np.zeros(3, bool), np.zeros(3), None, s.mean, s.std)
    with pytest.raises(ValueError, match="no trigger"):
        LabeledView(s.test, np.arange(3), np.zeros(3), np.ones(3, bool), np.zeros(3), None, s.mean, s.std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu():
    s = tiny_splits(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    m = make_manifest(s.train.labels, 10, 0, make_trigger("moving"), seed=0)
    view = train_view(s, m)
    kw = dict(batch_size=8, shuffle=True, augment=True, seed=3)
    cpu = all_batches(view, **kw)
    gpu = all_batches(view, device="cuda", **kw)
    assert gpu[0].is_cuda and torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-6) and torch.equal(cpu[1], gpu[1].cpu())
