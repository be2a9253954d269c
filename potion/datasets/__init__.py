"""Datasets, triggers, poisoning manifests and the views that feed models (SPEC §2–3).

Importing the package registers every dataset source and trigger.
"""
from potion.datasets.base import DATASETS, ArraySource, DatasetSplits, ImageSource, load_dataset
from potion.datasets.manifest import (
    Manifest,
    draw_deletion_set,
    load_manifest,
    make_manifest,
    resolve_count,
    save_manifest,
)
from potion.datasets.poisons import TRIGGERS, Trigger, make_trigger
from potion.datasets.views import LabeledView, clean_test_view, train_view, triggered_test_view

# Imported for their registrations.
from potion.datasets import cifar, digits, ilsvrc, imagefolder, parquet  # noqa: E402,F401  isort: skip

__all__ = [
    "DATASETS",
    "load_dataset",
    "ImageSource",
    "ArraySource",
    "DatasetSplits",
    "TRIGGERS",
    "make_trigger",
    "Trigger",
    "Manifest",
    "make_manifest",
    "draw_deletion_set",
    "resolve_count",
    "save_manifest",
    "load_manifest",
    "LabeledView",
    "train_view",
    "clean_test_view",
    "triggered_test_view",
]
