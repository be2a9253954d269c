"""``potion benchmark --suite NAME``: the paper's grid of poisons × n × shares × methods × seeds.

A suite (``benchmarks/suites/NAME.yaml``) expands into *cells*. Phase 1 trains one
poisoned model per (poison, n, seed), cached under ``<out>/models/<hash of its TrainJob>``;
phase 2 heals each cell from its model. Both run as Ray tasks, one machine or a cluster
(``<out>`` must then be on a filesystem every node sees). A cell's outcome is written
atomically to ``<out>/cells/<cell_id>.json`` as soon as it finishes, so a rerun — or a run
after a kill — skips every finished cell; a failed cell is recorded with its error and
retried on the next run. The driver alone writes ``results.parquet`` and MLflow (sqlite
takes one writer).

This module is the fan-out (the driver's Runner and MLflow logging); the grid is
``benchmark_grid``, the Ray tasks ``benchmark_cells``, the rows and the Parquet file
``benchmark_results``, the tables and plots ``benchmark_report``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from potion.config import to_dict
from potion.errors import PotionError
from potion.io import atomic_write_json
from potion.bench.cells import _describe, heal_task, train_task
from potion.bench.grid import (RESULTS_FILE, Cell, ModelPlan, Plan, SuiteConfig, _portable_data, check_data,
                                            expand, load_suite, n_label, portable_path)
from potion.bench.results import METRIC_NAMES, _num, cell_row, environment_info, read_meta, write_results
from potion.runs.configs import ModelConfig, TrainJob


# ---------------------------------------------------------------- MLflow (driver only)
class CellLogger:
    """Every new cell as one MLflow run of experiment ``benchmark-<suite>``."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = None
                if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
                    location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").absolute().as_uri()
                self.exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.exp_id = exp.experiment_id
        except Exception as e:  # noqa: BLE001
            raise PotionError(f"cannot use MLflow tracking URI {uri}: {_describe(e)}; pass --tracking-uri "
                              "(e.g. sqlite:///path/mlflow.db, http://host:5000) or 'none'") from None

    def log(self, cell: Cell, row: dict, report_file: Path | None) -> str:
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.exp_id, run_name=cell.cell_id)
        rid = run.info.run_id
        params = {"cell_id": cell.cell_id, "suite": row["suite"], "poison": cell.poison, "trigger": cell.trigger,
                  "n": n_label(cell.n), "share": cell.share_label, "method": cell.method,
                  "base_method": cell.base_method, "seed": cell.seed, "model_dir": str(cell.model.dir),
                  **_flat("heal", to_dict(cell.heal)), **_flat("train", to_dict(cell.model.job))}
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), ts, 0) for k in METRIC_NAMES if _num(row.get(k)) is not None]
        plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
        tags = [RunTag("status", row["status"])] + ([RunTag("error", row["error"][:5000])] if row.get("error") else [])
        for i in range(0, max(len(plist), len(metrics)), 100):
            self.client.log_batch(rid, metrics=metrics[i:i + 100], params=plist[i:i + 100], tags=tags if i == 0 else [])
        if report_file is not None and report_file.is_file():
            self.client.log_artifact(rid, str(report_file))
        self.client.set_terminated(rid, status="FINISHED" if row["status"] == "ok" else "FAILED")
        return rid


def _flat(prefix: str, d: dict) -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = v
    return out


# ---------------------------------------------------------------- the run
SHOW = ["cell_id", "status", "n_forget", "clean_acc_after", "asr_after", "poison_healed", "model_damage",
        "k_star", "total_s", "reused"]


