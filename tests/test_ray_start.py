"""Starting a local Ray: a startup that Ray's GCS overload times out is retried once with a
longer wait, then is one clear error; other start failures are not retried.

In a module of their own: these tests need a process with no Ray connected, and the fault
tests keep one connected for their whole module."""
from __future__ import annotations

import time

import pytest


# ---------------------------------------------------------------- Ray start under load
STARTUP_TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet "
                   "failed to startup or the GCS has become overloaded.")


def test_a_local_ray_start_that_times_out_twice_is_one_clear_error(monkeypatch, capsys):
    import ray

    from potion.distributed import runtime
    from potion.errors import PotionError

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise Exception(STARTUP_TIMEOUT)

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(PotionError, match=r"did not start, twice .* 120 s.*overloaded.*--address") as e:
        runtime.connect(None, num_cpus=1)
    assert len(calls) == 2 and not runtime.owned()
    assert "GCS has become overloaded" in e.value.detail
    assert "trying once more" in capsys.readouterr().err


def test_other_start_failures_are_not_retried(monkeypatch):
    import ray

    from potion.distributed import runtime

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise ValueError("bad resources")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ValueError, match="bad resources"):
        runtime.connect(None, num_cpus=1)
    assert len(calls) == 1


@pytest.mark.ray
def test_a_local_ray_start_that_times_out_once_is_retried_with_a_longer_wait(monkeypatch, capsys):
    import ray
    from ray._private import services

    from potion.distributed import runtime

    real_init, real_get_node = ray.init, services.get_node
    patient = []

    def init(**kwargs):
        patient.append(services.get_node is not real_get_node)
        if len(patient) == 1:
            raise Exception(STARTUP_TIMEOUT)
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", init)
    try:
        runtime.connect(None, num_cpus=1)
        assert ray.is_initialized() and runtime.owned()
        assert ray.get(ray.remote(lambda: 7).remote()) == 7
    finally:
        runtime.shutdown_if_owned()
    assert patient == [False, True]  # Ray's own wait first, ours on the retry
    assert services.get_node is real_get_node
    assert "timed out while starting" in capsys.readouterr().err


def test_the_patient_node_wait_polls_until_its_own_deadline(monkeypatch):
    from ray._private import services

    from potion.distributed.runtime import _patient_node_wait

    tries = []

    def get_node(*a, **k):
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("node not registered yet")
        return {"node_id": "n"}

    monkeypatch.setattr(services, "get_node", get_node)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with _patient_node_wait(60):
        assert services.get_node("gcs", "n") == {"node_id": "n"}
    assert len(tries) == 3 and services.get_node is get_node
    with _patient_node_wait(0):
        tries.clear()
        with pytest.raises(RuntimeError):
            services.get_node("gcs", "n")
