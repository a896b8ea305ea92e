"""A run's time limit (``engineflow run --time-limit 2h``): the budget, its clock, and what a checkpoint keeps of it.

The budget counts from when the run starts in this process (its setup included). Once it is spent,
the checkpointer writes a checkpoint at the end of the current iteration and the run stops, status
"interrupted" (:class:`~engineflow.errors.TimeLimitReached`). What is left of the budget is part of
every checkpoint of the run, so a ``--resume`` without ``--time-limit`` goes on with what was left
at its checkpoint (a run that stopped at its limit has nothing left: it then runs without one);
``--time-limit`` on the resume gives a new budget. On several processes rank 0's clock decides
(:attr:`TimeLimit.decides`); the checkpointer shares the decision with the other ranks.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

from engineflow.errors import RecipeError

_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: str | float | int, *, what: str = "--time-limit") -> float:
    """Seconds from ``2h``, ``30m``, ``90s``, ``1h30m``, ``1.5h`` or plain seconds (``5400``, ``5400.0``).

    Example:
        >>> [parse_duration(v) for v in ("2h", "1h30m", "90s", "45", 12.5)]
        [7200.0, 5400.0, 90.0, 45.0, 12.5]
    """
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_PART.pattern})+", text):
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise RecipeError(f"{what} expects a positive duration such as 2h, 30m, 90s, 1h30m or seconds (5400), "
                          f"got {value!r}")
    return seconds


class Registers(Protocol):
    """What the time limit needs of a fit: somewhere to keep its state (:meth:`engineflow.Fit.register`)."""

    def register(self, name: str, part: Any) -> None: ...


class TimeLimit:
    """The run's time budget: whether it is spent, and what is left of it (checkpointed).

    Args:
        seconds: the budget given for this process's run (None: none given; a resume then takes
            what its checkpoint had left).
        decides: whether this process's clock decides (rank 0); the others never find it spent
            themselves.
        clock: seconds from a monotonic clock.

    Example:
        >>> now = [0.0]
        >>> limit = TimeLimit(60, clock=lambda: now[0])
        >>> now[0] = 45.0
        >>> limit.reached(), limit.state_dict()
        (False, {'remaining': 15.0})
        >>> resumed = TimeLimit(None, clock=lambda: now[0])   # --resume without --time-limit
        >>> resumed.load_state_dict(limit.state_dict())
        >>> now[0] = 60.0
        >>> resumed.reached(), resumed.budget
        (True, 15.0)
    """

    def __init__(self, seconds: float | None, *, decides: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.given = seconds
        self.budget = seconds
        self.decides = decides
        self._clock = clock
        self._start = clock()

    def remaining(self) -> float | None:
        """Seconds left (None: no limit)."""
        return None if self.budget is None else self.budget - (self._clock() - self._start)

    def reached(self) -> bool:
        """Whether the budget is spent, by this process's clock (always False where it does not decide)."""
        if not self.decides or self.budget is None:
            return False
        return self._clock() - self._start >= self.budget

    def describe(self) -> str:
        """The budget as the run's lines give it."""
        return "no time limit" if self.budget is None else f"a time limit of {_format(self.budget)}"

    def attach(self, fit: Registers) -> list[Any]:
        """Keep what is left in ``fit``'s checkpoints (part ``"time_limit"``); it adds no handler: the
        checkpointer asks :meth:`reached` at the end of each iteration."""
        fit.register("time_limit", self)
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"remaining": self.remaining()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume: what was left, unless a new budget was given (nothing left: no limit)."""
        if self.given is None:
            left = state.get("remaining")
            self.budget = left if left is not None and left > 0 else None


def _format(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or f"{seconds:g}s"
