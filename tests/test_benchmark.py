"""The benchmark harness: grid expansion, failure isolation, resume, MLflow, report."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from potion.config import from_dict, to_dict
from potion.errors import PotionError
from potion.bench.run import benchmark
from potion.bench.grid import SuiteConfig, expand, load_suite, parse_n, parse_share
from potion.bench.results import SCHEMA, read_meta, write_results
from potion.bench.report import mean_std, report, summarize
from potion.runs.configs import TrainJob

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "description": "test grid",
    "notes": "digits only",
    "data": {"dataset": "digits", "args": {"upscale": 2}},
    "model": {"name": "resnet9", "args": {"width": 0.25}},
    "recipe": {"iterations": 60, "batch_size": 128, "lr": 0.05},
    "device": "cpu",
    "poisons": [{"trigger": "badnet"}],
    "n": [0.05],
    "shares": ["one", 0.5],
    # ssd with a negative alpha passes config loading but fails inside the cell (dampening
    # refuses alpha < 0): the failure must stay in its cell.
    "methods": ["none", "ssd", "xlf_ptn", {"method": "ssd", "name": "ssd_broken", "heal": {"ssd_alpha": -1.0}}],
    "seeds": [0],
    "heal": {"importance_batch_size": 128},
}


def _load_check_cell():
    spec = importlib.util.spec_from_file_location("check_cell", REPO / "benchmarks" / "check_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite(**changes) -> SuiteConfig:
    return from_dict(SuiteConfig, {**TINY, **changes})


# ---------------------------------------------------------------- the grid, without compute
def test_parse_grid_entries():
    assert parse_n(0.01) == 0.01 and parse_n(100) == 100
    for bad in (0.0, 1.5, 0, True, "1%"):
        with pytest.raises(PotionError):
            parse_n(bad)
    assert parse_share("one") == ("one", None, 1)
    assert parse_share(1) == ("one", None, 1)  # count 1 is one-shot too
    assert parse_share(1.0) == ("1", 1.0, None)  # but 1.0 is 100 % of the poison
    assert parse_share(5) == ("c5", None, 5)
    for bad in (0.0, 1.2, -3, "half"):
        with pytest.raises(PotionError):
            parse_share(bad)


def test_expand_counts_restrictions_and_groups(tmp_path):
    suite = _suite(n=[0.05, 20], shares=["one", 0.1, 0.5],
                   methods=["none", "ssd", "ssd_ptn", "xlf_ptn", {"method": "eu", "n": [20], "shares": [0.5]}],
                   seeds=[0, 1])
    plan = expand(suite, tmp_path)
    assert len(plan.models) == 2 * 2  # n × seeds
    assert len(plan.cells) == 2 * 2 * 3 * 4 + 2  # n × seeds × shares × methods, + eu at one (n, share) per seed
    eu = [c for c in plan.cells if c.method == "eu"]
    assert {(c.n, c.share_label) for c in eu} == {(20, "0.5")}
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)
    # ssd and ssd_ptn read the same fisher pass: same group; xlf_ptn its own; none none.
    by = {(c.method, c.n, c.share_label, c.seed): c for c in plan.cells}
    assert by[("ssd", 20, "0.1", 1)].group == by[("ssd_ptn", 20, "0.1", 1)].group is not None
    assert by[("ssd", 20, "0.1", 1)].group != by[("ssd", 20, "0.5", 1)].group
    assert by[("xlf_ptn", 20, "0.1", 1)].group != by[("ssd", 20, "0.1", 1)].group
    assert by[("none", 20, "0.1", 1)].group is None
    # The same poison/n/seed share one model; a recipe change makes a new model key.
    other = expand(_suite(recipe={**TINY["recipe"], "lr": 0.04}), tmp_path)
    assert not set(other.models) & set(expand(_suite(), tmp_path).models)


@pytest.mark.parametrize("change, words", [
    ({"recipe": {"iterations": 10, "bogus": 1}}, "recipe.bogus"),
    ({"methods": ["none", "nope"]}, "nope"),
    ({"methods": [{"method": "eu", "n": [0.02]}]}, "n=0.02"),
    ({"heal": {"backend": "ray"}}, "backend"),
    ({"shares": ["one", "one"]}, "twice"),
    ({"poisons": [{"trigger": "badnet", "params": {"colour": 1}}]}, "colour"),
    ({"model": {"name": "resnet9", "args": {"depth": 3}}}, "depth"),
])
def test_bad_suites_are_refused(tmp_path, change, words):
    with pytest.raises(PotionError, match=words):
        expand(_suite(**change), tmp_path)


def test_cache_keys_change_with_what_a_cell_computes_only(tmp_path):
    """A model's key ignores where it is logged; a method's own settings key its cells only."""
    def keys(**changes):
        plan = expand(_suite(methods=["xlf_ptn", "potion_plus"], **changes), tmp_path)
        return {c.method: c.key for c in plan.cells if c.share_label == "one"}, list(plan.models)

    base, models = keys()
    plus = keys(heal={"importance_batch_size": 128, "plus": {"rounds": 3}})[0]
    assert plus["xlf_ptn"] == base["xlf_ptn"] and plus["potion_plus"] != base["potion_plus"]
    guard = keys(heal={"importance_batch_size": 128, "guard": {"max_damage": 0.5}})[0]
    assert guard["xlf_ptn"] != base["xlf_ptn"] and guard["potion_plus"] != base["potion_plus"]
    assert keys(recipe={**TINY["recipe"], "iterations": 61})[1] != models


def test_shipped_suites_expand_and_goel_dry_run_lists_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POTION_DATA", str(tmp_path / "nowhere"))
    sizes = {}
    for name in ("digits-smoke", "mnist-cpu", "cifar10-cpu", "goel-cifar10", "goel-cifar100"):
        suite, _ = load_suite(name)
        sizes[name] = len(expand(suite, tmp_path / name).cells)
    assert sizes["digits-smoke"] == 2 * 9  # 7 methods + xlf_ptn_guard at the suite's B and at the automatic B
    assert sizes["mnist-cpu"] == 3 * 5 * 7 + 5  # eu at n = 1 % only
    assert sizes["cifar10-cpu"] == 2 * 4 * 7 + 2  # eu at one share per poison
    assert sizes["goel-cifar10"] == sizes["goel-cifar100"] == 3 * 11 * 8
    # The WRN's args stay its own (no default resnet9 width merged in), also after the trip
    # through the dict that a Ray task receives.
    plan = expand(load_suite("goel-cifar100")[0], tmp_path / "g100")
    job = next(iter(plan.models.values())).job
    assert job.model.args == {"depth": 28, "widen": 10}
    assert from_dict(TrainJob, to_dict(job)).model.args == {"depth": 28, "widen": 10}

    suite, path = load_suite("goel-cifar10")
    assert benchmark(suite, tmp_path / "goel", suite_file=path, dry_run=True) == []
    out = capsys.readouterr().out
    assert "264 cells" in out and "badnet-n100-one-xlf_ptn-seed0" in out and "badnet-n1000-1-eu-seed0" in out
    assert "WARNING: data not found" in out and str(tmp_path / "nowhere" / "cifar10") in out
    assert not (tmp_path / "goel").exists()  # a dry run writes nothing
    with pytest.raises(PotionError, match=r"data not found.*nowhere/cifar10"):
        benchmark(suite, tmp_path / "goel", dry_run=False, tracking_uri="none")


# ---------------------------------------------------------------- report statistics
def _row(method, share, healed, damage, status="ok", one_shot=False, **kw):
    return {"suite": "s", "cell_id": f"{method}-{share}-{healed}", "poison": "badnet", "trigger": "badnet",
            "n": 0.01, "n_poison": 50, "share": share, "share_label": "one" if one_shot else f"{share:g}",
            "one_shot": one_shot, "n_forget": 1, "method": method, "base_method": method, "seed": 0,
            "status": status, "error": None if status == "ok" else "Boom: it broke",
            "clean_acc_before": 0.9, "ra_before": 0.1, "asr_before": 0.95, "clean_acc_after": 0.88,
            "ra_after": 0.8, "asr_after": 0.05, "poison_healed_before": 11.1, "poison_healed": healed,
            "model_damage": damage, "total_s": 1.0, "importance_s": 0.5, "search_s": 0.4, "wall_s": 2.0,
            "reused": False, **kw}


def test_mean_std_is_the_sample_standard_deviation():
    m, s, n = mean_std([90.0, 94.0, math.nan])
    assert (m, n) == (92.0, 2) and s == pytest.approx(math.sqrt(8.0))
    assert mean_std([5.0])[:2] == (5.0, 0.0)


def test_report_separates_one_shot_and_lists_failures(tmp_path):
    rows = [_row("xlf_ptn", 0.1, 90.0, -1.0), _row("xlf_ptn", 0.5, 94.0, -3.0),
            _row("xlf_ptn", 0.02, 60.0, -2.0, one_shot=True),
            _row("none", 0.1, 11.0, 0.0), _row("none", 0.5, 11.0, 0.0), _row("none", 0.02, 11.0, 0.0, one_shot=True),
            _row("ssd", 0.5, None, None, status="failed")]
    multi = {s["method"]: s for s in summarize(rows, one_shot=False)}
    assert list(multi) == ["xlf_ptn", "none"]  # paper order; the failed ssd cell is left out
    assert multi["xlf_ptn"]["healed_mean"] == 92.0 and multi["xlf_ptn"]["damage_mean"] == -2.0
    assert multi["xlf_ptn"]["cells"] == 2
    one = {s["method"]: s for s in summarize(rows, one_shot=True)}
    assert one["xlf_ptn"]["healed_mean"] == 60.0 and one["xlf_ptn"]["cells"] == 1

    path = write_results(tmp_path / "results.parquet", rows, {"suite": "s", "command": "potion benchmark --suite s",
                                                                "date": "2026-01-01", "host_cores": 2, "gpu": None})
    summary = report(path, tmp_path / "rep").read_text()
    assert "| xlf_ptn | 92.00 ± 2.83 | -2.00 ± 1.41 | 2 |" in summary
    assert "| xlf_ptn | 60.00 ± 0.00 | -2.00 ± 0.00 | 1 |" in summary
    assert "potion benchmark --suite s" in summary and "2 cores, no GPU" in summary
    assert "## Failed cells (1)" in summary and "Boom: it broke" in summary
    assert (tmp_path / "rep" / "plots" / "badnet-n0.01.png").stat().st_size > 1000


# ---------------------------------------------------------------- the real thing, on Ray
@pytest.mark.slow
@pytest.mark.ray  # the benchmark runs its cells as Ray tasks
def test_grid_runs_isolates_failures_resumes_and_reports(tmp_path):
    import mlflow

    out = tmp_path / "bench"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = benchmark(_suite(), out, num_cpus=2, tracking_uri=uri, progress=False, command="pytest")
    assert len(rows) == 2 * 4
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == 8 and table.schema.names == SCHEMA.names
    assert read_meta(table)["command"] == "pytest" and read_meta(table)["cluster_cpus"] == 2
    by = {(r["method"], r["share_label"]): r for r in table.to_pylist()}
    for share in ("one", "0.5"):
        broken = by[("ssd_broken", share)]
        assert broken["status"] == "failed" and "alpha" in broken["error"]
        for m in ("none", "ssd", "xlf_ptn"):
            r = by[(m, share)]
            assert r["status"] == "ok", r["error"]
            assert r["n_forget"] == (1 if share == "one" else round(0.5 * r["n_poison"]))
            assert 0 <= r["clean_acc_after"] <= 1 and r["poison_healed"] == pytest.approx(
                100 * r["ra_after"] / r["clean_acc_after"])
    none = by[("none", "0.5")]
    assert none["clean_acc_after"] == none["clean_acc_before"] and none["model_damage"] == 0
    assert by[("xlf_ptn", "0.5")]["k_star"] is not None and by[("xlf_ptn", "0.5")]["importance_s"] > 0

    # Two cells held against benchmarks/check_cell.py, which redoes them with an
    # implementation of its own (it shares only the model and the data with the code under test).
    check_cell = _load_check_cell()
    for method in ("ssd", "xlf_ptn"):
        ok, lines = check_cell.check(out, by[(method, "0.5")]["cell_id"])
        assert ok, "\n".join(lines)

    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("benchmark-tiny").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(r["cell_id"] for r in rows)
    assert {r.data.tags["status"] for r in runs} == {"ok", "failed"}

    # Rerun after a "kill" that lost one finished cell: the other finished cells are reused,
    # no model is retrained, and only the lost cell and the failed ones run again.
    lost = out / "cells" / "badnet-n0.05-0.5-none-seed0.json"
    lost.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*") if p.is_file()}
    cell_files = {p: p.read_bytes() for p in (out / "cells").glob("*.json")}
    rows2 = benchmark(_suite(), out, num_cpus=2, tracking_uri=uri, progress=False)
    assert [r["cell_id"] for r in rows2] == [r["cell_id"] for r in rows]
    for r in rows2:
        rerun = r["method"] == "ssd_broken" or r["cell_id"] == lost.stem
        assert r["reused"] == (not rerun) and r["status"] == ("failed" if r["method"] == "ssd_broken" else "ok")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for p, data in cell_files.items():
        if "broken" not in p.name:
            assert p.read_bytes() == data
    assert pq.read_table(out / "results.parquet").column("reused").to_pylist() == [r["reused"] for r in rows2]
    # Reused cells are not logged twice; the cells that ran again are.
    runs2 = mlflow.MlflowClient(uri).search_runs([runs[0].info.experiment_id])
    assert len(runs2) == len(runs) + 3

    summary = report(out).read_text()
    assert "## Failed cells (2)" in summary and "| xlf_ptn |" in summary
    assert (out / "plots" / "badnet-n0.05.png").is_file()
    json.loads((out / "cells" / "badnet-n0.05-0.5-xlf_ptn-seed0.json").read_text())


@pytest.mark.slow
@pytest.mark.ray
def test_digits_smoke_suite_has_a_row_for_every_cell(tmp_path, capsys):
    """The shipped CI suite through the command line: every cell lands in the table."""
    from potion.cli import main

    out = tmp_path / "smoke"
    rc = main(["benchmark", "--suite", "digits-smoke", "--out", str(out), "--num-cpus", "2", "--quiet"])
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 2 * 9
    assert {(r["share_label"], r["method"]) for r in table} == {
        (s, m) for s in ("one", "0.5") for m in ("none", "ssd", "ssd_grid", "ssd_ptn", "lf_ptn", "xlf_ptn",
                                                 "xlf_ptn_guard", "xlf_ptn_guard_autob", "eu")}
    assert all(r["status"] == "ok" for r in table), [r["error"] for r in table if r["status"] != "ok"]
    assert rc == 0
    assert main(["report", str(out / "results.parquet")]) == 0
    assert (out / "summary.md").is_file()
    # benchmarks/check_cell.py redoes a cell with its own implementation and must agree.
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "check_cell.py"
    done = subprocess.run([sys.executable, str(script), str(out), "badnet-n0.05-0.5-xlf_ptn-seed0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("agree"), done.stdout + done.stderr
    assert "deletion set OK" in done.stdout
