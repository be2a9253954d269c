"""``potion benchmark --suite NAME``: the paper's grid of poisons × n × shares × methods × seeds.

A suite (``benchmarks/suites/NAME.yaml``) expands into *cells*. Phase 1 trains one
poisoned model per (poison, n, seed), cached under ``<out>/models/<hash of its TrainJob>``;
phase 2 heals each cell from its model. Both run as Ray tasks, one machine or a cluster
(``<out>`` must then be on a filesystem every node sees). A cell's outcome is written
atomically to ``<out>/cells/<cell_id>.json`` as soon as it finishes, so a rerun — or a run
after a kill — skips every finished cell; a failed cell is recorded with its error and
retried on the next run. The driver alone writes ``results.parquet`` and MLflow (sqlite
takes one writer).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from potion.config import from_dict, load_yaml, to_dict
from potion.errors import PotionError
from potion.io import atomic_write, atomic_write_json
from potion.pipeline.configs import DataConfig, HealJob, ModelConfig, TrainJob
from potion.training import TrainRecipe

SUITES_DIR = Path("benchmarks") / "suites"
DATA_ENV = "POTION_DATA"
ONE_SHOT = "one"
RESULTS_FILE = "results.parquet"
META_KEY = b"potion_benchmark"
# Methods that read the same importance pass: a cell of the group waits for the first
# one, which fills the importance cache, instead of computing it again beside it.
ESTIMATOR_OF = {"ssd": "fisher", "ssd_grid": "fisher", "ssd_ptn": "fisher", "lf_ptn": "lf", "xlf_ptn": "xlf",
                "xlf_ptn_guard": "xlf"}
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")


# ---------------------------------------------------------------- suite schema
@dataclass
class PoisonSpec:
    trigger: str = "badnet"
    params: dict[str, Any] = field(default_factory=dict)
    target: int = 0
    name: str | None = None  # label in the table; default: the trigger name

    @property
    def label(self) -> str:
        return self.name or self.trigger


@dataclass
class MethodSpec:
    """A method, optionally with its own heal overrides and only at some n / shares."""

    method: str
    name: str | None = None  # label in the table; default: the method name
    heal: dict[str, Any] = field(default_factory=dict)
    n: list[int | float] | None = None
    shares: list[int | float | str] | None = None

    @property
    def label(self) -> str:
        return self.name or self.method


@dataclass
class Resources:
    """What one Ray task asks for; torch gets ``int(cpus)`` threads."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class SuiteConfig:
    name: str
    description: str = ""
    notes: str = ""  # caveats that belong next to every result (e.g. lossy data)
    data: DataConfig = field(default_factory=DataConfig)
    # A relative data.args.root is looked up under $POTION_DATA, else under this folder
    # (itself relative to the repository root; `potion data` writes there by default).
    data_root: str = "data"
    # Optional, not a default instance: a default section would be merged key by key into
    # the suite's, and the default model's args (width) do not belong to another model.
    model: ModelConfig | None = None
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    device: str = "auto"
    eval_batch_size: int = 512
    poisons: list[PoisonSpec] = field(default_factory=lambda: [PoisonSpec()])
    n: list[int | float] = field(default_factory=lambda: [0.01])  # float in (0,1): share of |D|; int: count
    shares: list[int | float | str] = field(default_factory=lambda: [ONE_SHOT, 0.5])  # "one"/int: count
    methods: list[str | MethodSpec] = field(default_factory=lambda: ["none", "xlf_ptn"])
    seeds: list[int] = field(default_factory=lambda: [0])
    heal: dict[str, Any] = field(default_factory=dict)  # HealJob overrides for every cell
    train_resources: Resources = field(default_factory=Resources)
    cell_resources: Resources = field(default_factory=Resources)
    keep_healed_models: bool = False  # healed model.pt per cell (WRN: 146 MB each)


# ---------------------------------------------------------------- the grid
@dataclass
class ModelPlan:
    key: str
    job: TrainJob
    dir: Path
    poison: str
    n: int | float
    seed: int


@dataclass
class Cell:
    cell_id: str
    key: str  # hash of everything the cell's result depends on
    model: ModelPlan
    poison: str
    trigger: str
    n: int | float
    share_label: str
    share: float | None  # argument of the deletion draw
    count: int | None
    method: str  # label
    base_method: str
    seed: int
    heal: HealJob
    group: tuple | None = None  # cells sharing an importance pass


