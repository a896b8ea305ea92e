"""Early stopping: end a train stage (or the pipeline's training) when a metric stops improving.

A recipe declares it at its top level (a toolbox declaration, see :mod:`engineflow.declare.tools`)::

    stop = ef.early_stopping(patience=5, min_delta=0.0)                   # every train stage, one counter
    stop_finetune = ef.early_stopping(patience=3, stage="finetune")       # that stage alone

After each epoch's validation (order :data:`~engineflow.declare.orders.EARLY_STOPPING`, after
``history`` and ``best``), the metric (default: the stage's main metric) is compared with the best
value so far with :func:`engineflow.state.best.better` (NaN never improves); after ``patience``
epochs in a row without an improvement larger than ``min_delta``, the fit ends as with
:class:`~engineflow.declare.control.StopFit` (the epoch's other handlers, records and checkpoint
still run). One for a stage ends that stage and the next stage starts; one for every stage
(``stage=None``) keeps its counter and best across the stages (a stage whose metric differs starts
the best afresh) and, when it stops, the pipeline's later train stages are skipped while its test
and inference passes still run. Its state is in the fit's checkpoints, so a resumed run stops at
the same epoch. On several processes the metrics it reads are all-reduced, so every rank stops
at the same epoch.

Ignite's ``EarlyStopping`` is not used: a NaN score counts as an improvement there and becomes the
best, after which nothing compares lower and it never stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError
from engineflow.state.best import Best, better, infer_mode


@dataclass
class Stopped:
    """Why a fit ended before its epochs: ``by`` (the tool's name), at which ``epoch`` of the
    stage, and whether the pipeline's later train stages are skipped (``rest``); checkpointed."""

    by: str | None = None
    epoch: int | None = None
    rest: bool = False

    def note(self, by: str, epoch: int, *, rest: bool) -> None:
        self.by, self.epoch, self.rest = by, epoch, rest

    def as_dict(self) -> dict[str, Any] | None:
        """What a stage's summary records (None: not stopped)."""
        return None if self.by is None else {"by": self.by, "epoch": self.epoch, "rest": self.rest}

    def state_dict(self) -> dict[str, Any]:
        return {"by": self.by, "epoch": self.epoch, "rest": self.rest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.by, self.epoch, self.rest = state["by"], state["epoch"], state["rest"]


class Stoppable(Protocol):
    """What early stopping needs of a fit (:class:`~engineflow.execute.fit.Fit` is one)."""

    best: Best
    stopped: Stopped
    parts: dict[str, Any]

    def register(self, name: str, part: Any) -> None: ...


class EarlyStopping:
    """A toolbox declaration that ends training when a metric stops improving (see the module).

    Attributes:
        counter: epochs in a row without an improvement.
        best: the best value seen (of ``tracking``).
        tracking: the metric ``best`` is a value of.

    Example:
        >>> import engineflow as ef
        >>> stop = ef.EarlyStopping(patience=1, stage="finetune")  # what ef.early_stopping(...) returns
        >>> stop.update("valid/loss", 0.5, "min"), stop.update("valid/loss", 0.6, "min"), stop.counter
        (False, True, 1)
    """

    __engineflow_tool__ = True

    def __init__(self, patience: int, min_delta: float = 0.0, *, metric: str | None = None, mode: str | None = None,
                 stage: str | None = None, name: str = "early_stopping") -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise RecipeError(f"ef.early_stopping(patience=...) expects a whole number of epochs >= 1, "
                              f"got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise RecipeError(f"ef.early_stopping(min_delta=...) expects a number >= 0, got {min_delta!r}")
        if mode not in (None, "min", "max"):
            raise RecipeError(f"ef.early_stopping(mode=...) expects 'min' or 'max', got {mode!r}")
        if mode is not None and metric is None:
            raise RecipeError("ef.early_stopping(mode=...) goes with metric=...; the main metric has its own mode")
        self.patience, self.min_delta = patience, float(min_delta)
        self.metric, self.mode, self.stage, self.name = metric, mode, stage, name
        self.counter = 0
        self.best: float | None = None
        self.tracking: str | None = None

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, metric={self.metric!r}, "
                f"stage={self.stage!r}, counter={self.counter}, best={self.best})")

    def attach(self, fit: Stoppable) -> list[HandlerSpec]:
        """Keep its state, and the fit's :class:`Stopped`, in ``fit``'s checkpoints; its handler after
        each epoch's validation."""
        fit.register(self.name, self)
        if "stopped" not in fit.parts:  # a resume of a stage it stopped knows it stopped (and what it skips)
            fit.register("stopped", fit.stopped)
        metric = self.metric or fit.best.metric
        mode = self.mode or (fit.best.mode if metric == fit.best.metric else infer_mode(metric))

        def check(engine: Any) -> None:
            metrics = engine.state.metrics
            if metric not in metrics:
                validated = sorted(k for k in metrics if not k.startswith("train/"))
                if validated:  # the epoch was validated, without this metric: a typo, not a skipped epoch
                    raise RecipeError(f"ef.early_stopping {self.name!r} watches {metric!r}, which the epoch's "
                                      f"metrics do not have ({', '.join(validated)}); pick one with metric=...")
                return  # no validation this epoch (eval every n epochs): nothing to count
            if self.update(metric, float(metrics[metric]), mode):
                fit.stopped.note(self.name, engine.state.epoch, rest=self.stage is None)
                # as a StopFit raised by a recipe's handler: the epoch's later handlers (records, the
                # checkpoint, the log line) still run; a raw handler's exception would skip them
                engine.stop_fit()

        return [HandlerSpec(check, Events.EPOCH_COMPLETED, "train", orders.EARLY_STOPPING, seq=-1, raw=True)]

    def update(self, metric: str, value: float, mode: str) -> bool:
        """Count one epoch's ``value``; True when training should stop.

        Example:
            >>> stop = EarlyStopping(patience=2, min_delta=0.1)
            >>> [stop.update("valid/accuracy", v, "max") for v in (0.5, 0.55, 0.7, 0.75, float("nan"))]
            [False, False, False, False, True]
        """
        if metric != self.tracking:  # another stage's metric: its values do not compare with this one's
            self.tracking, self.best = metric, None
        shift = self.min_delta if mode == "max" else -self.min_delta
        if better(value, None if self.best is None else self.best + shift, mode):
            self.best, self.counter = value, 0
            return False
        self.counter += 1
        return self.counter >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "best": self.best, "tracking": self.tracking}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter, self.best, self.tracking = state["counter"], state["best"], state["tracking"]


def early_stopping(patience: int, min_delta: float = 0.0, *, metric: str | None = None, mode: str | None = None,
                   stage: str | None = None, name: str = "early_stopping") -> EarlyStopping:
    """Declare early stopping (assign it at a recipe's top level): stop after ``patience`` epochs
    without the metric improving by more than ``min_delta``.

    Args:
        patience: epochs in a row without an improvement before stopping.
        min_delta: how much better than the best a value must be to count as an improvement.
        metric: the metric to watch (default: the stage's main metric), e.g. ``"valid/loss"``.
        mode: ``"min"`` or ``"max"`` for ``metric`` (default: from its name, as for the main metric).
        stage: the one stage it acts in; None: every train stage, one counter across them, and its
            stop skips the later train stages.
        name: its key in the checkpoints (two need two names).

    Example:
        >>> import engineflow as ef
        >>> stop = ef.early_stopping(patience=5, min_delta=0.001)
        >>> stop.patience, stop.stage, stop.counter
        (5, None, 0)
    """
    return EarlyStopping(patience, min_delta, metric=metric, mode=mode, stage=stage, name=name)
