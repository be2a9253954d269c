"""Test-wide settings: Ray and MLflow must never pick up a user's defaults.

Ray ≥ 2.59 turns token authentication on for local clusters and MLflow ≥ 3.7 defaults to
``sqlite:///<cwd>/mlflow.db``; both are pinned here so tests behave the same everywhere.
"""
from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny models, where a second thread on a 2-core machine costs far more than it gains.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Keep every cache (decoded datasets, importances) out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "potion-cache"
    monkeypatch.setenv("POTION_CACHE", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow-default.db'}")


def pytest_collection_modifyitems(items):
    """A test that takes the ``ray_local`` fixture starts a Ray cluster: mark it ``ray`` so
    that ``-m "not ray"`` (``make test-fast``) never starts one, however the test is written."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def small_digits_run(tmp_path_factory):
    """A tiny poisoned run (digits, 5 % badnet, 120 iterations), trained once per session
    for the tests that only need some healable run. Tests read it and never write into it."""
    from potion.cli import main

    out = tmp_path_factory.mktemp("digits-run") / "run"
    assert main(["train", "--dataset", "digits", "--poison-share", "0.05", "--seed", "0", "--iterations", "120",
                 "--out", str(out), "--quiet"]) == 0
    return out