class Runner:
    """Driver state: finished records, the Ray scheduling loop, and the writes after each cell."""

    def __init__(self, plan: Plan, *, tracking_uri: str | None, progress: bool, command: str | None):
        self.plan, self.progress = plan, progress
        self.cells_dir = plan.out / "cells"
        self.records: dict[str, dict] = {}  # cell_id → record (row, key, mlflow_run_id)
        self.meta = {"suite": plan.suite.name, "description": plan.suite.description, "notes": plan.suite.notes,
                     "suite_file": portable_path(plan.suite_file) if plan.suite_file else None,
                     "data": _portable_data(next(iter(plan.models.values())).job.data) if plan.models else None,
                     "model": to_dict(plan.suite.model or ModelConfig()), "recipe": to_dict(plan.suite.recipe),
                     **environment_info(command)}
        self.logger = CellLogger(tracking_uri, f"benchmark-{plan.suite.name}") if tracking_uri else None
        self.t0 = time.perf_counter()
        self.done = 0

    # records -------------------------------------------------------------
    def load_finished(self) -> None:
        """Finished cells of an earlier run with the same config are reused as they are."""
        for cell in self.plan.cells:
            path = self.cells_dir / f"{cell.cell_id}.json"
            if not path.is_file():
                continue
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a torn file cannot exist (atomic writes), but never trust one
            if rec.get("key") == cell.key and rec.get("row", {}).get("status") == "ok":
                rec["row"]["reused"] = True
                self.records[cell.cell_id] = rec

    def record(self, cell: Cell, row: dict) -> None:
        rec = {"key": cell.key, "cell_id": cell.cell_id, "row": row, "mlflow_run_id": None}
        path = self.cells_dir / f"{cell.cell_id}.json"
        atomic_write_json(path, rec)
        self.records[cell.cell_id] = rec
        self._log_mlflow(cell, rec)
        self.write_table()
        self.done += 1
        if self.progress:
            extra = (f"healed {row['poison_healed']:.1f} damage {row['model_damage']:+.2f}"
                     if row["status"] == "ok" else row.get("error") or "")
            wall = row.get("wall_s") or 0.0
            print(f"[{self.done}/{self.n_todo}] {row['status']:6s} {cell.cell_id}  {extra}  ({wall:.0f} s)",
                  flush=True)

    def _log_mlflow(self, cell: Cell, rec: dict) -> None:
        if self.logger is None:
            return
        report = self.cells_dir / cell.cell_id / "report.json"
        try:
            rec["mlflow_run_id"] = self.logger.log(cell, rec["row"], report if rec["row"]["status"] == "ok" else None)
        except Exception as e:  # noqa: BLE001 — the result is on disk; MLflow catches up on the next run
            print(f"warning: MLflow logging of {cell.cell_id} failed: {_describe(e)}", file=sys.stderr)
            return
        # On disk a row is never "reused": that flag describes this invocation only.
        atomic_write_json(self.cells_dir / f"{cell.cell_id}.json", {**rec, "row": {**rec["row"], "reused": False}})

    def rows(self) -> list[dict]:
        return [self.records[c.cell_id]["row"] for c in self.plan.cells if c.cell_id in self.records]

    def write_table(self) -> Path:
        return write_results(self.plan.out / RESULTS_FILE, self.rows(), self.meta)

    def _previous_meta(self) -> dict:
        try:
            return read_meta(pq.read_table(self.plan.out / RESULTS_FILE))
        except Exception:  # noqa: BLE001 — no table yet, or an unreadable one that we rewrite anyway
            return {}

    # scheduling ----------------------------------------------------------
    def run(self, address: str | None, num_cpus: int | None) -> None:
        from potion.distributed.leftovers import RECORD_FILE, stop_recorded

        # A run killed outright (SIGKILL) left its Ray processes running: stop exactly those.
        record = self.plan.out / RECORD_FILE
        stop_recorded(record)
        todo = [c for c in self.plan.cells if c.cell_id not in self.records]
        self.n_todo = len(todo)
        for c in self.plan.cells:  # reused cells logged before MLflow caught them
            rec = self.records.get(c.cell_id)
            if rec and not rec.get("mlflow_run_id"):
                self._log_mlflow(c, rec)
        previous = self._previous_meta()
        if previous:
            self.meta["first_date"] = previous.get("first_date") or previous.get("date")
        if not todo:
            if previous:  # nothing ran: the table still describes the run that computed it
                self.meta = {**previous, "last_rerun": self.meta["date"], "last_rerun_command": self.meta["command"]}
            self.write_table()
            return
        self.write_table()
        import ray

        from potion.distributed.runtime import connect, shutdown_if_owned, start_watch

        connect(address, num_cpus)
        try:
            start_watch("this benchmark", None, resume="finished cells are kept and skipped", record=record)
            res = ray.cluster_resources()
            self.meta.update(cluster_cpus=res.get("CPU"), cluster_gpus=res.get("GPU", 0.0))
            self._loop(ray, todo)
        finally:
            shutdown_if_owned()

    def _loop(self, ray, todo: list[Cell]) -> None:
        suite = self.plan.suite
        tr, cr = suite.train_resources, suite.cell_resources
        train_fn = ray.remote(train_task).options(num_cpus=tr.cpus, num_gpus=tr.gpus, max_retries=0)
        heal_fn = ray.remote(heal_task).options(num_cpus=cr.cpus, num_gpus=cr.gpus, max_retries=0)
        model_state: dict[str, dict] = {}  # key → {"status", "n_poison", "error"}
        in_flight: dict = {}
        for mkey in dict.fromkeys(c.model.key for c in todo):
            m = self.plan.models[mkey]
            metrics_file = m.dir / "metrics.json"
            if metrics_file.is_file():
                model_state[mkey] = {"status": "ok", "n_poison": json.loads(metrics_file.read_text()).get("n_poison")}
            else:
                ref = train_fn.remote(to_dict(m.job), str(m.dir.absolute()), tr.cpus)
                in_flight[ref] = ("train", m)
                if self.progress:
                    print(f"training model {m.poison} n={n_label(m.n)} seed={m.seed} → {m.dir}", flush=True)
        # A cell of an importance group waits until its group's first cell has finished.
        leaders: dict[tuple, Cell] = {}
        for c in self.plan.cells:
            if c.group is not None:
                leaders.setdefault(c.group, c)
        waiting = list(todo)

        def ready(c: Cell) -> bool:
            if c.model.key not in model_state:
                return False
            lead = leaders.get(c.group) if c.group else None
            return lead is None or lead is c or lead.cell_id in self.records

        def submit_ready() -> None:
            for c in list(waiting):
                st = model_state.get(c.model.key)
                if st is not None and st["status"] != "ok":
                    waiting.remove(c)
                    self.record(c, cell_row(c, suite.name, {"status": "failed",
                                                            "error": f"training failed: {st['error']}"}, None))
                elif ready(c):
                    waiting.remove(c)
                    ref = heal_fn.remote(str(c.model.dir.absolute()), to_dict(c.heal), c.share, c.count,
                                         str((self.cells_dir / c.cell_id).absolute()), suite.keep_healed_models,
                                         cr.cpus)
                    in_flight[ref] = ("cell", c)

        submit_ready()
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            kind, obj = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as e:  # noqa: BLE001 — a worker crash (OOM, node lost) fails one task
                outcome = {"status": "failed", "error": _describe(e)}
            if kind == "train":
                m: ModelPlan = obj
                model_state[m.key] = {"status": outcome["status"], "error": outcome.get("error"),
                                      "n_poison": (outcome.get("metrics") or {}).get("n_poison")}
                if self.progress:
                    msg = (f"clean_acc {outcome['metrics']['clean_acc']:.4f} asr {outcome['metrics']['asr']:.4f}"
                           if outcome["status"] == "ok" else outcome.get("error"))
                    print(f"model {m.poison} n={n_label(m.n)} seed={m.seed}: {outcome['status']} {msg}", flush=True)
            else:
                c: Cell = obj
                self.record(c, cell_row(c, suite.name, outcome, model_state[c.model.key].get("n_poison")))
            submit_ready()
        for c in waiting:  # cannot happen unless a leader vanished; never leave a cell unrecorded
            self.record(c, cell_row(c, suite.name, {"status": "failed", "error": "never scheduled"}, None))


