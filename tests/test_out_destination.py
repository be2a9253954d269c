"""Where ``--out`` lands: refused inside a Ray job's temporary working-dir copy, copied up to a
remote URI (``file://`` through pyarrow, ``memory://`` through fsspec; no network), and the
printed paths are the real ones."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from potion.cli import main
from potion.errors import PotionError
from potion.runs.destination import local_output, ray_job_copy, resolve_out


@pytest.fixture
def job_copy(tmp_path, monkeypatch):
    """A folder laid out like Ray's unpacked working dir of a job, as the current folder."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    return copy


def _memory_fs():
    fsspec = pytest.importorskip("fsspec")
    return fsspec.filesystem("memory")


def test_a_relative_out_inside_a_ray_job_copy_is_refused_with_what_to_pass(job_copy, tmp_path):
    assert ray_job_copy() == job_copy
    for given in ("healed", "sub/healed", "../escaped", str(job_copy / "abs")):
        with pytest.raises(PotionError) as e:
            resolve_out(given)
        msg = str(e.value)
        assert f"--out {given} would be written inside this Ray job's temporary copy" in msg
        assert str(job_copy) in msg and "absolute path" in msg and "s3://" in msg and "\n" not in msg
    outside = tmp_path / "results" / "healed"
    assert resolve_out(str(outside)).path == outside  # an absolute path elsewhere is durable: kept


def test_outside_a_job_copy_a_relative_out_is_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_job_copy() is None
    dest = resolve_out("runs/a")
    assert not dest.remote and dest.path == tmp_path / "runs" / "a"
    assert dest.child("model.pt") == str(tmp_path / "runs" / "a" / "model.pt")


def test_cli_train_and_heal_refuse_a_relative_out_in_a_job_copy_before_any_work(job_copy, small_digits_run, capsys):
    assert main(["train", "--iterations", "5", "--out", "run", "--quiet"]) == 2
    assert main(["heal", "--run", str(small_digits_run), "--discovery-share", "0.3", "--out", "healed",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("potion: error: --out ") for line in err), err
    assert not any(job_copy.iterdir())


def test_unknown_scheme_and_bare_bucket_are_one_line_errors(tmp_path):
    with pytest.raises(PotionError, match="no filesystem serves 'nosuch://'"):
        resolve_out("nosuch://x/y")
    _memory_fs()
    with pytest.raises(PotionError, match="names no folder"):
        with local_output(resolve_out("memory://"), False):
            pass


def test_train_to_a_file_uri_lands_there_and_prints_it(tmp_path, capsys):
    target = tmp_path / "remote" / "run"
    uri = target.as_uri()
    store = os.environ["MLFLOW_TRACKING_URI"]  # the tests' store: a remote --out needs one of its own
    assert main(["train", "--iterations", "5", "--out", uri, "--quiet"]) == 0
    assert os.environ["MLFLOW_TRACKING_URI"] == store  # MLflow's log_model would unset it
    assert f"run folder: {uri}" in capsys.readouterr().out
    assert {"config.yaml", "metrics.json", "model.pt", "poison.parquet"} <= {p.name for p in target.iterdir()}
    assert [p.name for p in target.parent.iterdir()] == ["run"]  # no staging folder or probe left
    first = (target / "model.pt").read_bytes()

    assert main(["train", "--iterations", "5", "--out", uri, "--quiet"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (target / "model.pt").read_bytes() == first

    assert main(["train", "--iterations", "5", "--seed", "1", "--out", uri, "--overwrite", "--quiet"]) == 0
    assert (target / "model.pt").read_bytes() != first
    assert [p.name for p in target.parent.iterdir()] == ["run"]


def test_heal_and_evaluate_to_an_fsspec_uri(small_digits_run, tmp_path, capsys, monkeypatch):
    fs = _memory_fs()
    root = f"memory://potion-test-{uuid.uuid4().hex[:8]}"
    heal = ["heal", "--run", str(small_digits_run), "--discovery-share", "0.3", "--method", "none",
            "--cache-dir", "none", "--quiet", "--out", f"{root}/healed"]

    # the default MLflow store is a sqlite file in --out: it cannot live in a bucket
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("POTION_TRACKING_URI", raising=False)
    assert main(heal) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    assert not fs.exists(f"{root}/healed")

    assert main([*heal, "--tracking-uri", "none"]) == 0
    out = capsys.readouterr().out
    assert f"healed model: {root}/healed/model.pt" in out and f"report: {root}/healed/report.json" in out
    report = json.loads(fs.cat(f"{root}/healed/report.json"))
    assert report["method"] == "none" and fs.exists(f"{root}/healed/model.pt")
    assert sorted(Path(p).name for p in fs.ls(root, detail=False)) == ["healed"]

    metrics_uri = f"{root}/eval/metrics.json"
    assert main(["evaluate", "--run", str(small_digits_run), "--device", "cpu", "--out", metrics_uri]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(fs.cat(metrics_uri)) == printed
    assert main(["evaluate", "--run", str(small_digits_run), "--device", "cpu", "--out", metrics_uri]) == 2
    assert "already exists" in capsys.readouterr().err
