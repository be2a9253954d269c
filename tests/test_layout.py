"""The layout ARCHITECTURE.md draws: imports run one way, each package says its job, no
module holds several, and the old flat ``potion.pipeline`` paths still work, with a warning."""
from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import potion

ROOT = Path(potion.__file__).parent
# A package may import only from packages on a lower layer (or from its own).
LAYERS = [
    {"errors"},
    {"registry", "config", "progress", "interrupts"},
    {"io"},
    {"datasets", "models", "metrics", "training"},
    {"unlearning"},
    {"runs"},
    {"distributed", "tracking"},
    {"heal"},
    {"jobs"},
    {"bench"},
    {"cli", "api"},
    {"__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _sources():
    return [p for p in ROOT.rglob("*.py") if _unit(p) != "pipeline"]


def test_every_unit_has_a_layer():
    assert {_unit(p) for p in _sources()} <= set(LAYER), "a new package or module needs a place in LAYERS"


def test_imports_run_one_way():
    wrong = []
    for path in _sources():
        src = _unit(path)
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "potion" or len(parts) == 1:
                continue
            dst = parts[1]
            if dst != src and dst != "pipeline" and LAYER[dst] >= LAYER[src]:
                wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
            if dst == "pipeline":
                wrong.append(f"{path.relative_to(ROOT)} imports the deprecated {mod}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package, banned", [
    ("unlearning", ("ray", "mlflow", "argparse", "potion.datasets", "potion.models", "potion.cli")),
    ("datasets", ("potion.models",)),
    ("models", ("potion.datasets",)),
    ("distributed", ("mlflow", "potion.tracking")),
    ("tracking", ("ray.tune.search", "potion.distributed")),
])
def test_package_knows_nothing_of(package, banned):
    hits = [f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / package).rglob("*.py") for m in _imports(p)
            if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not hits, hits


def test_each_package_says_its_job_and_no_module_holds_several():
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init.parent.name}/__init__.py needs a docstring saying its job"
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_flat_paths_forward_with_a_deprecation_warning():
    from potion.pipeline import MOVED

    for old, targets in MOVED.items():
        module = importlib.import_module(f"potion.pipeline.{old}")
        new = [importlib.import_module(t) for t in targets]
        public = [n for t in new for n in vars(t) if not n.startswith("_")]
        assert public, old
        for name in public[:5]:
            assert getattr(module, name) is next(getattr(t, name) for t in new if hasattr(t, name))
        with pytest.raises(AttributeError, match="moved to"):
            getattr(module, "no_such_name")
    # the warning names the new home
    import sys
    sys.modules.pop("potion.pipeline.heal", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from potion.pipeline.heal import run_heal  # noqa: F401
    assert any(issubclass(w.category, DeprecationWarning) and "potion.heal.run" in str(w.message) for w in caught)
