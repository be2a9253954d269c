"""The sets a heal works on, from the inputs: the deletion set Sf (found by the owner or drawn
from a run's manifest), the retain set Dr = D − Sf, and the guard's clean proxy (a slice of Dr)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from potion.datasets import draw_deletion_set
from potion.errors import PotionError
from potion.heal.inputs import HealInputs
from potion.unlearning.cache import hash_arrays


def read_identified(path: str | Path, n_total: int) -> np.ndarray:
    """Indices of D the owner identified as poison, from CSV (one index per line, optional
    ``index`` header; with a header, its ``index`` column) or Parquet (an integer
    ``index`` column). Anything else is refused with the line or value at fault: a
    silently truncated 3.7 or a dropped first row would heal the wrong samples."""
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"identified-samples file {path} does not exist or is not a file")
    expected = ("expected a CSV with one integer index per line (optional header 'index') "
                "or a Parquet file with an integer 'index' column")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            values = _identified_parquet(path, expected)
        else:
            values = _identified_csv(path, expected)
    except (ValueError, OSError, pa.ArrowException) as e:
        raise PotionError(f"cannot read identified samples from {path}: {e}; {expected}") from None
    return validate_indices(values, n_total, str(path))


def _identified_parquet(path: Path, expected: str) -> np.ndarray:
    table = pq.read_table(path)
    if "index" not in table.column_names:
        raise PotionError(f"{path} has no 'index' column (columns: {', '.join(table.column_names)}); {expected}")
    col = table.column("index")
    if col.null_count:
        raise PotionError(f"{path}: the 'index' column has {col.null_count} empty (null) values; {expected}")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise PotionError(f"{path}: the 'index' column holds {col.type}, not integers; {expected}")
    values = col.to_numpy()
    if pa.types.is_floating(col.type):
        frac = values[~np.isfinite(values) | (values != np.round(values))]
        if frac.size:
            raise PotionError(f"{path}: the 'index' column holds {frac[0].item()!r}, which is not a whole number; "
                              f"{expected}")
    return values.astype(np.int64)


def _identified_csv(path: Path, expected: str) -> np.ndarray:
    import csv

    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    if not lines:
        return np.zeros(0, dtype=np.int64)
    rows = [(n, [f.strip() for f in next(csv.reader([ln]))]) for n, ln in lines]
    col = 0
    first = rows[0][1]
    if not _is_int(first[0]):
        names = [f.lower() for f in first]
        if "index" not in names:
            raise PotionError(
                f"{path}, line {rows[0][0]}: '{lines[0][1].strip()}' is neither an integer index nor a header "
                f"with an 'index' column; {expected}"
            )
        col, rows = names.index("index"), rows[1:]
    width = len(first)
    if width > 1 and _is_int(first[0]):
        raise PotionError(f"{path}, line {lines[0][0]}: {width} values on one line; put one index per line "
                          f"(or add a header naming the 'index' column); {expected}")
    values = []
    for n, fields in rows:
        if len(fields) != width:
            raise PotionError(f"{path}, line {n}: {len(fields)} fields where the first line has {width}; {expected}")
        if not _is_int(fields[col]):
            raise PotionError(f"{path}, line {n}: '{fields[col]}' is not an integer index; {expected}")
        values.append(int(fields[col]))
    return np.array(values, dtype=np.int64)


def _is_int(text: str) -> bool:
    t = text.strip()
    return t.lstrip("+-").isdigit() and t.count("-") + t.count("+") <= 1


def validate_indices(values: np.ndarray, n_total: int, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        raise PotionError(f"the deletion set from {where} is empty; identify at least one poisoned sample")
    bad = values[(values < 0) | (values >= n_total)]
    if bad.size:
        raise PotionError(
            f"the deletion set from {where} has indices outside the training set 0..{n_total - 1}: "
            f"{', '.join(map(str, bad[:5]))}"
        )
    values = np.unique(values)
    if len(values) == n_total:  # checked here, before the importances: Dr would have no batch
        raise PotionError(
            f"the deletion set from {where} lists all {n_total} training samples, which leaves the retain set "
            "Dr = D − Sf empty; PTN needs retain importances, so list only the samples found carrying the trigger"
        )
    return values


def select_deletion_set(inputs: HealInputs, share, count, identified, seed) -> tuple[np.ndarray, str]:
    given = [x is not None for x in (share, count, identified)]
    if sum(given) != 1:
        raise PotionError("give exactly one of --discovery-share, --discovery-count or --identified")
    n_total = inputs.n_train
    if identified is not None:
        return read_identified(identified, n_total), f"file {identified}"
    if inputs.manifest is None:
        raise PotionError("--discovery-share/--discovery-count draw from a Potion poison manifest (a --run folder); "
                          "for your own model and data give the indices you found with --identified FILE")
    idx = draw_deletion_set(inputs.manifest, share=share, count=count, seed=seed)
    what = f"share {share}" if share is not None else f"count {count}"
    return validate_indices(idx, n_total, f"manifest draw ({what})"), f"manifest draw ({what}, seed {seed})"


def check_deletion_is_poison(inputs: HealInputs, deletion: np.ndarray, source: str) -> None:
    """A deletion set of clean samples makes PTN search to max_steps for a crossing that
    cannot come; when the run's manifest knows the poison, say so at once."""
    gt = inputs.poisoned_mask
    if gt is None or not gt.any():
        return  # no ground truth: the owner's own data, or a manifest without poison
    hits = int(gt[deletion].sum())
    if hits == 0:
        raise PotionError(
            f"none of the {len(deletion)} samples of the deletion set ({source}) is poisoned according to the run's "
            "poison manifest; PTN unlearns the poison through them. Pass the indices of samples you found "
            "carrying the trigger"
        )
    if hits < len(deletion):
        print(f"potion: warning: {len(deletion) - hits} of the {len(deletion)} samples of the deletion set ({source}) "
              "are not poisoned according to the run's manifest; they dilute the forget importances", file=sys.stderr)


