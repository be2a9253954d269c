"""Break the heal on purpose, one line at a time, and check that a test notices.

Each mutation replaces one exact line of the package with a plausible mistake (a swapped
prefix, a weight, a comparison, a dropped check) and runs the tests that should catch it
(``pytest -x -q`` on a few files or test names). A mutation is *caught* when those tests
fail. Floor: every mutation caught. On request only, not in CI; it takes several minutes:

    .venv/bin/python benchmarks/mutations.py            # all of them; prints `caught N of M`
    .venv/bin/python benchmarks/mutations.py --list     # names, files and tests, runs nothing
    .venv/bin/python benchmarks/mutations.py --only grid-weights

The work tree is never touched: the package and tests are copied to a temporary folder
and the tests import that copy (``PYTHONPATH``, which Ray workers inherit). Each mutated
file is restored byte for byte after its run, also on Ctrl-C. Before any mutation the same
tests run on the unmutated copy: a test that already fails there would "catch" anything,
so such a mutation is reported as not measured instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ("potion", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # an exact, unique line (or run of lines) of that file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k" expressions


BAD = "tests/test_bad_inputs.py"
M = Mutation
MUTATIONS = [
    # ---- the hand breaks (items 8-12)
    M("cache-key-ignores-batch-size", "potion/heal/importances.py",
      "key = cache.key(state0, data_hash, estimator, p, bs, extra=extra)",
      "key = cache.key(state0, data_hash, estimator, p, 512, extra=extra)",
      ("tests/test_heal_stages.py", "-k", "batch_size")),
    M("mlflow-before-after-swapped", "potion/heal/report.py",
      'zip(heal_rows(report), ("before_", "after_"))', 'zip(heal_rows(report), ("after_", "before_"))',
      ("tests/test_own_model.py", "-k", "local_lowers")),
    M("grid-weights", "potion/heal/run.py",
      "return 0.5 * (ra - ra0) + 0.5 * (cl - cl0)", "return 0.7 * (ra - ra0) + 0.3 * (cl - cl0)",
      ("tests/test_heal_stages.py", "-k", "ssd_grid")),
    M("allow-damage-ignores-partial", "potion/unlearning/guard.py",
      'decision.status in ("partial", "none")', 'decision.status in ("none",)',
      ("tests/test_guard.py", "-k", "allow_damage")),
    M("ray-first-finished-crossing", "potion/distributed/search.py",
      "    hit = smallest_crossing(trace, threshold)\n",
      "    hit = next((r for r in results.values() if r.acc_forget <= threshold), None)\n",
      ("tests/test_ray_search.py", "-k", "smallest_crossing_when")),
    M("ray-window-one-too-wide", "potion/distributed/searcher.py",
      "if self._next_k >= lowest_open + self.window:", "if self._next_k > lowest_open + self.window:",
      ("tests/test_ray_search.py", "-k", "sliding_window")),
    # ---- the core math (SPEC §5-§7) and the metrics (SPEC §4)
    M("dampen-selects-by-retain", "potion/unlearning/dampening.py",
      "selected = f > alpha * r", "selected = r > alpha * f", ("tests/test_dampening.py",)),
    M("dampen-beta-inverted", "potion/unlearning/dampening.py",
      "beta = torch.clamp(lam * r / f, max=1.0)", "beta = torch.clamp(lam * f / r, max=1.0)",
      ("tests/test_dampening.py",)),
    M("alpha-percentile", "potion/unlearning/dampening.py",
      "return float(min(100.0, max(0.0, 100.0 - math.log1p(100.0 * s))))",
      "return float(min(100.0, max(0.0, 100.0 - math.log1p(10.0 * s))))", ("tests/test_dampening.py",)),
    M("share-at-step", "potion/unlearning/ptn.py",
      "return (n_forget / n_total) / buffer * step**k", "return (n_forget / n_total) / buffer * step**(k + 1)",
      ("tests/test_ptn.py",)),
    M("crossing-strict", "potion/unlearning/ptn.py",
      "crossing = [r for r in results if r.acc_forget <= threshold]",
      "crossing = [r for r in results if r.acc_forget < threshold]", ("tests/test_ptn.py",)),
    M("linear-crossing-strict", "potion/unlearning/ptn.py",
      "    for k in range(cfg.max_steps + 1):\n        r = memo.one(k)\n        if r.acc_forget <= threshold:",
      "    for k in range(cfg.max_steps + 1):\n        r = memo.one(k)\n        if r.acc_forget < threshold:",
      ("tests/test_ptn.py",)),
    M("threshold-not-relative", "potion/unlearning/ptn.py",
      "    return cfg.rho * acc0\n", "    return cfg.rho\n", ("tests/test_ptn.py",)),
    M("guard-delta-check", "potion/unlearning/guard.py",
      "return dmg[k] >= -cfg.max_damage", "return dmg[k] >= -2 * cfg.max_damage", ("tests/test_guard.py",)),
    M("retain-keeps-deletion", "potion/heal/run.py",
      "retain = np.setdiff1d(np.arange(inputs.n_train), deletion)", "retain = np.arange(inputs.n_train)",
      ("tests/test_heal_stages.py", "-k", "batch_size")),
    M("asr-counts-target-class", "potion/metrics.py",
      "return float(np.mean(pred_triggered[other] == target))", "return float(np.mean(pred_triggered == target))",
      ("tests/test_metrics.py",)),
    M("poison-healed-not-relative", "potion/metrics.py",
      "return 100.0 * ra / clean_acc", "return 100.0 * ra", ("tests/test_metrics.py",)),
    M("damage-sign", "potion/metrics.py",
      "return 100.0 * (clean_after - clean_before)", "return 100.0 * (clean_before - clean_after)",
      ("tests/test_metrics.py",)),
    # ---- the inputs of issue 23 (items 1-4)
    M("int-weights-cast", "potion/models/checkpoint.py",
      "            if v.is_floating_point() and isinstance(state_dict.get(k), torch.Tensor)\n",
      "            if False and isinstance(state_dict.get(k), torch.Tensor)\n",
      (BAD, "-k", "weights-int or ckpt-int")),
    M("triggered-size-unresized", "potion/datasets/stored.py",
      "seen, want = resized(triggered, image_size).image_shape, resized(test, image_size).image_shape",
      "seen, want = triggered.image_shape, test.image_shape",
      (BAD, "-k", "resized_with_image_size or triggered-test")),
    M("identified-all-of-d", "potion/heal/sets.py",
      "    if len(values) == n_total:", "    if len(values) > n_total:",
      (BAD, "-k", "all-of-d or before_any")),
    M("numpy-repr-in-message", "potion/heal/sets.py",
      "holds {frac[0].item()!r}, which", "holds {frac[0]!r}, which", (BAD, "-k", "pq-3.7")),
    M("library-text-in-message", "potion/models/checkpoint.py",
      'raise PotionError(f"{path} is not a readable checkpoint: the file is truncated, damaged or not a torch file",',
      'raise PotionError(f"{path} is not a readable checkpoint: the file is truncated: {e}",',
      (BAD, "-k", "ckpt-truncated or debug_shows")),
    M("png-unchecked", "potion/datasets/parquet.py",
      "    if not blob.startswith(PNG_SIGNATURE):\n        return None\n",
      "    return None\n", (BAD, "-k", "image-damaged-png")),
]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def _pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    """(passed, last lines of the output, seconds) of pytest on the copy."""
    env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [f"exit {out.returncode}"]
    return out.returncode == 0, tail[0][:200], time.perf_counter() - t0


def run(selected: list[Mutation], timeout: float) -> int:
    with tempfile.TemporaryDirectory(prefix="potion-mutations-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        for m in selected:  # each break must exist, once, before anything runs
            n = (copy / m.path).read_text().count(m.old)
            if n != 1:
                print(f"{m.name}: the line to break occurs {n} times in {m.path}; update the mutation")
                return 2
        caught = measured = 0
        for m in selected:
            ok, tail, secs = _pytest(copy, m.tests, timeout)
            if not ok:
                print(f"NOT MEASURED {m.name}: its tests fail without the mutation ({tail})", flush=True)
                continue
            target = copy / m.path
            original = target.read_bytes()
            try:
                target.write_bytes(original.replace(m.old.encode(), m.new.encode(), 1))
                ok, tail, secs = _pytest(copy, m.tests, timeout)
            finally:
                target.write_bytes(original)
            assert target.read_bytes() == original
            measured += 1
            caught += not ok
            print(f"{'caught' if not ok else 'MISSED'} {m.name} ({m.path}; {' '.join(m.tests)}; {secs:.0f} s): {tail}",
                  flush=True)
        print(f"caught {caught} of {len(selected)}" + (f" ({len(selected) - measured} not measured)"
                                                        if measured < len(selected) else ""))
        return 0 if caught == len(selected) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="run only this mutation (repeatable; default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    unknown = [n for n in args.only or [] if n not in names]
    if unknown:
        print(f"mutations: unknown mutation {unknown[0]!r}; --list shows the {len(names)} names", file=sys.stderr)
        return 2
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name:36s} {m.path:34s} {' '.join(m.tests)}")
        print(f"{len(selected)} mutations")
        return 0
    return run(selected, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
