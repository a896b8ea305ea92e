"""Config defaults and --set overrides, type-checked against the defaults."""

from __future__ import annotations

import pytest

import engineflow as ef
from engineflow.declare.configuration import parse_assignments

CFG = ef.config(epochs=3, lr=0.1, name="mlp", amp=False, layers=[64, 32], optim={"momentum": 0.9, "nesterov": True},
                tag=None)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("epochs", "7", 7),
        ("lr", "1e-3", 1e-3),
        ("lr", "2", 2.0),
        ("name", "resnet", "resnet"),
        ("amp", "true", True),
        ("amp", "0", False),
        ("layers", "[8, 4]", [8, 4]),
        ("optim.momentum", "0.5", 0.5),
        ("optim.nesterov", "no", False),
        ("tag", "3", 3),
        ("tag", "baseline", "baseline"),
    ],
)
def test_overrides_parse_as_the_defaults_type(key, raw, expected):
    cfg = CFG.override({key: raw})
    value = cfg
    for part in key.split("."):
        value = value[part]
    assert value == expected and type(value) is type(expected)


def test_python_values_are_accepted_when_their_type_fits():
    assert CFG.override({"lr": 1}).lr == 1.0
    assert CFG.override({"epochs": 4}).epochs == 4
    with pytest.raises(ef.ConfigError, match="expects an int"):
        CFG.override({"epochs": True})


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ef.ConfigError) as err:
        CFG.override({"learning_rate": "0.1"})
    assert "unknown config key 'learning_rate'" in str(err.value)
    assert "epochs, lr, name, amp, layers, optim.momentum, optim.nesterov, tag" in str(err.value)


@pytest.mark.parametrize(
    ("key", "raw", "expects"),
    [("epochs", "ten", "an int"), ("lr", "fast", "a float"), ("amp", "maybe", "true or false"),
     ("layers", "64", "a JSON list"), ("epochs", "1.5", "an int")],
)
def test_value_of_the_wrong_type_is_refused(key, raw, expects):
    with pytest.raises(ef.ConfigError, match=f"'{key}' expects {expects}.*got '{raw}'"):
        CFG.override({key: raw})


@pytest.mark.parametrize("raw", ["1e400", "-1e999", "nan", "inf", "-inf", float("nan"), float("inf")])
def test_a_float_that_is_not_finite_is_refused_where_the_default_is_finite(raw):
    with pytest.raises(ef.ConfigError, match=r"'lr' expects a finite float \(default 0.1\), got"):
        CFG.override({"lr": raw})
    unbounded = ef.config(limit=float("inf"))  # a non-finite default: inf and nan are its kind of value
    assert unbounded.override({"limit": "inf"}).limit == float("inf")


@pytest.mark.parametrize(("key", "raw"), [("epochs", "\uff11\uff12"), ("lr", "\uff10.5"), ("epochs", "\u0661\u0662")])
def test_numbers_take_ascii_digits_only(key, raw):
    """int() and float() read full-width and Arabic-Indic digits; a config value is typed in ASCII."""
    with pytest.raises(ef.ConfigError, match=f"'{key}' expects"):
        CFG.override({key: raw})
    assert CFG.override({"name": "caf\u00e9"}).name == "caf\u00e9"  # text values keep any character


def test_a_group_cannot_be_set_whole():
    with pytest.raises(ef.ConfigError, match=r"is a group; set one of its keys: optim\.momentum"):
        CFG.override({"optim": "1"})


def test_config_is_read_only_and_a_mapping():
    with pytest.raises(AttributeError, match="read-only"):
        CFG.lr = 1.0
    assert dict(CFG)["lr"] == 0.1
    assert CFG.to_dict()["optim"] == {"momentum": 0.9, "nesterov": True}
    with pytest.raises(AttributeError, match="config key 'nope'"):
        _ = CFG.nope
    assert CFG.lr == 0.1, "override returns a new config"


def test_parse_assignments():
    assert parse_assignments(["lr=0.1", "name=a=b"]) == {"lr": "0.1", "name": "a=b"}
    with pytest.raises(ef.ConfigError, match="KEY=VALUE"):
        parse_assignments(["lr"])