@dataclass
class Plan:
    suite: SuiteConfig
    suite_file: Path | None
    out: Path
    models: dict[str, ModelPlan]
    cells: list[Cell]
    data_path: Path | None


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_suite(name: str) -> Path:
    """A YAML path, or a name under ``benchmarks/suites`` (cwd first, then the repository)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if not p.is_file():
            raise PotionError(f"suite file {p} does not exist")
        return p
    bases = [Path.cwd() / SUITES_DIR, repo_root() / SUITES_DIR]
    for base in bases:
        if (base / f"{name}.yaml").is_file():
            return base / f"{name}.yaml"
    known = sorted({f.stem for b in bases if b.is_dir() for f in b.glob("*.yaml")})
    raise PotionError(f"no suite '{name}' in {bases[-1]}; known suites: {', '.join(known) or '(none)'}; "
                      "or pass the path of a suite YAML file")


def load_suite(name: str) -> tuple[SuiteConfig, Path]:
    path = find_suite(name)
    data = load_yaml(path)
    suite = from_dict(SuiteConfig, data)
    return suite, path


def n_label(n: int | float) -> str:
    return f"{n:g}" if isinstance(n, float) else str(n)


def parse_n(n: object) -> int | float:
    """Poison size: a share of |D| in (0, 1) or a count >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise PotionError(f"suite n: {n!r} is neither a share of |D| (0 < n < 1) nor a count (integer >= 1)")
    if isinstance(n, float) and not 0 < n < 1:
        raise PotionError(f"suite n: {n} is not a share in (0, 1); write counts as integers (e.g. 100)")
    if isinstance(n, int) and n < 1:
        raise PotionError(f"suite n: count {n} must be at least 1")
    return n


def parse_share(s: object) -> tuple[str, float | None, int | None]:
    """Discovery share → (label, share, count). 'one' or 1 is one-shot healing (|Sf| = 1)."""
    if s == ONE_SHOT or (isinstance(s, int) and not isinstance(s, bool) and s == 1):
        return ONE_SHOT, None, 1
    if isinstance(s, int) and not isinstance(s, bool) and s > 1:
        return f"c{s}", None, s
    if isinstance(s, float) and 0 < s <= 1:
        return f"{s:g}", s, None
    raise PotionError(
        f"suite shares: {s!r} is not 'one' (one-shot), a share of the poison in (0, 1.0] (write 100 % as 1.0) "
        "or a count (integer >= 1)"
    )


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (a method's ptn keys keep the suite's others)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def portable_path(path: str | Path) -> str:
    """A path as a results table may record it: ``$POTION_DATA/...`` under the data root,
    relative under the repository, else as given. Committed results must not carry the
    folders of the machine they ran on."""
    path = Path(os.path.normpath(Path(os.path.expanduser(str(path))).absolute()))
    env = os.environ.get(DATA_ENV)
    for base, name in ((Path(env) if env else None, f"${DATA_ENV}"), (repo_root(), None)):
        if base is None:
            continue
        base = Path(os.path.normpath(base.absolute()))
        if path == base or base in path.parents:
            rel = path.relative_to(base).as_posix()
            return f"{name}/{rel}" if name else rel
    return str(path)


def _portable_data(data: DataConfig) -> dict:
    d = to_dict(data)
    if d.get("args", {}).get("root"):
        d["args"]["root"] = portable_path(d["args"]["root"])
    return d


def resolve_data(suite: SuiteConfig) -> tuple[DataConfig, Path | None]:
    """The suite's data config with a relative root made absolute (see ``data_root``)."""
    args = dict(suite.data.args)
    root = args.get("root")
    if root is None:
        return DataConfig(suite.data.dataset, args), None
    path = Path(os.path.expanduser(str(root)))
    if not path.is_absolute():
        env = os.environ.get(DATA_ENV)
        base = Path(env) if env else Path(os.path.normpath(repo_root() / suite.data_root))
        path = base / path
    path = Path(os.path.normpath(path.absolute()))
    args["root"] = str(path)
    return DataConfig(suite.data.dataset, args), path


def _method_specs(suite: SuiteConfig) -> list[MethodSpec]:
    return [m if isinstance(m, MethodSpec) else MethodSpec(method=m) for m in suite.methods]


def _check_label(label: str, what: str) -> None:
    if not _SAFE.match(label):
        raise PotionError(f"suite {what} '{label}' may only hold letters, digits and _.+- (it names files)")


