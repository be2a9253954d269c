import json
import math

import numpy as np
import pytest
import torch

from potion.datasets import TRIGGERS, make_trigger
from potion.errors import PotionError


def test_registered_triggers():
    assert TRIGGERS.names() == ["badnet", "moving", "sine"]


def test_badnet_sets_bottom_right_patch_in_every_channel():
    x = torch.rand(2, 3, 8, 8) * 0.5
    out = make_trigger("badnet").apply(x, None)
    expected = x.clone()
    expected[:, :, 5:, 5:] = 1.0
    assert torch.equal(out, expected)
    assert x.max() <= 0.5  # input untouched


def test_badnet_size_and_corners():
    t = make_trigger("badnet", size=2)
    out = t.apply(torch.zeros(1, 1, 5, 5), torch.tensor([0]))  # corner argument is ignored
    assert out.sum() == 4 and out[0, 0, 3:, 3:].eq(1).all()
    corners = t.draw_corners(np.random.default_rng(0), 4)
    assert corners.dtype == np.int8 and corners.tolist() == [3, 3, 3, 3]
    assert json.loads(json.dumps(t.params)) == {"size": 2}


@pytest.mark.parametrize(
    "corner,rows,cols", [(0, slice(0, 3), slice(0, 3)), (1, slice(0, 3), slice(4, 7)),
                         (2, slice(3, 6), slice(0, 3)), (3, slice(3, 6), slice(4, 7))]
)
def test_moving_patch_at_each_corner(corner, rows, cols):
    x = torch.zeros(1, 2, 6, 7)
    out = make_trigger("moving").apply(x, np.array([corner], dtype=np.int8))
    expected = torch.zeros(1, 2, 6, 7)
    expected[:, :, rows, cols] = 1.0
    assert torch.equal(out, expected)


def test_moving_mixed_corners_in_one_batch():
    out = make_trigger("moving", size=1).apply(torch.zeros(4, 1, 3, 3), torch.tensor([3, 2, 1, 0]))
    assert [tuple(torch.nonzero(o[0]).flatten().tolist()) for o in out] == [(2, 2), (2, 0), (0, 2), (0, 0)]


def test_moving_corners_are_seeded():
    t = make_trigger("moving")
    a = t.draw_corners(np.random.default_rng(7), 200)
    b = t.draw_corners(np.random.default_rng(7), 200)
    c = t.draw_corners(np.random.default_rng(8), 200)
    assert a.dtype == np.int8 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a.tolist()) == {0, 1, 2, 3}


def test_sine_hand_computed():
    # W = 4, f = 1, delta = 0.1: delta*sin(2*pi*j/4) = 0, 0.1, 0, -0.1 for j = 0..3
    t = make_trigger("sine", freq=1, delta=0.1)
    x = torch.full((1, 2, 3, 4), 0.5)
    out = t.apply(x)
    row = torch.tensor([0.5, 0.6, 0.5, 0.4])
    assert torch.allclose(out, row.expand(1, 2, 3, 4), atol=1e-6)
    assert torch.equal(x, torch.full((1, 2, 3, 4), 0.5))


def test_sine_clips_and_defaults():
    t = make_trigger("sine")
    assert t.params == {"freq": 6, "delta": 0.08}
    w = 32
    x = torch.cat([torch.zeros(1, 1, 1, w), torch.ones(1, 1, 1, w)])
    out = t.apply(x)
    p = torch.tensor([0.08 * math.sin(2 * math.pi * j * 6 / w) for j in range(w)])
    assert torch.allclose(out[0, 0, 0], p.clamp(0, 1), atol=1e-6)
    assert torch.allclose(out[1, 0, 0], (1 + p).clamp(0, 1), atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    assert t.draw_corners(np.random.default_rng(0), 3).tolist() == [-1, -1, -1]


def test_trigger_errors():
    with pytest.raises(PotionError, match="no parameter 'sizee'"):
        make_trigger("badnet", sizee=3)
    with pytest.raises(PotionError, match="unknown trigger 'blend'"):
        make_trigger("blend")
    with pytest.raises(PotionError, match="size must be a positive integer"):
        make_trigger("moving", size=0)
    with pytest.raises(PotionError, match="delta"):
        make_trigger("sine", delta=-1)
    with pytest.raises(PotionError, match="does not fit"):
        make_trigger("badnet", size=9).apply(torch.zeros(1, 1, 8, 8))
