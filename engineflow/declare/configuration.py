"""A recipe's configuration: typed defaults, overridden by ``--set key=value``.

The defaults fix each key's type. An override is parsed as that type; an unknown key or a value
that does not parse is a :class:`~engineflow.errors.ConfigError` listing the valid keys.
Nested groups are plain dicts in the defaults and dotted keys on the command line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

from engineflow.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class MissingKeyError(ConfigError, AttributeError, KeyError):
    """The recipe reads a config key its ``config`` does not declare (``cfg.batch_size``).

    Also an ``AttributeError`` and a ``KeyError``, so ``getattr(cfg, key, default)`` and
    ``cfg.get(key, default)`` work as for any object and mapping.
    """

    def __init__(self, key: str, keys: list[str]) -> None:
        declared = ", ".join(keys) if keys else "nothing (the recipe has no config)"
        super().__init__(
            f"the recipe reads config key {key!r}, which its config does not declare (it declares {declared}). "
            f"Add it to the recipe's defaults, e.g. config = ef.config({key}=...), or read it with "
            f"cfg.get({key!r}, default)"
        )

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class Config(Mapping[str, Any]):
    """Read-only mapping of config values, also readable as attributes (``cfg.lr``).

    Example:
        >>> cfg = config(lr=0.1, epochs=3, optim={"momentum": 0.9})
        >>> cfg.lr, cfg["epochs"], cfg.optim.momentum
        (0.1, 3, 0.9)
        >>> cfg.override({"lr": "0.5", "optim.momentum": "0"}).optim.momentum
        0.0
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        nested = {k: Config(v) if isinstance(v, Mapping) else v for k, v in values.items()}
        object.__setattr__(self, "_values", nested)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            if name.startswith("__"):  # copy, pickle and friends probe for optional dunders
                raise AttributeError(name) from None
            raise MissingKeyError(name, list(self._values)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("config is read-only; use --set on the command line or cfg.override({...})")

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise MissingKeyError(key, list(self._values)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the values (JSON-serialisable when the values are)."""
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self._values.items()}

    def flat_keys(self) -> list[str]:
        """Every settable key, nested ones dotted (``optim.lr``)."""
        keys: list[str] = []
        for key, value in self._values.items():
            if isinstance(value, Config):
                keys.extend(f"{key}.{sub}" for sub in value.flat_keys())
            else:
                keys.append(key)
        return keys

    def override(self, overrides: Mapping[str, Any]) -> Config:
        """A new config with ``overrides`` applied; strings are parsed as the default's type.

        Raises:
            ConfigError: a key is unknown or a value does not fit the default's type.
        """
        values = self.to_dict()
        for key, raw in overrides.items():
            _set_dotted(values, key, raw, self)
        return Config(values)


def config(**defaults: Any) -> Config:
    """Declare a recipe's config defaults. Each default's type is the type its overrides must have.

    Example:
        >>> config(epochs=20, batch_size=64, lr=0.05).batch_size
        64
    """
    return Config(defaults)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as one level with dotted keys.

    Example:
        >>> flatten({"lr": 0.1, "optim": {"momentum": 0.9}})
        {'lr': 0.1, 'optim.momentum': 0.9}
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_assignments(assignments: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Turn ``["lr=0.1", "optim.momentum=0.9"]`` into a dict; a missing ``=`` is a ConfigError."""
    parsed: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r} (for example --set lr=0.01)")
        parsed[key.strip()] = value
    return parsed


def _set_dotted(values: dict[str, Any], key: str, raw: Any, defaults: Config) -> None:
    parts = key.split(".")
    node: dict[str, Any] = values
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"unknown config key {key!r}. Valid keys: {', '.join(defaults.flat_keys())}"
            )
        if depth == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(
                    f"config key {key!r} is a group; set one of its keys: "
                    + ", ".join(f"{key}.{k}" for k in node[part])
                )
            node[part] = coerce(key, raw, node[part])
        else:
            node = node[part]


def coerce(key: str, raw: Any, default: Any) -> Any:
    """Parse ``raw`` (a string from the command line, or a Python value) as ``default``'s type."""
    expected = type(default)
    if default is None:
        return _parse_literal(raw) if isinstance(raw, str) else raw
    if not isinstance(raw, str):
        if isinstance(raw, expected) and not (expected is int and isinstance(raw, bool)):
            return _finite(key, raw, raw, default) if expected is float else raw
        if expected is float and isinstance(raw, int) and not isinstance(raw, bool):
            return _finite(key, raw, float(raw), default)
        raise _type_error(key, raw, default)
    text = raw.strip()
    try:
        if expected in (int, float) and not text.isascii():  # int() and float() read any script's digits
            raise ValueError(text)
        if expected is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if expected is int:
            return int(text)
        if expected is float:
            return _finite(key, raw, float(text), default)
        if expected is str:
            return raw
        if expected in (list, tuple):
            value = _parse_literal(text)
            if not isinstance(value, list):
                raise ValueError(text)
            return expected(value)
    except ValueError:
        raise _type_error(key, raw, default) from None
    raise ConfigError(
        f"config key {key!r} has a default of type {expected.__name__}, which engineflow cannot parse from text; "
        "use int, float, bool, str, list or None defaults for settable keys"
    )


def _finite(key: str, raw: Any, value: float, default: float) -> float:
    """``value``, unless it is NaN or infinite (``1e400`` reads as inf) where the default is finite."""
    if math.isfinite(value) or not math.isfinite(default):
        return value
    raise ConfigError(f"config key {key!r} expects a finite float (default {default!r}), got {raw!r}, which is "
                      f"{value!r}")


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _type_error(key: str, raw: Any, default: Any) -> ConfigError:
    kind = type(default).__name__
    hint = {"bool": "true or false", "int": "an int", "float": "a float", "str": "a string",
            "list": "a JSON list like [1, 2]", "tuple": "a JSON list like [1, 2]"}
    return ConfigError(
        f"config key {key!r} expects {hint.get(kind, kind)} (default {default!r}), got {raw!r}"
    )