def validate_suite(suite: SuiteConfig) -> None:
    """Everything that can be checked without data: registries, params, grid entries."""
    from potion.datasets import DATASETS, make_trigger
    from potion.models import MODELS, model_kwargs
    from potion.unlearning.methods import METHODS

    _check_label(suite.name, "name")
    DATASETS.get(suite.data.dataset)
    model = suite.model or ModelConfig()
    params = inspect.signature(MODELS.get(model.name)).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):  # vit passes extra kwargs on to timm
        valid = model_kwargs(model.name)
        for k in model.args:
            if k not in valid:
                raise PotionError(f"suite model.args: model '{model.name}' has no parameter '{k}'; "
                                  f"valid: {', '.join(valid) or '(none)'}")
    for what, values in (("poisons", suite.poisons), ("n", suite.n), ("shares", suite.shares),
                         ("methods", suite.methods), ("seeds", suite.seeds)):
        if not values:
            raise PotionError(f"suite {suite.name}: '{what}' is empty; list at least one")
    labels = [p.label for p in suite.poisons]
    for p in suite.poisons:
        _check_label(p.label, "poison name")
        make_trigger(p.trigger, **p.params)
    if len(set(labels)) != len(labels):
        raise PotionError(f"suite poisons: two poisons are called the same ({labels}); give them distinct 'name's")
    ns = [parse_n(n) for n in suite.n]
    shares = [parse_share(s)[0] for s in suite.shares]
    for what, vals in (("n", [n_label(n) for n in ns]), ("shares", shares), ("seeds", suite.seeds)):
        if len(set(vals)) != len(vals):
            raise PotionError(f"suite {what}: an entry is listed twice: {vals}")
    specs = _method_specs(suite)
    names = [m.label for m in specs]
    if len(set(names)) != len(names):
        raise PotionError(f"suite methods: two methods are called the same ({names}); give variants a 'name'")
    for m in specs:
        METHODS.get(m.method)
        _check_label(m.label, "method name")
        for n in m.n or []:
            if n_label(parse_n(n)) not in {n_label(x) for x in ns}:
                raise PotionError(f"suite method '{m.label}': n={n} is not in the suite's n list {suite.n}")
        for s in m.shares or []:
            if parse_share(s)[0] not in shares:
                raise PotionError(f"suite method '{m.label}': share {s!r} is not in the suite's shares {suite.shares}")
    for where in [suite.heal] + [m.heal for m in specs]:
        for key in ("method", "backend", "tracking_uri", "seed"):
            if key in where:
                raise PotionError(
                    f"suite heal overrides may not set '{key}': the benchmark sets it per cell (cells run as "
                    "Ray tasks with the local backend; the driver logs to MLflow; the seeds list seeds the draw)"
                )
    for r, what in ((suite.train_resources, "train_resources"), (suite.cell_resources, "cell_resources")):
        if r.cpus <= 0 or r.gpus < 0:
            raise PotionError(f"suite {what}: cpus must be > 0 and gpus >= 0, got {r}")


