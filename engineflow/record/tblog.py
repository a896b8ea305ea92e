"""TensorBoard event files (tensorboardX's format), imported only when a run writes them.

Scalars: the train loss every 50 iterations (tag ``iteration/train/loss``, step = the
iteration; the recorder's handler fires only then), every per-epoch metric under its own name
(``valid/accuracy``, step = the epoch), and at the end the config as hparams with the final
metrics and the best epoch's main metric (``hparam/best/valid/accuracy``, in ``hparams/``).

The events are written by the calling thread, with tensorboardX's summaries and record writer,
not by its ``SummaryWriter``: that one writes from a thread of its own, where a failed write (a
full disk) only prints a traceback and stops the writing, and it registers an ``atexit`` close
that fails again at exit. Here a failed write raises :class:`~engineflow.errors.WriteError`
naming the event file, where it happens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engineflow.declare.configuration import flatten
from engineflow.errors import RecipeError
from engineflow.files import writing

FLUSH_EVERY_S = 5.0
# TensorBoard's hparams plugin stores numbers as float64: an int beyond this loses digits there
EXACT_INT = 2**53


class TensorBoardLog:
    """A run's TensorBoard event file in ``folder``, created on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._events: EventFile | None = None
        self._flushed_at = float("-inf")

    def open(self) -> None:
        """Create the event file now (a one-off cost that then does not land inside an epoch)."""
        _ = self.events

    @property
    def events(self) -> EventFile:
        if self._events is None:
            self._events = EventFile(self.folder)
        return self._events

    def iteration(self, iteration: int, loss: float | None, prefix: str = "") -> None:
        if loss is not None:
            self.events.scalar(f"iteration/{prefix}train/loss", loss, iteration)

    def board(self, entries: list[tuple[str, str, Any, int]], offset: int, prefix: str = "") -> None:
        """A fit's board entries (:class:`~engineflow.execute.board.Board`), at the pipeline's iteration."""
        for kind, name, value, iteration in entries:
            tag, step = f"iteration/{prefix}{name}", offset + iteration
            if kind == "scalar":
                self.events.scalar(tag, float(value), step)
            elif kind == "bins":
                self.events.histogram_bins(tag, *value, step)
            else:
                self.events.histogram(tag, value, step)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if name != "epoch":
                self.events.scalar(name, value, epoch)
        # Flushing fsyncs the event file: after each epoch when epochs are long, every few seconds
        # when they are not (and always at close).
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.events.flush()
            self._flushed_at = time.monotonic()

    def close(self, config: Mapping[str, Any], final: Mapping[str, Any], best: Mapping[str, Any] | None = None) -> None:
        """Write the hparams summary (the config; the final metrics, and the best epoch's main metric as
        ``hparam/best/<metric>``) and close the files (closed even when a write fails)."""
        try:
            metrics = {f"hparam/{k}": v for k, v in final.items() if k != "epoch" and _is_number(v)}
            if best and best.get("metric") and _is_number(best.get("value")):
                metrics[f"hparam/best/{best['metric']}"] = best["value"]
            if metrics:
                from tensorboardX.summary import hparams

                experiment, start, end = hparams({k: hparam_value(v) for k, v in flatten(config).items()}, metrics)
                summary = EventFile(self.folder / "hparams")
                try:
                    for part in (experiment, start, end):
                        summary.write(part)
                    for name, value in metrics.items():
                        summary.scalar(name, value, None)
                finally:
                    summary.close()
        finally:
            events, self._events = self._events, None
            if events is not None:
                events.close()


def hparam_value(value: Any) -> bool | int | float | str:
    """A config value as TensorBoard's hparams can hold it: a number it can store exactly, a flag, or text.

    Example:
        >>> [hparam_value(v) for v in (3, 0.5, True, "adam", None, 99999999999999999999, float("nan"), [1, 2])]
        [3, 0.5, True, 'adam', 'None', '99999999999999999999', 'nan', '[1, 2]']
    """
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -EXACT_INT <= value <= EXACT_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# [lowest, first unverified): the tensorboardX releases whose record writer, summaries and Event
# protocol buffer this module was read in and tested with (modules of tensorboardX below its API)
VERIFIED = ((2, 6, 2, 2), (2, 7))


def check_version(version: str) -> None:
    """Raise RecipeError unless tensorboardX ``version`` lies in :data:`VERIFIED`.

    Example:
        >>> check_version("2.6.5")
        >>> try:
        ...     check_version("2.7.0")
        ... except RecipeError as err:
        ...     print(str(err).split(";")[0])
        engineflow writes TensorBoard files with tensorboardX 2.6.2.2 up to, not including, 2.7
    """
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:4])
    low, high = VERIFIED
    if not low <= found < high:
        show = ".".join
        raise RecipeError(f"engineflow writes TensorBoard files with tensorboardX {show(map(str, low))} up to, not "
                          f"including, {show(map(str, high))}; tensorboardX {version} is installed. Install one of "
                          f"those: pip install 'tensorboardX>={show(map(str, low))},<{show(map(str, high))}'")


class EventFile:
    """One TensorBoard event file, written synchronously; errors name the file."""

    def __init__(self, folder: Path) -> None:
        import tensorboardX
        from tensorboardX.record_writer import RecordWriter

        check_version(tensorboardX.__version__)

        # the pid keeps apart two files opened in one second (a run resumed at once)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        with writing(self.path):
            folder.mkdir(parents=True, exist_ok=True)
            self._writer = RecordWriter(str(self.path))
        self._write_event(file_version="brain.Event:2")

    def scalar(self, tag: str, value: float, step: int | None) -> None:
        from tensorboardX.summary import scalar

        self.write(scalar(tag, value), step)

    def histogram(self, tag: str, values: Any, step: int | None) -> None:
        from tensorboardX.summary import histogram

        self.write(histogram(tag, values.detach().float().cpu().numpy(), "auto"), step)

    def histogram_bins(self, tag: str, edges: list[float], counts: list[int], step: int | None) -> None:
        """A histogram counted already: ``counts[i]`` values between ``edges[i]`` and ``edges[i + 1]``."""
        from tensorboardX.summary import histogram_raw

        filled = [i for i, count in enumerate(counts) if count] or [0]
        centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        total = sum(c * x for c, x in zip(counts, centres, strict=True))
        squares = sum(c * x * x for c, x in zip(counts, centres, strict=True))
        # TensorBoard's buckets name their right edges; an empty one ending at the first edge opens the range
        self.write(histogram_raw(tag, edges[filled[0]], edges[filled[-1] + 1], sum(counts), total, squares,
                                 edges, [0, *counts]), step)

    def write(self, summary: Any, step: int | None = None) -> None:
        """Append a ``Summary`` protocol buffer at ``step``."""
        self._write_event(summary=summary, **({} if step is None else {"step": int(step)}))

    def _write_event(self, **fields: Any) -> None:
        from tensorboardX.proto.event_pb2 import Event

        with writing(self.path):
            self._writer.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def flush(self) -> None:
        """Write what is buffered and fsync it."""
        with writing(self.path):
            self._writer.flush()

    def close(self) -> None:
        """Flush and close; the file is closed even when the flush fails (the error is raised)."""
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):  # a failed flush above raises; what the buffer held is lost either way
                self._writer.close()
