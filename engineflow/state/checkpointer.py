"""When to checkpoint, what goes in, and how a fit continues from one.

A recipe declares its policy with a top-level value (default: every epoch, keep the last 2 and
the best 1)::

    checkpoints = ef.checkpoints(every_epochs=1, every_iterations=500, every_seconds=600,
                                 keep_last=3, keep_best=1)

``engineflow run --checkpoint-every N`` replaces the recipe's policy with "every N iterations".
A clean interrupt (SIGINT or SIGTERM) always writes one at the end of the current iteration
before the run exits with code 130; a second signal stops at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ignite.engine import Events

from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError
from engineflow.state.checkpoint_files import (
    UnsafeCheckpointError,
    checkpoint_files,
    load_latest,
    load_state,
    prune,
    ranked_by_score,
    save_checkpoint,
)
from engineflow.state.components import stateful_components
from engineflow.state.rng import rng_state, set_rng_state

FORMAT = 1


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often full-state checkpoints are written and how many are kept.

    Attributes:
        every_epochs: after every N-th epoch (None: not by epochs).
        every_iterations: after every N-th iteration (None: not by iterations).
        every_seconds: when this many seconds passed since the last one (None: not by time).
        keep_last: how many of the newest to keep.
        keep_best: how many of the best epochs (by the main metric) to keep as well.
    """

    every_epochs: int | None = 1
    every_iterations: int | None = None
    every_seconds: float | None = None
    keep_last: int = 2
    keep_best: int = 1


