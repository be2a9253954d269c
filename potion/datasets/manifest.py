"""The poisoning manifest: which samples of D carry the trigger, and which were found.

One row per training sample, saved as Parquet beside every poisoned model so that any
run can be reproduced and audited (SPEC §3). Writing uses fixed options and the table
holds no timestamps, so the same seed gives the same bytes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from potion.datasets.poisons import Trigger
from potion.errors import PotionError
from potion.io import atomic_write

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("clean_label", pa.int64()),
        ("train_label", pa.int64()),
        ("poisoned", pa.bool_()),
        ("trigger", pa.string()),
        ("trigger_params", pa.string()),
        ("corner", pa.int8()),
        ("discovered", pa.bool_()),
    ]
)
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Manifest:
    table: pa.Table

    def _np(self, column: str) -> np.ndarray:
        return self.table.column(column).to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def train_labels(self) -> np.ndarray:
        return self._np("train_label").astype(np.int64)

    @property
    def clean_labels(self) -> np.ndarray:
        return self._np("clean_label").astype(np.int64)

    @property
    def poisoned_mask(self) -> np.ndarray:
        return self._np("poisoned").astype(bool)

    @property
    def discovered_mask(self) -> np.ndarray:
        return self._np("discovered").astype(bool)

    @property
    def corners(self) -> np.ndarray:
        return self._np("corner").astype(np.int8)

    @property
    def poisoned_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poisoned_mask).astype(np.int64)

    @property
    def discovered_indices(self) -> np.ndarray:
        return np.flatnonzero(self.discovered_mask).astype(np.int64)

    def _meta(self, key: str) -> str:
        return (self.table.schema.metadata or {})[key.encode()].decode()

    @property
    def target(self) -> int:
        return int(self._meta("target"))

    @property
    def seed(self) -> int:
        return int(self._meta("seed"))

    @property
    def trigger_name(self) -> str:
        return self._meta("trigger")

    @property
    def trigger_params(self) -> dict:
        return json.loads(self._meta("trigger_params"))

    def with_discovered(self, indices) -> "Manifest":
        """A copy whose ``discovered`` column is True exactly at ``indices`` (a subset of the poison)."""
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        n = len(self)
        if len(idx) and (idx[0] < 0 or idx[-1] >= n):
            raise PotionError(f"discovered indices must lie in 0..{n - 1}, got {idx[0]}..{idx[-1]}")
        poisoned = self.poisoned_mask
        if not poisoned[idx].all():
            bad = idx[~poisoned[idx]][:5].tolist()
            raise PotionError(f"discovered indices must be poisoned samples; these are clean: {bad}")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        col = self.table.schema.get_field_index("discovered")
        return Manifest(self.table.set_column(col, SCHEMA.field("discovered"), pa.array(mask, pa.bool_())))


def make_manifest(
    labels: np.ndarray, n_poison: int, target: int, trigger: Trigger, seed: int, num_classes: int | None = None
) -> Manifest:
    """Poison ``n_poison`` samples drawn without replacement (SPEC §3); none discovered yet.

    Every drawn sample gets the trigger and the label ``target``, including those that are
    already of class ``target``. Corners come from the same seeded generator, after the draw.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not isinstance(n_poison, (int, np.integer)) or isinstance(n_poison, bool) or not 0 <= n_poison <= n:
        raise PotionError(f"the number of poisoned samples must be an integer in 0..{n}, got {n_poison!r}")
    top = num_classes if num_classes is not None else int(labels.max(initial=0)) + 1
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool) or not 0 <= target < top:
        raise PotionError(f"target class must be an integer in 0..{top - 1}, got {target!r}")

    rng = np.random.default_rng(seed)
    drawn = rng.choice(n, size=int(n_poison), replace=False).astype(np.int64)
    drawn_corners = trigger.draw_corners(rng, len(drawn)).astype(np.int8)

    poisoned = np.zeros(n, dtype=bool)
    poisoned[drawn] = True
    corners = np.full(n, -1, dtype=np.int8)
    corners[drawn] = drawn_corners
    train_labels = labels.copy()
    train_labels[drawn] = target
    params_json = json.dumps(trigger.params, sort_keys=True)
    trig = np.where(poisoned, trigger.name, None)
    trig_params = np.where(poisoned, params_json, None)

    table = pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "clean_label": pa.array(labels),
            "train_label": pa.array(train_labels),
            "poisoned": pa.array(poisoned),
            "trigger": pa.array(trig.tolist(), pa.string()),
            "trigger_params": pa.array(trig_params.tolist(), pa.string()),
            "corner": pa.array(corners),
            "discovered": pa.array(np.zeros(n, dtype=bool)),
        },
        schema=SCHEMA,
    )
    meta = {
        "target": str(int(target)),
        "seed": str(int(seed)),
        "trigger": trigger.name,
        "trigger_params": params_json,
        "potion_manifest": FORMAT_VERSION,
    }
    return Manifest(table.replace_schema_metadata(meta))


