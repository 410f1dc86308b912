"""Method configs are typed and validated field by field from their annotations, without torch: bad types, values
outside a field's range and unknown choices are a `UsageError` naming the field, for every registered method."""
from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

from edgecl.config import Bounds, MethodConfig, parse_overrides
from edgecl.errors import UsageError
from edgecl.train import registry
from edgecl.train.methods.lps_config import PRUNING_UNIT, LPSConfig


@pytest.mark.parametrize("name", registry.known())
def test_every_method_uses_the_config_class_the_registry_validates(name):
    assert registry.method_class(name).Config is registry.config_class(name)
    assert registry.check_config(name) == registry.config_class(name)()  # the defaults are valid


@pytest.mark.parametrize("name", registry.known())
@pytest.mark.parametrize("bad", ["abc", None, [1], {"a": 1}])
def test_every_field_refuses_a_value_of_the_wrong_type(name, bad):
    cls = registry.config_class(name)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if bad is None and type(None) in typing.get_args(hints[field.name]) or hints[field.name] is str:
            continue  # None fits an optional field, a string a free-text one
        with pytest.raises(UsageError, match=rf"{cls.__name__}: {field.name} must be"):
            cls.from_json({field.name: bad})


@pytest.mark.parametrize("data, message", [
    ({"epochs": "abc"}, "epochs must be an integer, got 'abc'"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"epochs": True}, "epochs must be an integer"),
    ({"epochs": -1}, "epochs must be ≥ 1, got -1"),
    ({"epochs": 0}, "epochs must be ≥ 1, got 0"),  # an untrained model would ship with exit 0
    ({"batch_size": 0}, "batch_size must be ≥ 1"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"seed": -3}, r"seed must be in \[0, 4294967295\], got -3"),
    ({"seed": 2**32}, r"seed must be in \[0, 4294967295\]"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\], got 0.0"),
    ({"beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
    ({"pruning": "diagonal"}, "pruning must be one of 'irregular', 'column', 'filter', got 'diagonal'"),
    ({"init_free": 0}, "init_free must be one of 'random', 'zero'"),
    ({"admm_epochs": "x"}, "admm_epochs must be an integer or null, got 'x'"),
    ({"mask_lr": -1.0}, r"mask_lr must be > 0"),
])
def test_lps_config_errors_name_the_field_and_what_it_expects(data, message):
    with pytest.raises(UsageError, match=message):
        LPSConfig.from_json(data)


def test_all_problems_are_reported_at_once():
    with pytest.raises(UsageError, match=r"LPSConfig: epochs must be ≥ 1, got -1; alpha must be in \(0, 1\], got 2"):
        LPSConfig.from_json({"epochs": -1, "alpha": 2})


def test_values_are_normalised_to_the_field_type():
    """An int for a float field, and numpy scalars, are stored as plain JSON numbers of the field's type."""
    cfg = LPSConfig.from_json({"lr": 1, "epochs": np.int64(3), "alpha": np.float32(0.5), "mask_lr": None})
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.alpha) is float and cfg.mask_lr is None
    assert cfg.to_json()["lr"] == 1.0 and LPSConfig.from_json(cfg.to_json()) == cfg


def test_rules_across_fields_and_direct_construction_are_checked():
    with pytest.raises(UsageError, match=r"warmup_epochs must be in \[1, epochs\)"):
        registry.check_config("halrp", {"epochs": 3, "warmup_epochs": 3})
    with pytest.raises(UsageError, match="prox_every"):
        registry.config_class("agscl")(prox_every="batch")
    with pytest.raises(UsageError, match="unknown config fields"):
        registry.check_config("rgo", {"alpha": 1.0, "gamma": 2})


def test_choice_fields_match_what_the_method_supports():
    assert set(typing.get_args(typing.get_type_hints(LPSConfig)["pruning"])) == set(PRUNING_UNIT)


def test_bounds_read_as_written():
    assert str(Bounds(0, 1, low_open=True)) == "in (0, 1]" and str(Bounds(1)) == "≥ 1"
    assert str(Bounds(0, low_open=True)) == "> 0" and str(Bounds(high=5, high_open=True)) == "< 5"
    assert 0.5 in Bounds(0, 1) and 0 not in Bounds(0, 1, low_open=True) and 1 in Bounds(0, 1, low_open=True)


def test_unknown_method_is_refused_by_name():
    with pytest.raises(UsageError, match="unknown method 'ewc'"):
        registry.config_class("ewc")


def test_parse_overrides():
    assert parse_overrides(["epochs=5", "pruning=column", "mask_lr=null", "x=[1"]) == {
        "epochs": 5, "pruning": "column", "mask_lr": None, "x": "[1"}
    with pytest.raises(UsageError, match="--config expects KEY=VALUE"):
        parse_overrides(["epochs"], flag="--config")


def test_base_config_is_what_baselines_use():
    assert registry.config_class("finetune") is MethodConfig is registry.config_class("stl")
