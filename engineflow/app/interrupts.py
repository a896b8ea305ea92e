"""SIGINT and SIGTERM during a run: checkpoint at a safe point, then exit 130.

The first signal asks the checkpointer to write at the end of the current iteration (a state
where the model and the optimizer agree) and stop; a second one, or one before training started,
stops at once. Either way the run ends as KeyboardInterrupt: status "interrupted", exit 130.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class Interrupts:
    """Context manager: route SIGINT/SIGTERM to ``target.interrupt_requested`` once a target is set."""

    def __init__(self) -> None:
        self.target: Any = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        target = self.target
        if target is None or target.interrupt_requested:
            raise KeyboardInterrupt(f"signal {signum}")
        target.interrupt_requested = True
        print(f"\nsignal {signum}: writing a checkpoint after this iteration, then stopping "
              "(signal again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
