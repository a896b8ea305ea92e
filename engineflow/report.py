"""What a run prints: a progress bar on a terminal, plain lines otherwise, a summary at the end.

Every line also goes to the run's ``log.txt``. The reporter is a pair of handlers on the train
engine (order 1000, after the user's), so turning it off changes nothing else.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ignite.engine import Events

from engineflow.engine import StepEngine
from engineflow.handlers import HandlerSpec


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``train/loss 0.1234  valid/accuracy 0.9700`` (scalars only, 4 decimals)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch")


class Reporter:
    """Prints the progress of a fit to ``stream`` and appends every line to ``log_path``.

    Args:
        stream: where to print (stdout by default).
        progress: draw a live bar; default: only when ``stream`` is a terminal.
        log_path: a text log that gets every line, or None.
    """

    def __init__(self, stream: IO[str] | None = None, *, progress: bool | None = None, log_path: Path | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.progress = self.stream.isatty() if progress is None else progress
        self.log_path = log_path
        self._last_draw = 0.0
        self._epoch_start = time.monotonic()
        self.max_epochs = 0

    def line(self, text: str) -> None:
        """Print a line (and log it)."""
        if self.progress:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(text + "\n")

    def handlers(self, fit: Any) -> list[HandlerSpec]:
        """The reporter's handlers on the train engine of ``fit``."""

        def epoch_started(engine: StepEngine) -> None:
            self._epoch_start = time.monotonic()

        def epoch_completed(engine: StepEngine) -> None:
            state = engine.state
            seconds = time.monotonic() - self._epoch_start
            best = "  *" if fit.best.epoch == state.epoch else ""
            metrics = format_metrics(fit.history[-1])
            self.line(f"epoch {state.epoch}/{state.max_epochs}  {metrics}  {seconds:.1f}s{best}")

        def draw(engine: StepEngine) -> None:
            now = time.monotonic()
            if now - self._last_draw < 0.1:
                return
            self._last_draw = now
            state = engine.state
            length = state.epoch_length or 0
            done = (state.iteration - 1) % length + 1 if length else state.iteration
            filled = int(20 * done / length) if length else 0
            loss = fit.loss.running
            loss_text = f"  loss {loss:.4f}" if loss is not None else ""
            self.stream.write(
                f"\r\033[Kepoch {state.epoch}/{state.max_epochs} [{'#' * filled}{'.' * (20 - filled)}] "
                f"{done}/{length}{loss_text}"
            )
            self.stream.flush()

        specs = [
            HandlerSpec(epoch_started, Events.EPOCH_STARTED, "train", 1000, -1, raw=True),
            HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", 1000, -1, raw=True),
        ]
        if self.progress:
            specs.append(HandlerSpec(draw, Events.ITERATION_COMPLETED, "train", 1000, -1, raw=True))
        return specs
