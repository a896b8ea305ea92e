"""When to checkpoint, what goes in, and how a fit continues from one.

A recipe declares its policy with a top-level value (default: every epoch, keep the last 2 and
the best 1)::

    checkpoints = ef.checkpoints(every_epochs=1, every_iterations=500, every_seconds=600,
                                 keep_last=3, keep_best=1)

``engineflow run --checkpoint-every N`` replaces the recipe's policy with "every N iterations".
A clean interrupt (SIGINT or SIGTERM) always writes one at the end of the current iteration
before the run exits with code 130; a second signal stops at once. A spent time limit
(``--time-limit``, ``deadline``) takes the same path and ends as
:class:`~engineflow.errors.TimeLimitReached` (exit 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError, TimeLimitReached
from engineflow.state.best import Best, ranked
from engineflow.state.checkpoint_files import (
    UnsafeCheckpointError,
    checkpoint_files,
    load_latest,
    load_state,
    make_durable,
    prune,
    save_checkpoint,
)
from engineflow.state.resume import STAGE_END, BestFiles, Position, ResumeRecord, StageInfo
from engineflow.state.writer import CheckpointWriter

# On several processes the ranks agree on interrupts, the clock and the time limit every this many
# iterations (and at every epoch's end), in one all-reduce: a collective per iteration would cost
# more than it saves.
AGREE_EVERY = 8


class Resumable(Protocol):
    """What the checkpointer needs of a fit (:class:`~engineflow.execute.fit.Fit` is one)."""

    stage: StageInfo
    best: Best

    def resume_position(self) -> Position: ...

    def resume_record(self) -> ResumeRecord: ...


class Staged(Protocol):
    """What the checkpointer needs of a pipeline at a stage's boundaries."""

    @property
    def staged(self) -> bool: ...

    @property
    def fit(self) -> Resumable | None: ...


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often full-state checkpoints are written and how many are kept.

    Attributes:
        every_epochs: after every N-th epoch (None: not by epochs).
        every_iterations: after every N-th iteration (None: not by iterations).
        every_seconds: when this many seconds passed since the last one (None: not by time).
        keep_last: how many of the newest to keep.
        keep_best: how many of the best epochs (by the main metric) to keep as well.

    A recipe declares one with :func:`checkpoints` (``checkpoints = ef.checkpoints(...)``).

    Example:
        >>> import engineflow as ef
        >>> ef.CheckpointPolicy()  # what a recipe without a checkpoints declaration gets
        CheckpointPolicy(every_epochs=1, every_iterations=None, every_seconds=None, keep_last=2, keep_best=1)
        >>> policy = ef.checkpoints(every_epochs=None, every_seconds=600, keep_last=3)
        >>> isinstance(policy, ef.CheckpointPolicy), policy.every_seconds, policy.keep_last
        (True, 600, 3)
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
    """Writes the full state of a fit (its ``state_dict``) as the policy asks, and keeps the best.

    Args:
        folder: where ``state-<iteration>.pt`` files go.
        policy: when to write them.
        run_id: recorded in each file.
        warn: how to report a damaged checkpoint (a line on the run's output).

    :meth:`handlers` attaches it to a fit (a :class:`Resumable`).
    """

    def __init__(self, folder: Path, policy: CheckpointPolicy, run_id: str, warn: Callable[[str], None], *,
                 writes: bool = True, agree: Callable[[list[int]], list[int]] | None = None,
                 deadline: Callable[[], bool] | None = None) -> None:
        self.folder = folder
        self.policy = policy
        self.run_id = run_id
        self.warn = warn
        # On several processes every rank takes part in each checkpoint (its own state is gathered)
        # and only rank 0 writes. ``agree`` (the maximum of each flag over the ranks, a collective)
        # makes the decisions that differ between ranks (an interrupt, the clock) the same on all.
        self.writes = writes
        self.agree = agree
        # whether the run's time limit is spent (rank 0's clock; False on the other ranks)
        self.deadline = deadline
        self.fit: Resumable | None = None
        self.interrupt_requested = False
        self._last_time = time.monotonic()
        self._score_mode: str | None = None
        self._scores: dict[Path, float] = {}  # epoch-end checkpoints by main-metric value
        self._score_stage = 0  # the pipeline stage whose epochs _scores ranks (a stage's best is its own)
        self._load_checked = False
        self._writer = CheckpointWriter()  # files are written off the training thread, one at a time

    # what goes in -------------------------------------------------------------------------------
    def record(self, reason: str) -> ResumeRecord:
        """A checkpoint's content: the fit's record, and which files hold the best epochs (so that
        ``keep_best`` survives a resume). ``reason`` "stage-end" marks its stage finished."""
        files = BestFiles({p.name: v for p, v in self._scores.items()}, self._score_stage, self._score_mode)
        return self._fit().resume_record().with_reason(reason, run_id=self.run_id, saved_at=time.time(),
                                                        best_files=files)

    def save(self, reason: str, *, also: Path | None = None) -> Path:
        """Write a checkpoint now (and the same state to ``also``, when given); returns its path.

        The files are in place when it returns (a process killed after it resumes from them); a
        background thread then fsyncs them and prunes the files they made old
        (:mod:`engineflow.state.writer`) while the next step runs; the end of that step waits for it and
        raises its failure.
        """
        fit = self._fit()
        position, stage, best = fit.resume_position(), fit.stage, fit.best
        # numbered by the pipeline's iteration: a later stage's files sort after an earlier one's
        path = self.folder / f"state-{stage.iterations_before + position.iteration:09d}.pt"
        if not position.mid_epoch and best.value is not None and best.epoch == position.epochs_completed:
            if stage.index != self._score_stage:  # the run's best is now this stage's: earlier ones may go
                self._scores.clear()
                self._score_stage = stage.index
            self._scores[path] = best.value
            self._score_mode = best.mode
        state = self.record(reason).to_dict()
        if not self.writes:
            return path
        self._writer.wait()  # the previous checkpoint is durable (and its failure raised) first
        written = [save_checkpoint(self.folder, path.name, state, durable=False)]
        if also is not None:
            written.append(save_checkpoint(also.parent, also.name, state, durable=False))
        if not self._load_checked:
            self._load_checked = True
            self._check_loads(path)
        scores, mode = dict(self._scores), self._score_mode or best.mode

        def settle() -> None:
            make_durable(written)
            self._prune(scores, mode)  # only once the newest is durable: a crash always leaves one

        self._writer.submit(settle)
        self._last_time = time.monotonic()
        return path

    def _fit(self) -> Resumable:
        if self.fit is None:
            raise RuntimeError("Checkpointer.handlers(fit) attaches it to a fit before it saves")
        return self.fit

    def wait(self) -> None:
        """Wait until the checkpoints saved so far are on disk; raise a failed write's error (once)."""
        self._writer.wait()

    def close(self) -> BaseException | None:
        """:meth:`wait`, for a run that is ending: a failed write's error not raised yet is returned
        instead (the run may be ending with an error of its own)."""
        return self._writer.close()

    def _check_loads(self, path: Path) -> None:
        """Stop at the first checkpoint if a resume could not read it back.

        Checkpoints are loaded with ``weights_only=True``: a component whose ``state_dict`` holds
        an object of its own class would otherwise be found out only when the run resumes, or when
        it ends and exports best.pt. The tensor data is mapped, not read, so this costs little.
        """
        try:
            load_state(path, mmap=True)
        except UnsafeCheckpointError as err:
            raise RecipeError(
                f"the checkpoint {path.name} holds {err.found}, which engineflow does not load back (it loads "
                "tensors, numbers, strings, and lists, tuples and dicts of them): a resume would refuse it. Make "
                "every component's state_dict() return only such values, or, if the type is yours and safe, "
                "allow it with torch.serialization.add_safe_globals before the run."
            ) from None

    def _prune(self, scores: Mapping[Path, float], mode: str) -> None:
        """Delete the files the policy no longer keeps (``scores``, ``mode``: the best epochs' files
        as they were ranked when the newest was saved)."""
        files = checkpoint_files(self.folder)
        keep = set(files[-self.policy.keep_last:])
        keep.update(_existing_best_first(scores, mode)[: self.policy.keep_best])
        prune(self.folder, keep)

    def _ranked_best(self) -> list[Path]:
        mode = self._score_mode or (self.fit.best.mode if self.fit is not None else "max")
        return _existing_best_first(self._scores, mode)

    def stage_started(self, pipeline: Staged) -> None:
        """An interrupt (or a spent time limit) that came during a test or inference pass stops the
        run before the next stage."""
        if pipeline.staged:
            self._stop_between_stages()

    def _stop_between_stages(self) -> None:
        interrupt, _, limit = self._requests(True)  # every rank agrees (a collective on several)
        if interrupt:
            raise KeyboardInterrupt("the latest checkpoint is from before this stage")
        if limit:
            raise TimeLimitReached("the time limit is spent; the latest checkpoint is from before this stage")

    def stage_completed(self, pipeline: Staged, summary: Any) -> None:
        """At the end of each train stage of a pipeline: a checkpoint marked finished (a resume
        goes on with the next stage), also kept as ``stages/<name>.pt``, the state the next stage
        starts from (``engineflow run --stage NEXT --from RUN``)."""
        if not pipeline.staged or pipeline.fit is None:
            if pipeline.staged:  # a test or inference pass: a resume runs it again
                self._stop_between_stages()
            return
        self.save(STAGE_END, also=self.folder.parent / "stages" / f"{pipeline.fit.stage.name}.pt")

    def best_file(self) -> Path | None:
        """The kept checkpoint of the best epoch (by the main metric), or None (``keep_best=0``)."""
        files = self._ranked_best() if self.policy.keep_best else []
        return files[0] if files else None

    # when ---------------------------------------------------------------------------------------
    def handlers(self, fit: Resumable) -> list[HandlerSpec]:
        """Attach to ``fit``: handlers on its train engine, at order 950, after the history and the records."""
        self.fit = fit

        def iteration_completed(engine: Any) -> None:
            # the fsyncs (and pruning) of the last checkpoint overlap one step: done, or waited for, by its end
            self._writer.wait()
            state = engine.state
            # At an epoch's last batch the checkpoint (and an interrupt) waits for EPOCH_COMPLETED,
            # so the epoch is validated and recorded first.
            if state.epoch_length and fit.resume_position().batches_in_epoch >= state.epoch_length:
                return
            interrupt, timed, limit = self._requests(state.iteration % AGREE_EVERY == 0)
            if interrupt or limit:
                self._stop(interrupt)
            if self._iterations_due(state.iteration) or timed:
                self.save("iterations")

        def epoch_completed(engine: Any) -> None:
            policy, state = self.policy, engine.state
            interrupt, timed, limit = self._requests(True)
            if interrupt or limit:
                self._stop(interrupt)
            due = policy.every_epochs is not None and state.epoch % policy.every_epochs == 0
            due = due or self._iterations_due(state.iteration) or timed
            improved = policy.keep_best > 0 and fit.best.epoch == state.epoch
            if due or improved:
                self.save("epoch")

        return [HandlerSpec(iteration_completed, Events.ITERATION_COMPLETED, "train", orders.CHECKPOINT, -1, raw=True),
                HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", orders.CHECKPOINT, -1, raw=True)]

    def _stop(self, interrupt: bool) -> None:
        """Write the checkpoint of an interrupt (or of a spent time limit), wait until it is on disk, stop."""
        self.save("interrupt" if interrupt else "time-limit")
        self.wait()
        if interrupt:
            raise KeyboardInterrupt("checkpoint written")
        raise TimeLimitReached("the time limit is spent; checkpoint written")

    def _requests(self, agreeing: bool) -> tuple[bool, bool, bool]:
        """(interrupt requested, checkpoint due by the clock, time limit spent); on several
        processes, as the ranks agree at iterations where ``agreeing`` (else none: the next
        agreement acts on them), so every rank stops at the same iteration."""
        interrupt, timed = self.interrupt_requested, self._time_due()
        limit = self.deadline is not None and self.deadline()
        if self.agree is None:
            return interrupt, timed, limit
        if not agreeing:
            return False, False, False
        interrupt, timed, limit = (bool(flag) for flag in self.agree([int(interrupt), int(timed), int(limit)]))
        return interrupt, timed, limit

    def _iterations_due(self, iteration: int) -> bool:
        every = self.policy.every_iterations
        return every is not None and iteration % every == 0

    def _time_due(self) -> bool:
        every = self.policy.every_seconds
        return every is not None and time.monotonic() - self._last_time >= every

    # how a fit continues --------------------------------------------------------------------------
    def latest(self) -> tuple[Path, ResumeRecord] | None:
        """The newest valid checkpoint and its record (damaged ones are reported and skipped), or None."""
        self.wait()
        found = load_latest(self.folder, self.warn)
        return (found[0], ResumeRecord.from_dict(found[1])) if found is not None else None

    def load_state_dict(self, record: ResumeRecord) -> None:
        """Continue from a checkpoint's record: take its record of the best files.

        The fit's own part is the fit's to load (``fit.load_state_dict(record)``).
        """
        files = record.best_files
        self._scores = {self.folder / name: value for name, value in files.scores.items()}
        self._score_stage = files.stage
        self._score_mode = record.best_mode


def _existing_best_first(scores: Mapping[Path, float], mode: str) -> list[Path]:
    """The files of ``scores`` that still exist, best epoch first (``mode``: "max" or "min")."""
    return [path for path in ranked(scores, mode) if path.exists()]