# ---------------------------------------------------------------- the guard's clean proxy
GUARDED = ("xlf_ptn_guard", "potion_plus")


def proxy_size(method: str, plus, size: int, n_retain: int) -> int:
    """The proxy's size: ``size``, but potion_plus with clean steps (``plus``: its PlusConfig)
    leaves at least half of a small Dr for NegGrad+ and the repair."""
    return min(size, max(1, n_retain // 2)) if method == "potion_plus" and plus.clean_steps else size


def draw_repair(retain: np.ndarray, proxy: np.ndarray, size: int, seed: int) -> np.ndarray:
    """potion_plus's repair images: a seeded slice of Dr outside the proxy (whose damage it must not train on)."""
    rng = np.random.default_rng([int(seed), 0x3E9A1])
    pool = np.setdiff1d(np.asarray(retain), proxy)
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False)) if len(pool) else pool


def expansion_score(plus_info: dict, suspect_idx: np.ndarray | None, poisoned: np.ndarray | None) -> None:
    """Benchmark only (reads the manifest): how much of the unfound poison potion_plus grew Sf
    with, and how much of what it added was poison. Replaces the found positions in place."""
    exp = plus_info.get("expansion") or {}
    found = np.asarray(exp.pop("found_positions", []), dtype=np.int64)
    if suspect_idx is None or poisoned is None:
        return
    hits = int(poisoned[suspect_idx[found]].sum()) if len(found) else 0
    unfound = int(poisoned[suspect_idx].sum())
    exp["true_poison_found"] = hits
    exp["precision"] = hits / len(found) if len(found) else None
    exp["recall"] = hits / unfound if unfound else None
    exp["unfound_poison"] = unfound


def suspects(retain: np.ndarray, labels: np.ndarray, deletion: np.ndarray) -> np.ndarray:
    """The retain images under a label of Sf: where the unfound poison hides (potion_plus grows Sf from them)."""
    return np.asarray(retain)[np.isin(labels[retain], np.unique(labels[deletion]))]


def draw_proxy(retain: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded slice of Dr (sorted indices of D): the guard's clean proxy. It is drawn from
    the retain set only, so it never holds a sample of the deletion set or of the test split."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PotionError(f"proxy_size must be an integer >= 1 (retain-set images in the clean proxy), got {size!r}")
    rng = np.random.default_rng([int(seed), 0x9A0])  # its own stream: the deletion draw uses `seed`
    return np.sort(rng.choice(np.asarray(retain), size=min(size, len(retain)), replace=False))


def proxy_record(proxy: np.ndarray, seed: int, n_retain: int) -> dict:
    return {"size": int(len(proxy)), "seed": int(seed), "n_retain": int(n_retain),
            "indices_sha256": hash_arrays(np.asarray(proxy, dtype=np.int64)), "source": "seeded slice of Dr"}
