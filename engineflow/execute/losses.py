"""The train step's losses: checked for every iteration, averaged per epoch, each under its own name.

A loss is an output named ``loss`` or ending in ``_loss`` (a GAN's ``g_loss`` and ``d_loss``). Each
is checked for NaN and inf and reported per epoch as ``train/<name>``, the plain mean over the
epoch's batches.

A loss on the CPU is read at once, every iteration. A loss on an accelerator is only kept (a
reference, no kernel, no copy) and read back with one copy every :data:`READ_EVERY` iterations, and
before anything reads or saves the sums (the epoch's end, a checkpoint, the progress line): reading
it each step would make the host wait for the device every step. The values are then checked and
summed in iteration order exactly as if each had been read at once, so the means, the running loss
and the iteration an error names are the same either way; only the moment the error is raised comes
up to ``READ_EVERY - 1`` iterations later, and never after a checkpoint of a later iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from engineflow.errors import NonFiniteLossError

READ_EVERY = 16  # a loss on an accelerator is read back every this many iterations (see the module's docstring)


def is_loss(name: str) -> bool:
    """Whether an output of the train step is a loss engineflow checks and averages.

    Example:
        >>> [is_loss(n) for n in ("loss", "g_loss", "lossy", "y_pred")]
        [True, True, False, False]
    """
    return name == "loss" or name.endswith("_loss")


class _Seen(NamedTuple):
    """One loss of one iteration, not read back yet."""

    epoch: int
    iteration: int
    name: str
    value: torch.Tensor


class LossMonitor:
    """Checks the step's losses every iteration and averages each over the epoch.

    ``running`` is an exponential moving average of the main loss (``loss``, else the first loss the
    step returned) for the progress line; ``last`` its latest value. ``read_every``: read losses on
    an accelerator back every this many iterations (None: :data:`READ_EVERY`; a loss on the CPU is
    read at once unless it is given).

    Example:
        >>> monitor = LossMonitor()
        >>> for out in ({"g_loss": 1.0, "d_loss": 3.0}, {"g_loss": 2.0, "d_loss": 5.0}):
        ...     monitor.observe(out, epoch=1, iteration=1)
        >>> monitor.epoch_means()
        {'train/g_loss': 1.5, 'train/d_loss': 4.0}
    """

    def __init__(self, alpha: float = 0.98, reduce: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
                 *, read_every: int | None = None) -> None:
        self.alpha = alpha
        # on several processes: sums the epoch's totals and counts over the ranks (a collective)
        self.reduce = reduce
        self.read_every = read_every
        self._running: float | None = None
        self._last: float | None = None
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._main: str | None = None
        self._pending: list[_Seen] = []  # losses kept on their device, in the order the steps gave them
        self._pending_steps = 0

    @property
    def running(self) -> float | None:
        """The running average of the main loss (reads back the losses kept on the device)."""
        self.read_back()
        return self._running

    @property
    def last(self) -> float | None:
        """The main loss of the latest iteration (reads back the losses kept on the device)."""
        self.read_back()
        return self._last

    def epoch_started(self, engine: Any) -> None:
        self.read_back()
        self.totals, self.counts = {}, {}

    def iteration_completed(self, engine: Any) -> None:
        output = engine.state.output
        if type(output) is dict:
            self.observe(output, epoch=engine.state.epoch, iteration=engine.state.iteration)

    def observe(self, output: Mapping[str, Any], *, epoch: int, iteration: int) -> None:
        """Check and count the losses of one step's output (those on an accelerator: see the module)."""
        kept = False
        for name, loss in output.items():
            if loss is None or not is_loss(name):
                continue
            if isinstance(loss, torch.Tensor) and (self.read_every is not None or loss.device.type != "cpu"):
                # no .item() here: it would make the host wait for the device at every step
                self._pending.append(_Seen(epoch, iteration, name, loss.detach().reshape(())))
                kept = True
                continue
            self._count(name, loss.item() if isinstance(loss, torch.Tensor) else float(loss), epoch, iteration)
        if kept:
            self._pending_steps += 1
            if self._pending_steps >= (self.read_every or READ_EVERY):
                self.read_back()

    def read_back(self) -> None:
        """Read the losses kept on the device (one copy), then check and count them in order."""
        pending, self._pending, self._pending_steps = self._pending, [], 0
        if not pending:
            return
        values = torch.stack([seen.value.to(pending[0].value.device, torch.float64) for seen in pending]).tolist()
        for seen, value in zip(pending, values, strict=True):
            self._count(seen.name, value, seen.epoch, seen.iteration)

    def _count(self, name: str, value: float, epoch: int, iteration: int) -> None:
        if not math.isfinite(value):
            self._pending, self._pending_steps = [], 0  # what came after it is not counted either
            raise NonFiniteLossError(value, epoch=epoch, iteration=iteration, name=name)
        self.totals[name] = self.totals.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1
        if self._main is None or name == "loss":
            self._main = name
        if name == self._main:
            self._last = value
            self._running = value if self._running is None else \
                self.alpha * self._running + (1 - self.alpha) * value

    def epoch_means(self) -> dict[str, float]:
        """``{"train/<name>": mean}`` of every loss seen this epoch."""
        self.read_back()
        totals, counts = self.totals, self.counts
        if self.reduce is not None:
            summed = self.reduce({**{f"total/{k}": v for k, v in totals.items()},
                                  **{f"count/{k}": float(v) for k, v in counts.items()}})
            totals = {k: summed[f"total/{k}"] for k in totals}
            counts = {k: int(summed[f"count/{k}"]) for k in counts}
        return {f"train/{name}": totals[name] / counts[name] for name in totals if counts[name]}

    def epoch_completed(self, engine: Any) -> None:
        engine.state.metrics.update(self.epoch_means())

    def state_dict(self) -> dict[str, Any]:
        """The sums and the running loss, once every loss kept on the device is read back and checked:
        a checkpoint never holds a state after a NaN or inf loss."""
        self.read_back()
        return {"running": self._running, "totals": dict(self.totals), "counts": dict(self.counts), "main": self._main}

    @staticmethod
    def regrouped(states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        """The state of ``rank`` when an epoch saved by ``len(states)`` ranks resumes on another number:
        rank 0 takes the sums of every saved rank's totals and counts, the others zeros for the same
        losses (so every rank sums the same keys, and the epoch's mean covers every saved batch)."""
        first = states[0]
        totals = {k: sum(s["totals"].get(k, 0.0) for s in states) if rank == 0 else 0.0 for k in first["totals"]}
        counts = {k: sum(s["counts"].get(k, 0) for s in states) if rank == 0 else 0 for k in first["counts"]}
        return {"running": first["running"], "totals": totals, "counts": counts, "main": first["main"]}

    def load_running(self, state: Mapping[str, Any]) -> None:
        """Only the running average and the loss it follows (a :meth:`state_dict`): what goes on from
        one epoch to the next, while the epoch's sums start anew."""
        self._pending, self._pending_steps = [], 0
        self._running = state["running"]
        self._main = state.get("main", "loss" if state["running"] is not None else None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (older checkpoints' layouts are read as this one by
        :class:`~engineflow.state.resume.ResumeRecord`)."""
        self._pending, self._pending_steps = [], 0
        self._running = state["running"]
        self.totals, self.counts, self._main = dict(state["totals"]), dict(state["counts"]), state["main"]
