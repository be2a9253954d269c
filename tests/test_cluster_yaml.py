"""ray_cluster.yaml passes the checks `ray up` runs before it launches anything."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_config_validates(config):
    prepared = _validate(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for t in types.values():
        assert all(type(v) is int for v in t["resources"].values()), t["resources"]


def test_every_node_installs_this_package(config):
    prepared = _validate(config)
    mounts = prepared["file_mounts"]
    remote = next(r for r, local in mounts.items() if (CONFIG.parent / local).resolve() == REPO)
    assert (REPO / "pyproject.toml").is_file()
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and remote in c for c in prepared[key]), key
    # the same authentication mode on every node, or workers cannot join the head
    modes = {c.split("RAY_AUTH_MODE=")[1].split()[0]
             for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"] if "ray start" in c}
    assert len(modes) == 1


def test_validator_rejects_fractional_node_resources(config):
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