def resolve_count(
    share: float | None, count: int | None, total: int, what: str, minimum: int = 1
) -> int:
    """Exactly one of ``share`` (of ``total``, rounded half up) or ``count``, checked against ``total``.

    A positive share never rounds to fewer than ``minimum`` samples.
    """
    if (share is None) == (count is None):
        raise PotionError(f"{what}: give exactly one of a share (0..1) or a count")
    if count is not None:
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool):
            raise PotionError(f"{what}: count must be an integer, got {count!r}")
        if count < minimum:
            raise PotionError(f"{what}: count must be at least {minimum}, got {count}")
        if count > total:
            raise PotionError(f"{what}: count {count} exceeds the {total} samples available")
        return int(count)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise PotionError(f"{what}: share must be a number in [0, 1], got {share!r}")
    # The small epsilon keeps 0.1 * 50 (= 5.000000000000001 or 4.999999999999999) at 5.
    n = int(math.floor(share * total + 0.5 + 1e-9))
    if share > 0:
        n = max(n, minimum)
    if n < minimum or n > total:
        raise PotionError(f"{what}: a share of {share} of {total} samples gives {n}, need {minimum}..{total}")
    return n


def draw_deletion_set(
    manifest: Manifest, share: float | None = None, count: int | None = None, seed: int = 0
) -> np.ndarray:
    """Sorted indices of D of a seeded draw of poisoned samples (the deletion set Sf)."""
    poisoned = manifest.poisoned_indices
    if len(poisoned) == 0:
        raise PotionError("the manifest has no poisoned samples, so there is no deletion set to draw")
    m = resolve_count(share, count, len(poisoned), "deletion set")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(poisoned, size=m, replace=False)).astype(np.int64)


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically with fixed options: same manifest → same bytes."""

    def write(tmp: str) -> None:
        pq.write_table(
            manifest.table,
            tmp,
            compression="zstd",
            compression_level=3,
            use_dictionary=True,
            write_statistics=True,
            row_group_size=1 << 20,
            data_page_version="1.0",
            version="2.6",
        )

    return atomic_write(path, write)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"manifest {path} does not exist; it is written as manifest.parquet beside a poisoned model")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise PotionError(f"manifest {path} is not a readable Parquet file ({e})") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    meta = table.schema.metadata or {}
    missing_meta = [k for k in ("target", "seed", "trigger", "trigger_params") if k.encode() not in meta]
    if missing or missing_meta:
        raise PotionError(
            f"manifest {path} lacks {'columns ' + ', '.join(missing) if missing else ''}"
            f"{'; ' if missing and missing_meta else ''}"
            f"{'metadata keys ' + ', '.join(missing_meta) if missing_meta else ''}; it is not a Potion manifest"
        )
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA.with_metadata(meta))
    except (pa.ArrowException, ValueError) as e:
        raise PotionError(f"manifest {path} has columns of the wrong type ({e})") from None
    if not np.array_equal(table.column("index").to_numpy(), np.arange(table.num_rows)):
        raise PotionError(f"manifest {path}: the index column must run 0..N-1 in order")
    return Manifest(table)
