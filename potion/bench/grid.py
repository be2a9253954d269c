"""The benchmark grid: a suite file (``benchmarks/suites/NAME.yaml``), checked, and its
expansion into poisoned models and cells (poisons × n × shares × methods × seeds)."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potion.config import from_dict, load_yaml, to_dict
from potion.errors import PotionError
from potion.runs.configs import DataConfig, HealJob, ModelConfig, TrainJob
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


# Where a job runs and where it is logged, not what it computes: kept out of the cache keys.
# (A cell always heals with tracking "none", so its key may keep those two as they are.)
TRAIN_SETTINGS = frozenset({"device", "tracking_uri", "experiment"})
HEAL_SETTINGS = frozenset({"device", "cache_dir"})
# A method's own settings section: it keys that method's cells only, so that a section added
# for one method leaves every other method's cached cells valid.
METHOD_SECTIONS = {"task_vector": "task_vector", "finetune": "finetune", "plus": "potion_plus"}


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
                mkey = _hash({k: v for k, v in to_dict(job).items() if k not in TRAIN_SETTINGS})
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
                        heal_dict = {k: v for k, v in to_dict(heal).items()
                                     if k not in HEAL_SETTINGS and METHOD_SECTIONS.get(k, m.method) == m.method}
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
