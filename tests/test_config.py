from dataclasses import dataclass, field
from typing import Literal

import pytest

from potion.config import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from potion.errors import PotionError


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 10


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    share: float | None = None
    inner: Inner = field(default_factory=Inner)
    args: dict = field(default_factory=dict)


def test_roundtrip_and_int_to_float():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "share": 0.5, "args": {"k": 3}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_is_named():
    with pytest.raises(PotionError, match=r"unknown config key 'inner\.lrr'"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_wrong_type_is_named():
    with pytest.raises(PotionError, match=r"'inner\.steps'.*expected int"):
        from_dict(Outer, {"inner": {"steps": "many"}})
    with pytest.raises(PotionError, match=r"'inner\.steps'"):
        from_dict(Outer, {"inner": {"steps": True}})
    with pytest.raises(PotionError, match=r"'mode'.*not one of"):
        from_dict(Outer, {"mode": "c"})


def test_overrides_parse_yaml_values():
    d = apply_overrides({"inner": {"lr": 0.1}}, ["inner.steps=5", "share=0.25", "name=foo"])
    cfg = from_dict(Outer, d)
    assert (cfg.inner.steps, cfg.share, cfg.name, cfg.inner.lr) == (5, 0.25, "foo", 0.1)
    with pytest.raises(PotionError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(Outer(name="y")))
    assert from_dict(Outer, load_yaml(p)).name == "y"
    with pytest.raises(PotionError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


@dataclass
class WithCustomDefault:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5, steps=3))


def test_partial_section_keeps_the_fields_own_defaults():
    cfg = from_dict(WithCustomDefault, {"inner": {"steps": 7}})
    assert cfg.inner == Inner(lr=0.5, steps=7)


@dataclass
class WithMapping:
    inner: Outer = field(default_factory=lambda: Outer(args={"width": 0.25}))


def test_a_mapping_value_replaces_the_default_mapping():
    cfg = from_dict(WithMapping, {"inner": {"name": "wrn", "args": {"depth": 10}}})
    assert cfg.inner.args == {"depth": 10} and cfg.inner.name == "wrn"
