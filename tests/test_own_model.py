"""Healing a model Potion did not train: the owner's class (a file in their folder), their
weights and their Parquet data with a trigger baked in that Potion knows nothing about."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import owner_case
from potion.cli import main
from potion.errors import PotionError
from potion.models import load_weights, parse_model_spec, read_weights

# step 2 (not 1.1) keeps k* small: the Ray test runs one Tune trial per step.
QUIET = ["--quiet", "--tracking-uri", "none", "--cache-dir", "none", "--method", "xlf_ptn", "--step", "2",
         "--batch-size", "512"]  # the paper-exact method at the B that direct_k_star uses


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return owner_case.build(tmp_path_factory.mktemp("owner") / "user")


@pytest.fixture()
def in_case(case, monkeypatch):
    monkeypatch.chdir(case["folder"])  # relative paths, as the owner would type them
    return case


def test_heal_own_model_local_lowers_asr_and_matches_the_core(in_case, capsys):
    db = Path("mlflow-own.db").resolve()
    rc = main(["heal", *owner_case.heal_args(Path(".")), "--backend", "local", "--out", "healed", *QUIET,
               "--tracking-uri", f"sqlite:///{db}"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(Path("healed/report.json").read_text())
    from mlflow import MlflowClient

    params = MlflowClient(f"sqlite:///{db}").get_run(rep["mlflow"]["parent_run_id"]).data.params
    assert params["provenance.model.sha256"] == rep["provenance"]["model"]["sha256"]
    assert params["provenance.weights.sha256"] == rep["provenance"]["weights"]["sha256"]
    assert params["provenance.transform.std"] == str([owner_case.STD])
    assert rep["k_star"] == owner_case.direct_k_star(in_case)
    # The X trigger works on θ0 and mostly stops working after healing.
    assert rep["before"]["asr"] > 0.9 and rep["after"]["asr"] < 0.5 * rep["before"]["asr"]
    assert rep["after"]["clean_acc"] > rep["before"]["clean_acc"] - 0.05
    # No ground truth for the owner's data: nothing is made up.
    assert rep["deletion_set"]["n_poison_total"] is None and rep["deletion_set"]["size"] == len(in_case["found"])
    prov = rep["provenance"]
    assert prov["model"]["spec"] == "mynet_owner.py:MyNet" and len(prov["model"]["sha256"]) == 64
    assert prov["weights"]["sha256"] and prov["data"]["train_sha256"]
    assert prov["transform"]["mean"] == [owner_case.MEAN] and prov["triggered_test"]["target"] == owner_case.TARGET
    # The healed weights load back into the owner's own class, and `--weights OUT/model.pt`
    # (a Potion checkpoint) measures the healed model.
    healed = torch.load("healed/model.pt", weights_only=True)["state_dict"]
    owner_case.load_model_class(in_case["folder"])(num_classes=10).load_state_dict(healed)
    args = [a for a in owner_case.heal_args(Path(".")) if a not in ("--identified", "identified.csv")]
    args[args.index("weights.pt")] = "healed/model.pt"
    capsys.readouterr()
    assert main(["evaluate", *args]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["asr"] == rep["after"]["asr"] and again["provenance"]["weights"]["layout"] == "potion-checkpoint"
    # The report's numbers, recomputed here from θ0, the written model and the test split
    # (decoded with PIL, normalised by hand; not potion.metrics): the heal lowered the ASR.
    net = owner_case.load_model_class(in_case["folder"])(num_classes=10).eval()
    x_t, y_t = owner_case._decode(Path("triggered_test.parquet"))
    x_c, y_c = owner_case._decode(Path("data/test.parquet"))
    other = y_t != owner_case.TARGET
    for side, state in (("before", in_case["state"]), ("after", healed)):
        net.load_state_dict(state)
        with torch.no_grad():
            p_t, p_c = net(x_t).argmax(1).numpy(), net(x_c).argmax(1).numpy()
        assert rep[side]["asr"] == pytest.approx((p_t[other] == owner_case.TARGET).mean(), abs=1.5 / other.sum())
        assert rep[side]["ra"] == pytest.approx((p_t == y_t).mean(), abs=1.5 / len(y_t))
        assert rep[side]["clean_acc"] == pytest.approx((p_c == y_c).mean(), abs=1.5 / len(y_c))
    # MLflow's parent run holds the report's numbers under plain names (read from the report
    # itself here, not through the mapping the heal used to log them).
    logged = MlflowClient(f"sqlite:///{db}").get_run(rep["mlflow"]["parent_run_id"]).data.metrics
    for side in ("before", "after"):
        for key in ("clean_acc", "ra", "asr"):
            assert logged[f"{side}_{key}"] == rep[side][key], f"{side}_{key}"
    assert logged["before_poison_healed"] == rep["before_poison_healed"]
    assert logged["after_poison_healed"] == rep["after"]["poison_healed"]
    assert (logged["before_model_damage"], logged["after_model_damage"]) == (0.0, rep["after"]["model_damage"])
    assert logged["k_star"] == rep["k_star"] and logged["alpha"] == rep["alpha"]


@pytest.mark.slow
@pytest.mark.ray
def test_heal_own_model_on_ray_gives_the_same_k(in_case, capsys):
    rc = main(["heal", *owner_case.heal_args(Path(".")), "--backend", "ray", "--num-cpus", "2", "--window", "2", "--out", "healed_ray",
               "--set", "importance_shards=2", *QUIET])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(Path("healed_ray/report.json").read_text())
    assert rep["backend"] == "ray" and rep["k_star"] == owner_case.direct_k_star(in_case)


@pytest.mark.parametrize("weights", ["weights_ddp.pt", "weights.safetensors"])
def test_prefixed_and_safetensors_weights_evaluate_like_the_bare_state_dict(in_case, weights, capsys):
    args = [a for a in owner_case.heal_args(Path(".")) if a not in ("--identified", "identified.csv")]
    assert main(["evaluate", *args]) == 0
    bare = json.loads(capsys.readouterr().out)
    args[args.index("weights.pt")] = weights
    assert main(["evaluate", *args]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["clean_acc"] == bare["clean_acc"] and other["asr"] == bare["asr"] > 0.9
    if weights.endswith("ddp.pt"):
        assert "module." in " ".join(other["provenance"]["weights"]["notes"])


def test_evaluate_without_triggered_test_says_ra_asr_not_measured(in_case, capsys):
    assert main(["evaluate", "--model", "mynet_owner.py:MyNet", "--weights", "weights.pt", "--dataset", "parquet",
                 "--data-root", "data", "--mean", "0.3", "--std", "0.4"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["ra"] is None and m["asr"] is None and "not measured" in m["note"] and m["clean_acc"] > 0.9


@pytest.mark.parametrize("spec,kwargs", [("timm:resnet10t", {"num_classes": 3}),
                                         ("torchvision:squeezenet1_1", {"num_classes": 3})])
def test_timm_and_torchvision_specs_load_a_matching_state_dict(spec, kwargs, tmp_path):
    s = parse_model_spec(spec, kwargs)
    torch.manual_seed(1)
    saved = s.build().state_dict()
    torch.save(saved, tmp_path / "w.pt")
    model = load_weights(s.build(), read_weights(tmp_path / "w.pt"), spec)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def _bad_cases(folder: Path) -> list[tuple[list[str], str]]:
    (folder / "broken_owner.py").write_text("raise RuntimeError('boom at import')\n")
    torch.save({"head.weight": torch.zeros(3, 3)}, folder / "other.pt")
    torch.save(owner_case.load_model_class(folder)(num_classes=5).state_dict(), folder / "five.pt")
    marker = folder / "code_ran"
    torch.save({"w": _Payload(str(marker))}, folder / "code.pt")
    base = owner_case.heal_args(Path("."))

    def swap(flag, value):
        out = list(base)
        out[out.index(flag) + 1] = value
        return out

    def drop(flag):
        out = list(base)
        i = out.index(flag)
        return out[:i] + out[i + 2:]

    return [
        (swap("--model", "nowhere.py:MyNet"), "does not exist"),
        (swap("--model", "mynet_owner.py:Nope"), "has no 'Nope'"),
        (swap("--model", "broken_owner.py:Net"), "boom at import"),
        (swap("--model", "mynet_owner.py:make_thing")[:2] + base[4:], "not a torch nn.Module"),
        (swap("--weights", "other.pt"), "missing"),
        (swap("--weights", "code.pt"), "refused"),
        (swap("--weights", "five.pt")[:2] + ["--model-args", '{"num_classes": 5}'] + swap("--weights", "five.pt")[4:],
         "5 outputs but the data has 10 classes"),
        (swap("--mean", "0.1,0.2,0.3"), "3 value(s) but the images have 1 channel"),
        (drop("--target"), "--triggered-test needs --target"),
        (drop("--triggered-test"), "--target needs --triggered-test"),
    ]


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_bad_pieces_are_one_line_errors_and_write_nothing(in_case, capsys):
    folder = in_case["folder"]
    for args, expected in _bad_cases(folder):
        rc = main(["heal", *args, "--out", "never", *QUIET])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expected in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not Path("never").exists(), args
    assert not (folder / "code_ran").exists()  # the pickled call was refused, never run


def test_model_file_must_not_change_under_the_spec(tmp_path):
    f = tmp_path / "changing_owner.py"
    f.write_text(owner_case.MODEL_SOURCE)
    spec = parse_model_spec(f"{f}:MyNet", {"num_classes": 10})
    f.write_text(owner_case.MODEL_SOURCE + "\n# edited\n")
    import sys

    sys.modules.pop("changing_owner", None)  # a fresh worker process
    with pytest.raises(PotionError, match="differs"):
        spec.build()


def test_importance_cache_key_records_the_transform(in_case, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [*owner_case.heal_args(Path(".")), "--backend", "local", *QUIET, "--cache-dir", str(cache)]
    entries = lambda: sorted(p.name for p in cache.glob("*.safetensors"))  # noqa: E731
    assert main(["heal", *args, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    first = entries()
    assert len(first) == 2  # forget and retain
    assert main(["heal", *args, "--out", str(tmp_path / "b")]) == 0
    assert entries() == first  # same model, data and transform: both hit
    other = list(args)
    other[other.index("--mean") + 1] = "0.31"
    assert main(["heal", *other, "--out", str(tmp_path / "c")]) == 0
    assert len(entries()) == 4  # another transform is other data to the model


def test_image_size_resizes_the_stored_images(in_case, capsys):
    from potion.datasets.stored import stored_view
    from potion.heal.inputs import OwnerSource

    source = OwnerSource(model="mynet_owner.py:MyNet", weights="weights.pt", dataset="parquet",
                         data_args={"root": "data"}, mean=[0.3], std=[0.4], image_size=32)
    with pytest.raises(PotionError, match=r"\(1, 32, 32\).*--image-size"):
        source.load()  # MyNet's head is sized for 16 px: a clear error, not a shape traceback
    import numpy as np
    from potion.datasets.base import ArraySource

    src = ArraySource(torch.full((2, 1, 16, 16), 200, dtype=torch.uint8), np.array([0, 1]), ["a", "b"])
    x, _ = next(stored_view(src, [0.0], [1.0], image_size=8).batches(2))
    assert x.shape == (2, 1, 8, 8) and torch.allclose(x, torch.full_like(x, 200 / 255))


def test_a_worker_without_the_file_imports_the_shipped_module(tmp_path, monkeypatch):
    """What Ray's py_modules gives a worker on another machine: the module by its stem."""
    import shutil
    import sys

    here, shipped = tmp_path / "driver", tmp_path / "shipped"
    here.mkdir()
    shipped.mkdir()
    (here / "shipped_owner.py").write_text(owner_case.MODEL_SOURCE)
    spec = parse_model_spec(f"{here / 'shipped_owner.py'}:MyNet", {"num_classes": 4})
    shutil.move(here / "shipped_owner.py", shipped / "shipped_owner.py")
    monkeypatch.syspath_prepend(str(shipped))
    sys.modules.pop("shipped_owner", None)
    assert spec.build()(torch.zeros(1, 1, 16, 16)).shape == (1, 4)
    sys.modules.pop("shipped_owner", None)
    (shipped / "shipped_owner.py").write_text(owner_case.MODEL_SOURCE.replace("width=16", "width=8"))
    with pytest.raises(PotionError, match="not the model file"):
        spec.build()
    sys.modules.pop("shipped_owner", None)
