"""Clocks for the measured loops: wall time and this process's CPU time, read together.

:class:`Clock` times a block of code; :func:`start` and :func:`stop` are the same clock for code
that runs inside a framework (a recipe's handlers, a Lightning callback) and cannot hold one.
"""

from __future__ import annotations

import time


class Clock:
    """Started when built; :meth:`stop` returns ``{"seconds", "cpu_seconds", "thread_cpu_seconds",
    "iterations"}``: wall time, the process's CPU time (every thread), and the CPU time of the thread
    that started and stopped it (the training thread: what a background writer takes off it)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.thread_cpu = time.thread_time()

    def stop(self, iterations: int) -> dict[str, float]:
        cpu, thread_cpu = time.process_time() - self.cpu, time.thread_time() - self.thread_cpu
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": cpu, "thread_cpu_seconds": thread_cpu,
                "iterations": iterations}


# One run per measured process, so one module-level record is enough.
_clock: Clock | None = None
_result: dict[str, float] | None = None


def start() -> None:
    """Start the clock (at the training loop's first event)."""
    global _clock, _result
    _clock, _result = Clock(), None


def stop(iterations: int) -> None:
    """Stop the clock (at the loop's last event) and record how many steps ran."""
    global _result
    if _clock is None:
        raise RuntimeError("timing.stop() before timing.start()")
    _result = _clock.stop(iterations)


def result() -> dict[str, float]:
    """What :func:`stop` recorded."""
    if _result is None:
        raise RuntimeError("the benchmark's clock was not started and stopped; did the training loop run?")
    return dict(_result)
