import pickle

import pytest
import torch
from torch import nn

from potion.errors import PotionError
from potion.models import MODELS, create_model, load_checkpoint, model_from_state, save_checkpoint
from potion.models.resnet9 import ResNet9


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("c,size", [(1, 28), (3, 32), (1, 8), (3, 64)])
def test_resnet9_forward_shapes(c, size):
    m = create_model("resnet9", num_classes=7, in_channels=c, image_size=size, width=0.25).eval()
    assert m(torch.randn(2, c, size, size)).shape == (2, 7)


def test_resnet9_width_scales_every_channel():
    m = create_model("resnet9", num_classes=10, in_channels=3, image_size=32, width=0.25)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 16), (16, 32), (32, 32), (32, 32), (32, 64), (64, 64), (64, 64), (64, 32)
    ]
    assert m.linear.in_features == 32 and m.linear.bias is None
    assert convs[1].kernel_size == (5, 5) and convs[1].stride == (2, 2) and convs[-1].padding == (0, 0)
    assert all(c.bias is not None for c in convs)


def test_resnet9_full_width_parameter_count():
    # Brute-force count of SPEC §10's layer list at width 1 for 10 classes.
    def cb(i, o, k=3):
        return i * o * k * k + o + 2 * o  # conv weight + bias, BN weight + bias
    expected = cb(3, 64) + cb(64, 128, 5) + 2 * cb(128, 128) + cb(128, 256) + 2 * cb(256, 256) + cb(256, 128) + 128 * 10
    assert _params(ResNet9(10)) == expected


def test_wrn_forward_and_structure():
    m = create_model("wrn", num_classes=5, in_channels=3, image_size=32, depth=10, widen=1).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 5)  # adaptive pooling: other sizes work
    assert len(m.layer1) == 1 and m.fc.in_features == 64
    shortcut = m.layer2[0].shortcut
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].kernel_size == (1, 1) and isinstance(shortcut[1], nn.BatchNorm2d)
    assert m.layer1[0].shortcut is None  # widen=1: stage 1 keeps 16 channels and stride 1, identity shortcut
    wide = create_model("wrn", num_classes=5, in_channels=3, image_size=32, depth=28, widen=10)
    assert wide.layer1[0].shortcut is not None and wide.layer1[1].shortcut is None
    assert len(wide.layer1) == 4 and [wide.layer1[0].conv1.out_channels, wide.layer2[0].conv1.out_channels, wide.fc.in_features] == [160, 320, 640]


def test_small_cnn_forward():
    m = create_model("small_cnn", num_classes=4, in_channels=1, image_size=8, width=4).eval()
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_vit_tiny_from_timm_without_download():
    m = create_model("vit", num_classes=6, in_channels=1, image_size=32, timm_name="vit_tiny_patch16_224", patch_size=8, depth=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 6)
    with pytest.raises(PotionError, match="pretrained"):
        create_model("vit", num_classes=6, in_channels=3, image_size=32, pretrained=True)
    with pytest.raises(PotionError, match="'bogus'"):
        create_model("vit", num_classes=6, in_channels=3, image_size=32, timm_name="vit_tiny_patch16_224", depth=1, bogus=3)
    with pytest.raises(PotionError, match="no model 'vit_nope'"):
        create_model("vit", num_classes=6, in_channels=3, image_size=32, timm_name="vit_nope")


def test_registry_errors():
    assert {"resnet9", "wrn", "vit", "small_cnn"} <= set(MODELS.names())
    with pytest.raises(PotionError, match="unknown model 'resnet10'.*resnet9"):
        create_model("resnet10", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(PotionError, match="no parameter 'widht'.*width"):
        create_model("resnet9", num_classes=10, in_channels=3, image_size=32, widht=0.5)
    with pytest.raises(PotionError, match="width"):
        create_model("resnet9", num_classes=10, in_channels=3, image_size=32, width=0)
    with pytest.raises(PotionError, match="depth"):
        create_model("wrn", num_classes=10, in_channels=3, image_size=32, depth=12)
    with pytest.raises(PotionError, match="num_classes"):
        create_model("resnet9", num_classes=0, in_channels=3, image_size=32)


KW = {"num_classes": 10, "in_channels": 1, "image_size": 16, "width": 0.125}


def _trained_ish():
    torch.manual_seed(1)
    m = create_model("resnet9", **KW)
    m.train()
    m(torch.randn(8, 1, 16, 16))  # moves BN running stats away from their initial values
    return m.eval()


def test_checkpoint_round_trip_bit_identical(tmp_path):
    m = _trained_ish()
    path = save_checkpoint(tmp_path / "sub" / "m.pt", m, "resnet9", KW, extra={"acc": 0.5, "note": "x"})
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and ckpt.name == "resnet9" and ckpt.kwargs == KW and ckpt.extra == {"acc": 0.5, "note": "x"}
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary files left behind


def test_checkpoint_refuses_overwrite(tmp_path):
    m = _trained_ish()
    path = save_checkpoint(tmp_path / "m.pt", m, "resnet9", KW)
    before = path.read_bytes()
    with pytest.raises(PotionError, match="already exists"):
        save_checkpoint(path, create_model("resnet9", **KW), "resnet9", KW)
    assert path.read_bytes() == before
    save_checkpoint(path, create_model("resnet9", **KW), "resnet9", KW, overwrite=True)
    assert path.read_bytes() != before


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_rejects_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "potion-checkpoint/1", "model": "resnet9", "kwargs": KW, "extra": Evil(), "state_dict": {}}, path)
    with pytest.raises(PotionError, match="never runs code"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PotionError):
        load_checkpoint(plain)
    assert "must never run" not in capsys.readouterr().out


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(PotionError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bare = tmp_path / "bare.pt"
    torch.save(_trained_ish().state_dict(), bare)
    with pytest.raises(PotionError, match="bare state_dict"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(PotionError, match="not a readable checkpoint"):
        load_checkpoint(junk)


def test_class_count_mismatch(tmp_path):
    m = _trained_ish()
    with pytest.raises(PotionError, match="saved for 10 classes but the model asks for 5"):
        model_from_state("resnet9", {**KW, "num_classes": 5}, m.state_dict())
    with pytest.raises(PotionError, match="shape mismatch"):
        model_from_state("resnet9", {**KW, "width": 0.25}, m.state_dict())
    path = save_checkpoint(tmp_path / "m.pt", m, "resnet9", KW)
    with pytest.raises(PotionError, match="saved for 10 classes but the dataset has 3"):
        load_checkpoint(path, num_classes=3)


def test_save_rejects_non_json_extra(tmp_path):
    with pytest.raises(PotionError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", _trained_ish(), "resnet9", KW, extra={"t": torch.zeros(1)})
    assert not (tmp_path / "m.pt").exists()


def test_init_weights_skip_a_head_of_another_class_count(tmp_path):
    import torch

    from potion.models import create_model, load_init_weights

    src = create_model("resnet9", num_classes=5, in_channels=1, image_size=16, width=0.25)
    torch.save(src.state_dict(), tmp_path / "w.bin")
    dst = create_model("resnet9", num_classes=10, in_channels=1, image_size=16, width=0.25)
    skipped = load_init_weights(dst, tmp_path / "w.bin")
    assert len(skipped) == 1 and skipped[0].endswith("weight")  # only the classifier differs
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        if n not in skipped:
            assert torch.equal(a, b)
