"""CIFAR-10 / CIFAR-100 from the standard python-pickle folders (never downloaded).

Layouts (as unpacked from the official archives)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

The batches are read here rather than through torchvision's dataset classes: those
insist on the official MD5 sums, and they unpickle arbitrary objects. This reader only
accepts numpy arrays, lists, dicts and strings, so a tampered file cannot run code.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from potion.datasets.base import DATASETS, ArraySource, DatasetSplits, absent, check_labels
from potion.errors import PotionError

# Per-channel pixel statistics of the training sets (population std, [0, 1] units).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


@DATASETS.register("cifar10")
def cifar10(root: str | Path) -> DatasetSplits:
    return load_cifar("cifar10", Path(root))


@DATASETS.register("cifar100")
def cifar100(root: str | Path) -> DatasetSplits:
    return load_cifar("cifar100", Path(root))


def load_cifar(name: str, root: Path) -> DatasetSplits:
    spec = _SPECS[name]
    files = [*spec["train"], *spec["test"], spec["meta"]]
    layout = (
        f"expected the folder unpacked from the official {name} python archive: "
        f"<root>/{spec['folder']}/{{{','.join(files)}}}"
    )
    if not root.is_dir():
        raise PotionError(f"{name}: {absent(root)}; {layout}")
    folder = root / spec["folder"]
    if not folder.is_dir() and (root / spec["meta"]).is_file():
        folder = root  # the user pointed at the unpacked folder itself
    if not folder.is_dir():
        raise PotionError(f"{name}: {absent(folder)}; {layout}")
    for f in files:
        if not (folder / f).is_file():
            raise PotionError(f"{name}: file {folder / f} is missing; {layout}")

    meta = _unpickle(folder / spec["meta"], layout)
    classes = _field(meta, spec["names_key"], folder / spec["meta"], layout)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PotionError(f"{name}: '{spec['names_key']}' in {folder / spec['meta']} is not a list of names; {layout}")
    train = _read_batches(folder, spec["train"], spec["label_key"], classes, layout)
    test = _read_batches(folder, spec["test"], spec["label_key"], classes, layout)
    return DatasetSplits(name, train, test, spec["mean"], spec["std"], hflip=True)


def _read_batches(folder: Path, names: list[str], label_key: str, classes: list[str], layout: str) -> ArraySource:
    images, labels = [], []
    for n in names:
        path = folder / n
        batch = _unpickle(path, layout)
        data = np.asarray(_field(batch, "data", path, layout))
        lab = np.asarray(_field(batch, label_key, path, layout))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (len(data),):
            raise PotionError(
                f"{path}: expected 'data' uint8 of shape (N, 3072) and N '{label_key}', got "
                f"{data.dtype} {data.shape} and {lab.shape}; {layout}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab.astype(np.int64))
    labels_all = np.concatenate(labels)
    check_labels(labels_all, classes, str(folder))
    return ArraySource(torch.from_numpy(np.concatenate(images)), labels_all, classes)


def _field(obj: object, key: str, path: Path, layout: str):
    if not isinstance(obj, dict) or key not in obj:
        raise PotionError(f"{path}: no '{key}' entry; {layout}")
    return obj[key]


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only what numpy arrays need; anything else is refused."""

    # (module suffix, name) pairs numpy writes when pickling arrays, old and new layouts.
    _ALLOWED = {
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        parts = module.split(".")
        if parts[0] == "numpy" and (parts[-1], name) in self._ALLOWED:
            # numpy 2 renamed numpy.core to numpy._core; files pickled under either load.
            if len(parts) > 1:
                for prefix in ("numpy._core.", "numpy.core."):
                    try:
                        return getattr(importlib.import_module(prefix + parts[-1]), name)
                    except (ImportError, AttributeError):
                        continue
            return getattr(importlib.import_module("numpy"), name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 writes bytes from Python 3
            return importlib.import_module("_codecs").encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path, layout: str) -> object:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001  (a garbled pickle can fail in many ways; all mean "bad file")
        raise PotionError(f"{path} is not a CIFAR python batch ({e}); {layout}") from None