def dry_run_table(plan: Plan, finished: dict[str, dict]) -> str:
    from potion.heal.report import format_table

    rows = []
    for c in plan.cells:
        trained = (c.model.dir / "metrics.json").is_file()
        rows.append({"cell_id": c.cell_id, "poison": c.poison, "n": n_label(c.n), "share": c.share_label,
                     "method": c.method, "seed": c.seed, "model": c.model.key[:8] + ("*" if trained else ""),
                     "state": "reuse" if c.cell_id in finished else "run"})
    return format_table(rows, ["cell_id", "poison", "n", "share", "method", "seed", "model", "state"])


def benchmark(suite: SuiteConfig, out: str | Path, *, suite_file: Path | None = None, dry_run: bool = False,
              address: str | None = None, num_cpus: int | None = None, tracking_uri: str | None = None,
              progress: bool = True, command: str | None = None) -> list[dict]:
    """Run (or, with ``dry_run``, list) a suite; returns the results rows in grid order."""
    out = Path(out)
    plan = expand(suite, out, suite_file)
    warning = check_data(plan, dry_run)
    if dry_run:
        runner_records = _finished_without_runner(plan)
        print(dry_run_table(plan, runner_records))
        n_trained = sum((m.dir / "metrics.json").is_file() for m in plan.models.values())
        print(f"\nsuite {suite.name}: {len(plan.models)} models ({n_trained} trained, * above), "
              f"{len(plan.cells)} cells ({len(runner_records)} finished); results → {out / RESULTS_FILE}")
        print(f"data: {plan.data_path or suite.data.dataset} ({'found' if warning is None else 'missing'})")
        if warning:
            print(warning)
        return []
    from potion.tracking.store import resolve_tracking_uri

    runner = Runner(plan, tracking_uri=resolve_tracking_uri(tracking_uri, out), progress=progress, command=command)
    runner.load_finished()
    if progress:
        print(f"suite {suite.name}: {len(plan.cells)} cells, {len(runner.records)} already finished; "
              f"{len(plan.models)} models → {out}", flush=True)
    runner.run(address, num_cpus)
    return runner.rows()