def expand(suite: SuiteConfig, out: Path, suite_file: Path | None = None) -> Plan:
    """The grid: one ModelPlan per (poison, n, seed), one Cell per (…, share, method)."""
    validate_suite(suite)
    data, data_path = resolve_data(suite)
    specs = _method_specs(suite)
    model = suite.model or ModelConfig()
    models: dict[str, ModelPlan] = {}
    cells: list[Cell] = []
    cache_dir = str((out / "importance-cache").absolute())
    for poison in suite.poisons:
        for n in map(parse_n, suite.n):
            for seed in suite.seeds:
                job = from_dict(TrainJob, {
                    "data": to_dict(data),
                    "poison": {"trigger": poison.trigger, "params": poison.params, "target": poison.target,
                               "share": n if isinstance(n, float) else None,
                               "count": n if isinstance(n, int) else None, "seed": seed},
                    "model": to_dict(model),
                    "recipe": {**to_dict(suite.recipe), "seed": seed},
                    "device": suite.device,
                    "eval_batch_size": suite.eval_batch_size,
                })
                # The device does not define the model; everything else does.
                mkey = _hash({k: v for k, v in to_dict(job).items() if k != "device"})
                plan = models.setdefault(mkey, ModelPlan(mkey, job, out / "models" / mkey[:16], poison.label, n, seed))
                for share_raw in suite.shares:
                    label, share, count = parse_share(share_raw)
                    for m in specs:
                        if m.n is not None and n_label(n) not in {n_label(parse_n(x)) for x in m.n}:
                            continue
                        if m.shares is not None and label not in {parse_share(x)[0] for x in m.shares}:
                            continue
                        heal = from_dict(HealJob, {
                            "device": suite.device, "cache_dir": cache_dir, **deep_merge(suite.heal, m.heal),
                            "method": m.method, "backend": "local", "tracking_uri": "none", "seed": seed,
                            "on_no_crossing": "keep",  # scored as θ0, flagged in the row's note
                        })
                        cell_id = f"{poison.label}-n{n_label(n)}-{label}-{m.label}-seed{seed}"
                        heal_dict = {k: v for k, v in to_dict(heal).items() if k not in ("device", "cache_dir")}
                        key = _hash({"model": mkey, "heal": heal_dict, "share": share, "count": count})
                        est = ESTIMATOR_OF.get(m.method)
                        group = (mkey, label, est, heal.importance_batch_size, heal.importance_augment) if est else None
                        cells.append(Cell(cell_id, key, plan, poison.label, poison.trigger, n, label, share, count,
                                          m.label, m.method, seed, heal, group))
    return Plan(suite, suite_file, out, models, cells, data_path)


def check_data(plan: Plan, dry_run: bool) -> str | None:
    """Missing data: a warning in a dry run, an error otherwise."""
    p = plan.data_path
    if p is None or p.exists():
        return None
    how = (f"the suite's data root '{plan.suite.data.args.get('root')}' resolves to {p} "
           f"(relative roots are looked up under ${DATA_ENV}"
           f"{' = ' + os.environ[DATA_ENV] if os.environ.get(DATA_ENV) else ', unset, else ' + os.path.normpath(repo_root() / plan.suite.data_root)})")
    if dry_run:
        return f"WARNING: data not found: {how}; a real run would stop here"
    raise PotionError(f"data not found: {how}; put the data there or set {DATA_ENV} to the folder holding it")


# ---------------------------------------------------------------- Ray tasks
def _set_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:2000]


def train_task(job_dict: dict, model_dir: str, cpus: float) -> dict:
    """Train one poisoned model; never raises, so the driver sees every failure as data."""
    _set_threads(cpus)
    try:
        from potion.pipeline.train import run_train

        metrics = run_train(from_dict(TrainJob, job_dict), model_dir, overwrite=True, progress=False)
        return {"status": "ok", "metrics": metrics}
    except Exception as e:  # noqa: BLE001 — a failing model must not sink the grid
        return {"status": "failed", "error": _describe(e)}


