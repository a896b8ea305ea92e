"""A clock that code running inside a framework (a recipe's handlers, a Lightning callback) starts and stops.

The measured process has one run at a time, so one module-level record is enough.
"""

from __future__ import annotations

import time

_marks: dict[str, float] = {}


def start() -> None:
    """Start the clock (at the training loop's first event)."""
    _marks.clear()
    _marks["start"] = time.perf_counter()


def stop(iterations: int) -> None:
    """Stop the clock (at the loop's last event) and record how many steps ran."""
    _marks["stop"] = time.perf_counter()
    _marks["iterations"] = iterations


def result() -> dict[str, float]:
    """``{"seconds", "iterations"}`` between :func:`start` and :func:`stop`."""
    if "stop" not in _marks:
        raise RuntimeError("the benchmark's clock was not started and stopped; did the training loop run?")
    return {"seconds": _marks["stop"] - _marks["start"], "iterations": _marks["iterations"]}
