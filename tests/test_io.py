import pytest

from potion.errors import PotionError
from potion.io import atomic_write_text, refuse_inside, staged_output_dir


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("interrupted")

    from potion.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_staged_dir_refuses_then_keeps_prior_results_on_failure(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(out) as stage:
        (stage / "a").write_text("first")
    with pytest.raises(PotionError, match="--overwrite"):
        with staged_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output_dir(out, overwrite=True) as stage:
            (stage / "a").write_text("second")
            raise RuntimeError("crash")
    assert (out / "a").read_text() == "first"
    with staged_output_dir(out, overwrite=True) as stage:
        (stage / "a").write_text("second")
    assert (out / "a").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuse_inside(tmp_path):
    with pytest.raises(PotionError, match="inside"):
        refuse_inside(tmp_path / "run" / "healed", tmp_path / "run", "the run folder")
    refuse_inside(tmp_path / "other", tmp_path / "run", "the run folder")
