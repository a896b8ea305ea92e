"""``ef.search``: a recipe's search space for ``engineflow sweep``, declared without importing Optuna.

A recipe declares a top-level ``space``: a dict whose keys are config keys (dotted for nested
groups) and whose values are ranges, or a function of Optuna's trial returning such a dict (a
conditional space: it calls ``trial.suggest_*`` itself and returns config values)::

    space = {"lr": ef.search.loguniform(1e-4, 1.0), "hidden": ef.search.choice(16, 64, 128),
             "optim.momentum": ef.search.uniform(0.8, 0.99), "layers": ef.search.integer(1, 4)}

Each value a range gives is a config value typed as ``--set`` types it (its default's type): a float
key takes ``loguniform``/``uniform`` (or ``integer``, whose whole numbers it takes as floats), an int
key ``integer``, any key a ``choice`` of values of its type. :func:`check_space` refuses a key the
config does not declare and a range of the wrong type, naming both.

Example:
    >>> import engineflow as ef
    >>> cfg = ef.config(lr=0.1, hidden=64, optim={"momentum": 0.9})
    >>> space = check_space({"lr": loguniform(1e-4, 1.0), "optim.momentum": uniform(0.8, 0.99),
    ...                      "hidden": choice(16, 64)}, cfg, where="recipe.py")
    >>> space["lr"], space["hidden"]
    (loguniform(0.0001, 1.0), choice(16, 64))
    >>> parse_range("integer(1, 4)")
    integer(1, 4)
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engineflow.declare.configuration import Config, coerce, flatten
from engineflow.errors import ConfigError, RecipeError

__all__ = ["Choice", "Integer", "Range", "Uniform", "check_space", "choice", "integer", "loguniform", "parse_range",
           "uniform"]


@dataclass(frozen=True)
class Uniform:
    """Floats from ``low`` to ``high``, evenly (``log=False``) or evenly in their logarithm."""

    low: float
    high: float
    log: bool = False

    def __repr__(self) -> str:
        return f"{'loguniform' if self.log else 'uniform'}({self.low!r}, {self.high!r})"


@dataclass(frozen=True)
class Integer:
    """Whole numbers from ``low`` to ``high``, both included (``step`` apart; ``log``: evenly in the log)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __repr__(self) -> str:
        return f"integer({self.low!r}, {self.high!r})"


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[Any, ...]

    def __repr__(self) -> str:
        return f"choice({', '.join(map(repr, self.values))})"


Range = Uniform | Integer | Choice


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def uniform(low: float, high: float) -> Uniform:
    """Floats evenly from ``low`` to ``high``.

    Example:
        >>> uniform(0.8, 0.99)
        uniform(0.8, 0.99)
    """
    if not (_number(low) and _number(high) and low < high):
        raise RecipeError(f"ef.search.uniform(low, high) expects finite numbers with low < high, "
                          f"got ({low!r}, {high!r})")
    return Uniform(float(low), float(high))


def loguniform(low: float, high: float) -> Uniform:
    """Floats from ``low`` to ``high``, evenly in their logarithm (learning rates, weight decays).

    Example:
        >>> loguniform(1e-4, 1.0)
        loguniform(0.0001, 1.0)
    """
    if not (_number(low) and _number(high) and 0 < low < high):
        raise RecipeError(f"ef.search.loguniform(low, high) expects numbers with 0 < low < high, "
                          f"got ({low!r}, {high!r})")
    return Uniform(float(low), float(high), log=True)


def integer(low: int, high: int, *, step: int = 1, log: bool = False) -> Integer:
    """Whole numbers from ``low`` to ``high``, both included.

    Example:
        >>> integer(1, 4)
        integer(1, 4)
    """
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step))
    if not (ints and low <= high and step >= 1) or (log and low < 1):
        raise RecipeError(f"ef.search.integer(low, high) expects whole numbers with low <= high (low >= 1 with "
                          f"log=True), got ({low!r}, {high!r})")
    return Integer(low, high, step, log)


def choice(*values: Any) -> Choice:
    """One of ``values`` (numbers, strings, booleans or None).

    Example:
        >>> choice(16, 64, 128)
        choice(16, 64, 128)
    """
    if not values:
        raise RecipeError("ef.search.choice(...) expects at least one value, e.g. ef.search.choice(16, 64)")
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise RecipeError(f"ef.search.choice(...) takes numbers, strings, booleans or None, got {value!r}")
    return Choice(tuple(values))


def check_space(space: Any, config: Config, *, where: str) -> dict[str, Range]:
    """The space with each key checked against ``config``: a declared key, a range of its type.

    Raises:
        RecipeError: not a dict of ranges, a key the config does not declare, or a range whose
            values the key's type does not take (one line naming ``where``, the key and the fix).
    """
    if not isinstance(space, Mapping) or not space:
        raise RecipeError(f"{where}: space must be a non-empty dict of config keys to ef.search ranges (or a function "
                          f"of Optuna's trial returning one), got {space!r}")
    defaults = flatten(config.to_dict())
    checked: dict[str, Range] = {}
    for key, value in space.items():
        if key not in defaults:
            raise RecipeError(f"{where}: space key {key!r} is not a config key; the config declares "
                              f"{', '.join(defaults) or 'nothing'}")
        if not isinstance(value, (Uniform, Integer, Choice)):
            raise RecipeError(f"{where}: space key {key!r} must be an ef.search range (loguniform, uniform, integer, "
                              f"choice), got {value!r}")
        _check_type(key, value, defaults[key], where)
        checked[key] = value
    return checked


def _check_type(key: str, value: Range, default: Any, where: str) -> None:
    kind = type(default).__name__
    if isinstance(value, Uniform) and not isinstance(default, float):
        raise RecipeError(f"{where}: space key {key!r} has a default of type {kind} ({default!r}); "
                          f"{value!r} gives floats: use ef.search.integer or ef.search.choice")
    if isinstance(value, Integer) and (isinstance(default, bool) or not isinstance(default, (int, float))):
        raise RecipeError(f"{where}: space key {key!r} has a default of type {kind} ({default!r}); "
                          f"{value!r} gives whole numbers: use ef.search.choice")
    if isinstance(value, Choice):
        for item in value.values:
            try:
                coerce(key, item, default)
            except ConfigError as err:
                raise RecipeError(f"{where}: space key {key!r}: {value!r} holds {item!r}, which the key does not "
                                  f"take ({err})") from None


def space_values(params: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """A trial's values as config values: each coerced to its key's type, as ``--set`` does."""
    defaults = flatten(config.to_dict())
    return {key: coerce(key, value, defaults[key]) if key in defaults else value for key, value in params.items()}


_CALLS = {"uniform": uniform, "loguniform": loguniform, "integer": integer, "choice": choice}


def parse_range(text: str) -> Range:
    """A range written as on the command line: ``loguniform(1e-4, 1)``, ``integer(1, 4)``,
    ``choice(16, 64)``, ``uniform(0.8, 0.99)`` (``--space KEY=...``).

    Raises:
        RecipeError: anything else (one line with an example).
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id in _CALLS
                and not tree.keywords):
            raise ValueError(text)
        args = [ast.literal_eval(arg) for arg in tree.args]
    except (SyntaxError, ValueError):
        raise RecipeError(f"--space expects KEY=RANGE with RANGE one of loguniform(LOW, HIGH), uniform(LOW, HIGH), "
                          f"integer(LOW, HIGH), choice(A, B, ...), got {text!r}") from None
    return _CALLS[tree.func.id](*args)
