"""What a run prints: a progress bar on a terminal, plain lines otherwise, a summary at the end.

Every line also goes to the run's ``log.txt``. The reporter is a set of handlers on the train
engine (order 1000, after the user's), so turning it off changes nothing else. The bar is tqdm's
(rate and time left included); the lines are plain text, printed above the bar.

Numbers are printed with :func:`format_value` (significant digits, so a loss of 5e-06 does not read
``0.0000``), times with :func:`format_duration` and counts with :func:`plural`.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engineflow.files import append_text

if TYPE_CHECKING:
    from engineflow.declare.handlers import HandlerSpec
    from engineflow.execute.engine import StepEngine
    from engineflow.execute.fit import Fit
    from engineflow.execute.pipeline import Pipeline

SIGNIFICANT_DIGITS = 4


def format_value(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A number as people read it: ``digits`` significant digits for floats, integers as they are.

    Small and large floats keep their digits (an exponent replaces leading or trailing zeros);
    anything that is not a number is ``str(value)``.

    Example:
        >>> [format_value(v) for v in (0.98512, 5e-06, 123.456, 0.5, 42, 1e6, 1.0, float("nan"))]
        ['0.9851', '5e-06', '123.5', '0.5', '42', '1e+06', '1', 'nan']
        >>> format_value(2/3, digits=2), format_value(True), format_value(None)
        ('0.67', 'True', 'None')
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def format_duration(seconds: float) -> str:
    """A duration short enough for a status line: ``60ms``, ``1.2s``, ``2m05s``, ``1h02m``.

    Example:
        >>> [format_duration(s) for s in (0.0004, 0.06, 0.9996, 1.23, 59.99, 125, 3725)]
        ['0.4ms', '60ms', '1.0s', '1.2s', '1m00s', '2m05s', '1h02m']
    """
    seconds = max(float(seconds), 0.0)
    if not math.isfinite(seconds):
        return str(seconds)
    ms = seconds * 1000
    if round(ms, 1) < 10:
        return f"{ms:.1f}ms"
    if round(ms) < 1000:
        return f"{ms:.0f}ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1.

    The plural adds "s", or "es" after s, x, z, sh and tch (epochs, batches); ``many`` gives any other.

    Example:
        >>> plural(1, "epoch"), plural(2, "epoch"), plural(0, "input"), plural(3, "batch")
        ('1 epoch', '2 epochs', '0 inputs', '3 batches')
        >>> plural(2, "child", "children")
        '2 children'
    """
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        many = noun + ("es" if noun.endswith(("s", "x", "z", "sh", "tch")) else "s")
    return f"{count} {many}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``train/loss 0.1234  valid/accuracy 0.97`` (scalars only, see :func:`format_value`).

    Example:
        >>> format_metrics({"epoch": 3, "train/loss": 0.123456, "valid/mse": 5e-06, "note": "x"})
        'train/loss 0.1235  valid/mse 5e-06'
    """
    return "  ".join(f"{k} {format_value(v)}" for k, v in metrics.items()
                     if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "epoch")


def format_model(summary: Mapping[str, Any]) -> list[str]:
    """The start-of-run lines of a model summary (:func:`engineflow.execute.inspection.model_summary`):
    one per module component, with its top-level children that have parameters, and the total when
    there are several.

    Example:
        >>> child = {"name": "0", "type": "Linear", "parameters": 40, "trainable": 0}
        >>> relu = {"name": "1", "type": "ReLU", "parameters": 0, "trainable": 0}
        >>> model = {"name": "model", "type": "Sequential", "parameters": 1058, "trainable": 1018,
        ...          "children": [child, relu, {**child, "name": "2", "parameters": 1018, "trainable": 1018}]}
        >>> format_model({"parameters": 1058, "trainable": 1018, "modules": [model]})
        ['model: Sequential, 1,058 parameters (1,018 trainable): 0 Linear 40 (0 trainable), 2 Linear 1,018']
    """

    def count(entry: Mapping[str, Any]) -> str:
        trainable = "" if entry["trainable"] == entry["parameters"] else f" ({entry['trainable']:,} trainable)"
        return f"{entry['parameters']:,}{trainable}"

    lines = []
    for module in summary["modules"]:
        parts = [f"{c['name']} {c['type']} {count(c)}" for c in module["children"] if c["parameters"]]
        trainable = f" ({module['trainable']:,} trainable)"
        lines.append(f"{module['name']}: {module['type']}, {module['parameters']:,} parameters{trainable}"
                     + (f": {', '.join(parts)}" if parts else ""))
    if len(summary["modules"]) > 1:
        lines.append(f"parameters: {summary['parameters']:,} ({summary['trainable']:,} trainable) in all")
    return lines


class Reporter:
    """Prints the progress of a fit to ``stream`` and appends every line to ``log_path``.

    Args:
        stream: where to print (stdout by default).
        progress: draw a live bar; default: only when ``stream`` is a terminal.
        log_path: a text log that gets every line, or None.

    The bar lives for one epoch and is cleared when the epoch's line is printed; a line printed
    while it shows (a checkpoint message) goes above it. :meth:`close` leaves a bar that an error
    or an interrupt cut short on the screen, ended by a newline, so what follows starts on a line
    of its own; the reporter is also a context manager that closes itself.
    """

    def __init__(self, stream: IO[str] | None = None, *, progress: bool | None = None, log_path: Path | None = None):
        self.stream = stream if stream is not None else sys.stdout
        if progress is None:
            isatty = getattr(self.stream, "isatty", None)
            progress = bool(isatty()) if isatty is not None else False
        self.progress = progress
        self.log_path = log_path
        self._epoch_start = time.monotonic()
        self._bar: Any = None
        self.max_epochs = 0

    def line(self, text: str) -> None:
        """Print a line (and log it), above the bar if one is showing."""
        bar = self._bar
        if bar is not None:
            bar.clear()
        print(text, file=self.stream, flush=True)
        if bar is not None:
            bar.refresh()
        if self.log_path is not None:
            append_text(self.log_path, text + "\n")

    def close(self) -> None:
        """End the bar if one is showing: it stays on screen with a newline after it (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.leave = True
            bar.close()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stage_started(self, pipeline: Pipeline) -> None:
        """A line as each stage of a pipeline starts."""
        if not pipeline.staged:
            return
        info, count = pipeline.info, len(pipeline.stages)
        what = {"train": f"{plural(pipeline.epochs[info.index], 'epoch')}", "test": "test pass",
                "infer": "inference pass"}[info.kind]
        if info.kind == "train" and pipeline.fit is None:
            what = "skipped (early stopping ended the training)"
        self.line(f"stage {info.index + 1}/{count} {info.name}: {what}")

    def stage_completed(self, pipeline: Pipeline, summary: Mapping[str, Any]) -> None:
        """A test pass's metrics, an inference pass's prediction counts."""
        if summary["kind"] == "test" and summary["metrics"]:
            self.line(f"{summary['name']}  {format_metrics(summary['metrics'])}")
        elif summary["kind"] == "infer":
            counts = ", ".join(f"{name} {shape[0] if isinstance(shape, list) and shape else shape}"
                               for name, shape in summary.get("predictions", {}).items())
            self.line(f"{summary['name']}  predictions: {counts}")

    def _discard_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()  # leave=False: tqdm erases it

    def handlers(self, fit: Fit) -> list[HandlerSpec]:
        """The reporter's handlers on the train engine of ``fit``."""
        from ignite.engine import Events

        from engineflow.declare import orders
        from engineflow.declare.handlers import HandlerSpec

        stage = f"{fit.stage.name} " if fit.stage.prefix else ""  # a stage of a pipeline names itself

        def epoch_started(engine: StepEngine) -> None:
            self._epoch_start = time.monotonic()
            if self.progress:
                self._discard_bar()
                self._bar = _epoch_bar(engine, self.stream, fit)

        def epoch_completed(engine: StepEngine) -> None:
            state = engine.state
            seconds = time.monotonic() - self._epoch_start
            best = "  *" if fit.best.epoch == state.epoch else ""
            metrics = format_metrics(fit.history[-1])
            self._discard_bar()
            self.line(f"{stage}epoch {state.epoch}/{state.max_epochs}  {metrics}  {format_duration(seconds)}{best}")

        def advance(engine: StepEngine) -> None:
            bar = self._bar
            if bar is not None:
                bar.update()  # tqdm draws at most every mininterval (0.1 s), so an update is cheap

        def completed(engine: StepEngine) -> None:
            self._discard_bar()  # a fit stopped mid-epoch (StopFit) has no epoch line to clear it

        specs = [
            HandlerSpec(epoch_started, Events.EPOCH_STARTED, "train", orders.REPORT, -1, raw=True),
            HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", orders.REPORT, -1, raw=True),
        ]
        if self.progress:
            specs += [
                HandlerSpec(advance, Events.ITERATION_COMPLETED, "train", orders.REPORT, -1, raw=True),
                HandlerSpec(completed, Events.COMPLETED, "train", orders.REPORT, -1, raw=True),
            ]
        return specs


def _epoch_bar(engine: StepEngine, stream: IO[str], fit: Fit) -> Any:
    """A tqdm bar for the epoch that starts, from the batch it starts at (a resumed run's is not 0)."""
    state = engine.state
    length = state.epoch_length
    done = min(max(state.iteration - (state.epoch - 1) * length, 0), length) if length else 0
    bar = _bar_class()(total=length, initial=done, desc=f"epoch {state.epoch}/{state.max_epochs}", file=stream,
                       leave=False, unit="batch", mininterval=0.1, miniters=1, dynamic_ncols=True)
    bar.fit = fit
    return bar


@functools.cache
def _bar_class() -> type:
    from tqdm import tqdm  # only a run that draws a bar imports it

    class EpochBar(tqdm):  # type: ignore[misc]
        """tqdm's bar with the fit's running loss, read when the bar is drawn, not at every iteration."""

        # tqdm's monitor thread would redraw from another thread, between the reporter's own writes
        monitor_interval = 0
        fit: Fit | None = None

        @property
        def format_dict(self) -> dict[str, Any]:
            values = super().format_dict
            loss = self.fit.loss.running if self.fit is not None else None
            if loss is not None:
                values["postfix"] = f"loss {format_value(loss)}"
            return values

    return EpochBar