def heal_task(model_dir: str, heal_dict: dict, share: float | None, count: int | None, cell_dir: str,
              keep_model: bool, cpus: float) -> dict:
    """Heal one cell from its trained model; never raises."""
    _set_threads(cpus)
    t0 = time.perf_counter()
    try:
        from potion.pipeline.heal import run_heal

        report = run_heal(model_dir, from_dict(HealJob, heal_dict), cell_dir, share=share, count=count,
                          overwrite=True, progress=False)
        if not keep_model:
            (Path(cell_dir) / "model.pt").unlink(missing_ok=True)
        return {"status": "ok", "report": report, "wall_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 — a failing cell must not sink the grid
        return {"status": "failed", "error": _describe(e), "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- rows and results.parquet
SCHEMA = pa.schema([
    ("suite", pa.string()), ("cell_id", pa.string()), ("poison", pa.string()), ("trigger", pa.string()),
    ("n", pa.float64()), ("n_poison", pa.int64()), ("share", pa.float64()), ("share_label", pa.string()),
    ("one_shot", pa.bool_()), ("n_forget", pa.int64()), ("method", pa.string()), ("base_method", pa.string()),
    ("seed", pa.int64()), ("status", pa.string()), ("error", pa.string()),
    ("clean_acc_before", pa.float64()), ("ra_before", pa.float64()), ("asr_before", pa.float64()),
    ("clean_acc_after", pa.float64()), ("ra_after", pa.float64()), ("asr_after", pa.float64()),
    ("poison_healed_before", pa.float64()), ("poison_healed", pa.float64()), ("model_damage", pa.float64()),
    ("k_star", pa.int64()), ("alpha", pa.float64()),
    ("importance_s", pa.float64()), ("search_s", pa.float64()), ("total_s", pa.float64()), ("wall_s", pa.float64()),
    ("reused", pa.bool_()), ("model_dir", pa.string()), ("note", pa.string()),
])
METRIC_NAMES = [f.name for f in SCHEMA if pa.types.is_floating(f.type) or f.name in ("k_star", "n_forget", "n_poison")]


def _num(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _int(v) -> int | None:
    return None if v is None or isinstance(v, bool) else int(v)


def base_row(cell: Cell, suite: str) -> dict:
    return {"suite": suite, "cell_id": cell.cell_id, "poison": cell.poison, "trigger": cell.trigger,
            "n": float(cell.n), "share_label": cell.share_label, "one_shot": cell.count == 1,
            "share": cell.share, "method": cell.method, "base_method": cell.base_method, "seed": cell.seed,
            "model_dir": str(cell.model.dir), "reused": False}


def cell_row(cell: Cell, suite: str, outcome: dict, n_poison: int | None) -> dict:
    """One results row from a heal task's outcome (or a training failure)."""
    row = base_row(cell, suite)
    row.update(status=outcome["status"], error=outcome.get("error"), n_poison=n_poison,
               wall_s=_num(outcome.get("wall_s")))
    if row["share"] is None and n_poison:
        row["share"] = cell.count / n_poison
    rep = outcome.get("report")
    if rep:
        b, a, t = rep["before"], rep["after"], rep.get("timings", {})
        row.update(
            n_forget=_int(rep["deletion_set"]["size"]), n_poison=_int(rep["deletion_set"]["n_poison_total"]),
            clean_acc_before=_num(b["clean_acc"]), ra_before=_num(b["ra"]), asr_before=_num(b["asr"]),
            clean_acc_after=_num(a["clean_acc"]), ra_after=_num(a["ra"]), asr_after=_num(a["asr"]),
            poison_healed_before=_num(rep.get("before_poison_healed")),
            poison_healed=_num(a["poison_healed"]), model_damage=_num(a["model_damage"]),
            k_star=_int(rep.get("k_star")), alpha=_num(rep.get("alpha")),
            importance_s=(_num(t.get("importance_forget_s")) or 0.0) + (_num(t.get("importance_retain_s")) or 0.0),
            search_s=_num(t.get("search_s")), total_s=_num(t.get("total_s")),
        )
        if cell.count is not None and row["n_poison"]:
            row["share"] = cell.count / row["n_poison"]
        info = rep.get("info", {})
        if info.get("guard_no_safe_step"):
            row["note"] = "damage guard: no step heals within δ (max_damage): θ0 kept"
        elif info.get("no_crossing"):
            row["note"] = "no PTN crossing within max_steps: θ0 kept"
        elif info.get("nothing_to_heal"):
            row["note"] = "θ0 already misclassifies the whole deletion set (acc0 = 0), nothing to heal: θ0 kept"
    return row


def environment_info(command: str | None = None) -> dict:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.is_available()
    return {
        "command": command if command is not None else shlex.join(["potion", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cores": cores,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(path: Path, rows: list[dict], meta: dict) -> Path:
    """One row per cell, schema fixed (so an all-failed grid still has typed columns)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_meta(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


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


def tracking_uri_for(arg: str | None, out: Path) -> str | None:
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI")
    if uri == "none":
        return None
    return uri or f"sqlite:///{(out / 'mlflow.db').absolute()}"


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

        from potion.pipeline.ray_runtime import connect, shutdown_if_owned

        connect(address, num_cpus)
        res = ray.cluster_resources()
        self.meta.update(cluster_cpus=res.get("CPU"), cluster_gpus=res.get("GPU", 0.0))
        try:
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
    from potion.pipeline.report import format_table

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
    runner = Runner(plan, tracking_uri=tracking_uri_for(tracking_uri, out), progress=progress, command=command)
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
    from potion.pipeline.report import format_table

    suite, path = load_suite(args.suite)
    out = Path(args.out) if getattr(args, "out", None) else Path("benchmarks") / "work" / suite.name
    rows = benchmark(suite, out, suite_file=path, dry_run=args.dry_run, address=getattr(args, "address", None),
                     num_cpus=getattr(args, "num_cpus", None), tracking_uri=getattr(args, "tracking_uri", None),
                     progress=not getattr(args, "quiet", False))
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