def _finished_without_runner(plan: Plan) -> dict[str, dict]:
    finished = {}
    for c in plan.cells:
        path = plan.out / "cells" / f"{c.cell_id}.json"
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("key") == c.key and rec.get("row", {}).get("status") == "ok":
            finished[c.cell_id] = rec
    return finished


def run_benchmark(args) -> int:
    """CLI entry: 0 when every cell finished, 1 when some failed (they are in the table)."""
    from potion.heal.report import format_table

    suite, path = load_suite(args.suite)
    out = Path(args.out) if getattr(args, "out", None) else Path("benchmarks") / "work" / suite.name
    try:
        rows = benchmark(suite, out, suite_file=path, dry_run=args.dry_run, address=getattr(args, "address", None),
                         num_cpus=getattr(args, "num_cpus", None), tracking_uri=getattr(args, "tracking_uri", None),
                         progress=not getattr(args, "quiet", False))
    except KeyboardInterrupt as e:
        # each finished cell was written as it finished: say so, not the CLI's "nothing was written"
        n = len(_finished_without_runner(expand(suite, out, path)))
        e.kept = f"{n} finished {'cell is' if n == 1 else 'cells are'} kept, rerun the same command to resume"
        raise
    if args.dry_run:
        return 0
    print(format_table(rows, SHOW))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"\nresults: {out / RESULTS_FILE}  ({len(rows)} cells, {len(failed)} failed)")
    print(f"summary: potion report {out / RESULTS_FILE}")
    return 1 if failed else 0


__all__ = [
    "SuiteConfig", "PoisonSpec", "MethodSpec", "Resources", "Cell", "ModelPlan", "Plan",
    "load_suite", "find_suite", "expand", "validate_suite", "benchmark", "run_benchmark",
    "write_results", "read_meta", "SCHEMA", "RESULTS_FILE",
]