def checkpoints(
    *,
    every_epochs: int | None = 1,
    every_iterations: int | None = None,
    every_seconds: float | None = None,
    keep_last: int = 2,
    keep_best: int = 1,
) -> CheckpointPolicy:
    """Declare a recipe's checkpoint policy (assign it to a top-level ``checkpoints``).

    Example:
        >>> checkpoints(every_iterations=100, keep_last=3).every_iterations
        100
    """
    for name, value in (("every_epochs", every_epochs), ("every_iterations", every_iterations)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"checkpoints({name}=...) expects a whole number >= 1 or None, got {value!r}")
    if every_seconds is not None and (not isinstance(every_seconds, (int, float)) or every_seconds <= 0):
        raise RecipeError(f"checkpoints(every_seconds=...) expects a positive number or None, got {every_seconds!r}")
    for name, value in (("keep_last", keep_last), ("keep_best", keep_best)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RecipeError(f"checkpoints({name}=...) expects a whole number >= 0, got {value!r}")
    if keep_last < 1:
        raise RecipeError("checkpoints(keep_last=...) must keep at least 1, or a run could not resume")
    return CheckpointPolicy(every_epochs, every_iterations, every_seconds, keep_last, keep_best)


def policy_of(recipe: Any) -> CheckpointPolicy:
    """The recipe's ``checkpoints = ef.checkpoints(...)``, or the default policy."""
    policy = getattr(recipe.module, "checkpoints", None)
    if policy is None:
        return CheckpointPolicy()
    if not isinstance(policy, CheckpointPolicy):
        raise RecipeError(f"{recipe.path}: 'checkpoints' must be ef.checkpoints(...), got {type(policy).__name__}")
    return policy


def every_iterations_policy(base: CheckpointPolicy, n: int) -> CheckpointPolicy:
    """``--checkpoint-every N``: the recipe's policy replaced by "every N iterations"."""
    return replace(base, every_epochs=None, every_iterations=n, every_seconds=None)


class Checkpointer:
    """Writes and restores the full state of a :class:`~engineflow.execute.fit.Fit`.

    Args:
        folder: where ``state-<iteration>.pt`` files go.
        policy: when to write them.
        fit: the fit whose state they hold.
        run_id: recorded in each file.
        warn: how to report a damaged checkpoint (a line on the run's output).
    """

    def __init__(self, folder: Path, policy: CheckpointPolicy, fit: Any, run_id: str,
                 warn: Callable[[str], None]) -> None:
        self.folder = folder
        self.policy = policy
        self.fit = fit
        self.run_id = run_id
        self.warn = warn
        self.interrupt_requested = False
        self._last_time = time.monotonic()
        self._scores: dict[Path, float] = {}  # epoch-end checkpoints by main-metric value
        self._epoch_start = 0  # the iteration count when the epoch in progress started
        self._in_epoch_completed = False
        self._restored = False
        self._load_checked = False

    # what goes in -------------------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        """Where the fit stands: epochs completed and batches done in the epoch in progress.

        Counted from the events, not from ``iteration % epoch_length``: after an ``EndEpoch`` the
        iteration is no longer a multiple of the epoch length at epoch boundaries.
        """
        state = self.fit.train.state
        if self._in_epoch_completed:
            return {"epochs_completed": state.epoch, "batches_in_epoch": 0}
        return {"epochs_completed": state.epoch - 1, "batches_in_epoch": state.iteration - self._epoch_start}

    def state(self, reason: str, best_files: dict[str, float]) -> dict[str, Any]:
        fit, engine = self.fit, self.fit.train
        components = {name: obj.state_dict() for name, obj in stateful_components(fit.components).items()}
        metrics = {}
        for name, metric in fit.train_metrics.items():
            try:
                metrics[name] = metric.state_dict()
            except (NotImplementedError, AttributeError):
                metrics[name] = None
        return {
            "format": FORMAT, "run_id": self.run_id, "reason": reason, "saved_at": time.time(),
            "engine": {"iteration": engine.state.iteration, "epoch_length": engine.state.epoch_length,
                       "max_epochs": engine.state.max_epochs, **self.position()},
            "components": components, "train_metrics": metrics, "loss": fit.loss.state_dict(),
            "best": fit.best.state_dict(), "history": list(fit.history), "rng": rng_state(), "seed": fit.seed,
            "best_checkpoints": best_files,
        }

    def save(self, reason: str) -> Path:
        engine = self.fit.train
        path = self.folder / f"state-{engine.state.iteration:09d}.pt"
        best = self.fit.best
        if self._in_epoch_completed and best.value is not None and best.epoch == engine.state.epoch:
            self._scores[path] = best.value
        # The scores travel in every file, so keep_best survives a resume.
        save_checkpoint(self.folder, path.name, self.state(reason, {p.name: v for p, v in self._scores.items()}))
        if not self._load_checked:
            self._check_loads(path)
        self._last_time = time.monotonic()
        self._prune()
        return path

    def _check_loads(self, path: Path) -> None:
        """Stop at the first checkpoint if a resume could not read it back.

        Checkpoints are loaded with ``weights_only=True``: a component whose ``state_dict`` holds
        an object of its own class would otherwise be found out only when the run resumes, or when
        it ends and exports best.pt. The tensor data is mapped, not read, so this costs little.
        """
        self._load_checked = True
        try:
            load_state(path, mmap=True)
        except UnsafeCheckpointError as err:
            raise RecipeError(
                f"the checkpoint {path.name} holds {err.found}, which engineflow does not load back (it loads "
                "tensors, numbers, strings, and lists, tuples and dicts of them): a resume would refuse it. Make "
                "every component's state_dict() return only such values, or, if the type is yours and safe, "
                "allow it with torch.serialization.add_safe_globals before the run."
            ) from None

    def _prune(self) -> None:
        files = checkpoint_files(self.folder)
        keep = set(files[-self.policy.keep_last:])
        keep.update(self._ranked_best()[: self.policy.keep_best])
        prune(self.folder, keep)

    def _ranked_best(self) -> list[Path]:
        return [p for p in ranked_by_score(self._scores, self.fit.best.mode) if p.exists()]

    def best_file(self) -> Path | None:
        """The kept checkpoint of the best epoch (by the main metric), or None (``keep_best=0``)."""
        ranked = self._ranked_best() if self.policy.keep_best else []
        return ranked[0] if ranked else None

    # when ---------------------------------------------------------------------------------------
    def handlers(self, fit: Any) -> list[HandlerSpec]:
        """Handlers on the train engine; order 950 puts them after the history and the records."""

        def epoch_started(engine: Any) -> None:
            if self._restored:  # the resumed epoch started before the kill, at the restored count
                self._restored = False
            else:
                self._epoch_start = engine.state.iteration

        def iteration_completed(engine: Any) -> None:
            state = engine.state
            # At an epoch's last batch the checkpoint (and an interrupt) waits for EPOCH_COMPLETED,
            # so the epoch is validated and recorded first.
            if state.epoch_length and state.iteration - self._epoch_start >= state.epoch_length:
                return
            if self.interrupt_requested:
                self.save("interrupt")
                raise KeyboardInterrupt("checkpoint written")
            if self._iterations_due(state.iteration) or self._time_due():
                self.save("iterations")

        def epoch_completed(engine: Any) -> None:
            policy, state = self.policy, engine.state
            due = policy.every_epochs is not None and state.epoch % policy.every_epochs == 0
            due = due or self._iterations_due(state.iteration) or self._time_due()
            improved = policy.keep_best > 0 and fit.best.epoch == state.epoch
            if due or improved or self.interrupt_requested:
                self._in_epoch_completed = True
                try:
                    self.save("interrupt" if self.interrupt_requested else "epoch")
                finally:
                    self._in_epoch_completed = False
            if self.interrupt_requested:
                raise KeyboardInterrupt("checkpoint written")

        return [HandlerSpec(epoch_started, Events.EPOCH_STARTED, "train", -2000, -1, raw=True),
                HandlerSpec(iteration_completed, Events.ITERATION_COMPLETED, "train", 950, -1, raw=True),
                HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", 950, -1, raw=True)]

    def _iterations_due(self, iteration: int) -> bool:
        every = self.policy.every_iterations
        return every is not None and iteration % every == 0

    def _time_due(self) -> bool:
        every = self.policy.every_seconds
        return every is not None and time.monotonic() - self._last_time >= every

    # how a fit continues --------------------------------------------------------------------------
    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest valid checkpoint (damaged ones are reported and skipped), or None."""
        return load_latest(self.folder, self.warn)

    def restore(self, state: dict[str, Any]) -> Callable[[], None]:
        """Load ``state`` into the fit; returns what to restore once the epoch's data is positioned."""
        fit = self.fit
        if state.get("format") != FORMAT:
            raise RecipeError(f"checkpoint format {state.get('format')!r} is not one this engineflow reads")
        saved = state["components"]
        for name, obj in stateful_components(fit.components).items():
            if name not in saved:
                raise RecipeError(f"the checkpoint has no state for component {name!r} (it holds "
                                  f"{', '.join(saved)}); did setup() change since the run started?")
            obj.load_state_dict(saved[name])
        fit.best.load_state_dict(state["best"])
        fit.history[:] = state["history"]
        engine = state["engine"]
        fit.train.load_state_dict({"iteration": engine["iteration"], "epoch_length": engine["epoch_length"],
                                   "max_epochs": engine["max_epochs"]})
        # Ignite derives the epoch and the batches done from iteration // epoch_length, which an
        # EndEpoch makes wrong; set both from the counts the checkpoint kept (the first epoch then
        # runs only the remaining batches, as in Ignite's own mid-epoch resume).
        fit.train.state.epoch = engine["epochs_completed"]
        fit.train.start_epoch_after(engine["batches_in_epoch"])
        self._epoch_start = engine["iteration"] - engine["batches_in_epoch"]
        self._restored = True
        self._scores = {self.folder / name: value for name, value in state.get("best_checkpoints", {}).items()}

        def within_epoch() -> None:
            fit.loss.load_state_dict(state["loss"])
            for name, metric_state in state["train_metrics"].items():
                if metric_state is not None:
                    fit.train_metrics[name].load_state_dict(metric_state)
            set_rng_state(state["rng"])

        return within_epoch
