"""The train step's losses: checked every iteration, averaged per epoch, each under its own name.

A loss is an output named ``loss`` or ending in ``_loss`` (a GAN's ``g_loss`` and ``d_loss``). Each
is checked for NaN and inf every iteration and reported per epoch as ``train/<name>``, the plain mean
over the epoch's batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from engineflow.errors import NonFiniteLossError


def is_loss(name: str) -> bool:
    """Whether an output of the train step is a loss engineflow checks and averages.

    Example:
        >>> [is_loss(n) for n in ("loss", "g_loss", "lossy", "y_pred")]
        [True, True, False, False]
    """
    return name == "loss" or name.endswith("_loss")


class LossMonitor:
    """Checks the step's losses every iteration and averages each over the epoch.

    ``running`` is an exponential moving average of the main loss (``loss``, else the first loss the
    step returned) for the progress line; ``last`` its latest value.

    Example:
        >>> monitor = LossMonitor()
        >>> for out in ({"g_loss": 1.0, "d_loss": 3.0}, {"g_loss": 2.0, "d_loss": 5.0}):
        ...     monitor.observe(out, epoch=1, iteration=1)
        >>> monitor.epoch_means()
        {'train/g_loss': 1.5, 'train/d_loss': 4.0}
    """

    def __init__(self, alpha: float = 0.98, reduce: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None
                 ) -> None:
        self.alpha = alpha
        # on several processes: sums the epoch's totals and counts over the ranks (a collective)
        self.reduce = reduce
        self.running: float | None = None
        self.last: float | None = None
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._main: str | None = None

    def epoch_started(self, engine: Any) -> None:
        self.totals, self.counts = {}, {}

    def iteration_completed(self, engine: Any) -> None:
        output = engine.state.output
        if type(output) is dict:
            self.observe(output, epoch=engine.state.epoch, iteration=engine.state.iteration)

    def observe(self, output: Mapping[str, Any], *, epoch: int, iteration: int) -> None:
        """Check and count the losses of one step's output."""
        for name, loss in output.items():
            if loss is None or not is_loss(name):
                continue
            value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                raise NonFiniteLossError(value, epoch=epoch, iteration=iteration, name=name)
            self.totals[name] = self.totals.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
            if self._main is None or name == "loss":
                self._main = name
            if name == self._main:
                self.last = value
                self.running = value if self.running is None else self.alpha * self.running + (1 - self.alpha) * value

    def epoch_means(self) -> dict[str, float]:
        """``{"train/<name>": mean}`` of every loss seen this epoch."""
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
        return {"running": self.running, "totals": dict(self.totals), "counts": dict(self.counts), "main": self._main}

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
        self.running = state["running"]
        self._main = state.get("main", "loss" if state["running"] is not None else None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (older checkpoints' layouts are read as this one by
        :class:`~engineflow.state.resume.ResumeRecord`)."""
        self.running = state["running"]
        self.totals, self.counts, self._main = dict(state["totals"]), dict(state["counts"]), state["main"]
