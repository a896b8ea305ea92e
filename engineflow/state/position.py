"""Where a fit is in its train data: each epoch reseeded from ``(seed, epoch)``, resumable mid-epoch.

A resume creates the epoch's iterator as a fresh run would, skips the batches already trained on
(loaders with their own ``state_dict``, like :class:`~engineflow.data.TensorLoader`, position
themselves instead), then restores the RNG states saved at the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from engineflow.errors import RecipeError
from engineflow.shards import Layout
from engineflow.state.components import is_stateful
from engineflow.state.resume import Position, ResumeRecord
from engineflow.state.rng import seed_epoch


class EpochData:
    """The train loader as the train engine sees it: reseeded per epoch, resumable mid-epoch.

    Args:
        loader: the recipe's train loader (any re-iterable with a length).
        seed: the run's seed.
        epoch: returns the epoch in progress (the engine's ``state.epoch``).
        rank: this process's rank (its global RNGs are seeded per rank, see :func:`seed_epoch`).
    """

    def __init__(self, loader: Iterable[Any], seed: int, epoch: Callable[[], int], rank: int = 0) -> None:
        self.loader = loader
        self.seed = seed
        self.rank = rank
        self.epoch = epoch
        self._skip = 0
        self._after_skip: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def positions_itself(self) -> bool:
        """True for loaders that save their own position (their ``state_dict`` is in checkpoints)."""
        return is_stateful(self.loader)

    def resume_at(self, batches_done: int, after_skip: Callable[[], None]) -> None:
        """Make the next pass skip ``batches_done`` batches, then call ``after_skip``."""
        self._skip = 0 if self.positions_itself else batches_done
        self._after_skip = after_skip

    def __iter__(self) -> Iterator[Any]:
        # Lazy: Ignite makes the next epoch's iterator early when an epoch ends by EndEpoch (inside
        # the old epoch), so seeding happens at the first batch, inside the epoch it serves.
        return _FirstBatchStarts(self._start)

    def _start(self) -> Iterator[Any]:
        seed_epoch(self.seed, self.epoch(), self.loader, self.rank)
        iterator = iter(self.loader)
        for _ in range(self._skip):
            next(iterator)
        self._skip = 0
        if self._after_skip is not None:
            after, self._after_skip = self._after_skip, None
            after()
        return iterator


class _FirstBatchStarts:
    """An iterator that makes the real one when the first batch is asked for."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start: Callable[[], Iterator[Any]] | None = start
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _FirstBatchStarts:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            assert self._start is not None  # set until the first call
            self._iterator, self._start = self._start(), None
        return next(self._iterator)


class EpochTracker:
    """Where a fit stands in its epochs, kept from its train engine's events (see :meth:`position`).

    Counted from the events, not from ``iteration % epoch_length``: after an ``EndEpoch`` the
    iteration is no longer a multiple of the epoch length at epoch boundaries, and an epoch resumed
    on another number of processes has a length of its own.

    Example:
        >>> from types import SimpleNamespace
        >>> tracker, engine = EpochTracker(), SimpleNamespace(state=SimpleNamespace(
        ...     iteration=0, epoch=1, epoch_length=4, max_epochs=2))
        >>> tracker.epoch_started(engine); engine.state.iteration = 3
        >>> tracker.position(engine.state)
        Position(iteration=3, epochs_completed=0, batches_in_epoch=3, epoch_length=4, max_epochs=2)
    """

    def __init__(self) -> None:
        self._epoch_start = 0  # the engine's iteration when the epoch in progress started
        self._epoch_done = False
        self._restored = False  # a resumed epoch started before the kill: its start is the restored one
        self._whole_epoch: int | None = None  # the length of the epochs after one resumed part-way
        self._loaded: Position | None = None  # restored, until its epoch goes on

    def position(self, state: Any) -> Position:
        """The position of an engine whose ``state`` this tracker follows."""
        if self._loaded is not None:
            return self._loaded
        if self._epoch_done:
            done, within = state.epoch, 0
        else:
            done, within = max(state.epoch - 1, 0), state.iteration - self._epoch_start
        return Position(state.iteration, done, within, state.epoch_length, state.max_epochs)

    def restore(self, position: Position, within: int, whole_epoch: int | None) -> None:
        """Continue from ``position``, ``within`` batches into its epoch here (0 at its end, or where the
        epoch goes on over the rest of its order); ``whole_epoch``: the epochs after it have this length."""
        self._epoch_start = position.iteration - within
        self._epoch_done = not position.mid_epoch
        self._restored = True
        self._whole_epoch = whole_epoch
        self._loaded = position

    def epoch_started(self, engine: Any) -> None:
        """EPOCH_STARTED, before every other handler."""
        self._epoch_done, self._loaded = False, None
        if self._restored:
            self._restored = False
            return
        self._epoch_start = engine.state.iteration
        if self._whole_epoch is not None:
            engine.state.epoch_length, self._whole_epoch = self._whole_epoch, None

    def epoch_completed(self, engine: Any) -> None:
        """EPOCH_COMPLETED, before every other handler."""
        self._epoch_done = True


@dataclass(frozen=True)
class ResumePlan:
    """How a fit continues from a record (see :func:`plan_resume`).

    Attributes:
        skip: batches of the resumed epoch to skip here (its remaining batches then train).
        start_at: where in the epoch's order the loader's next pass starts (None: at its start).
        moved: the epoch was saved part-way on another number of processes (it goes on over the
            positions of its order no process had trained on).
    """

    skip: int = 0
    start_at: int | None = None
    moved: bool = False


def plan_resume(record: ResumeRecord, here: Layout | None, world_size: int) -> ResumePlan:
    """How to continue from ``record`` with a train loader laid out as ``here`` (its order layout, None
    for a loader engineflow does not deal out) on ``world_size`` processes.

    At an epoch's end nothing of the data is left to place. Mid-epoch on the same number of processes
    the epoch's pass runs again and skips the batches done (bit-identical to never stopping); on
    another number, the pass goes on after the positions of the order the saved processes had trained
    on (:meth:`~engineflow.shards.Layout.consumed`), which needs a loader engineflow deals out itself.

    Raises:
        RecipeError: the epoch cannot continue here: another number of processes with a loader
            engineflow does not deal out, or other data.

    Example:
        >>> from dataclasses import replace
        >>> from engineflow.state.resume import Position, RankState, ResumeRecord
        >>> layout = Layout("tensor", samples=10, batch=2, world=2, offset=0, drop_last=False)
        >>> saved = ResumeRecord(position=Position(7, 1, 2), layout=layout, ranks=[RankState({}, {})] * 2)
        >>> plan_resume(saved, replace(layout, world=1), world_size=1)    # 2 steps of 2 ranks x 2 samples
        ResumePlan(skip=0, start_at=8, moved=True)
    """
    within, layout, saved_world = record.position.batches_in_epoch, record.layout, record.world_size
    if not within:
        return ResumePlan()
    moved = (layout.world if layout else saved_world) != (here.world if here is not None else world_size)
    if layout is None:
        if saved_world != world_size:
            raise RecipeError(f"the latest checkpoint was written in the middle of an epoch on {saved_world} "
                              f"process(es) by a train loader engineflow does not deal out itself; resume it on "
                              f"{saved_world} (--nproc {saved_world}), or give setup() a DataLoader with "
                              "shuffle=True or False or an ef.data.TensorLoader. A checkpoint at an epoch's end "
                              "resumes on any number")
        return ResumePlan(skip=within)
    if not moved:  # the same pass again (from where it started), then skip
        return ResumePlan(skip=within, start_at=layout.offset if layout.kind == "shard" else None)
    if here is None or not here.matches(layout):
        raise RecipeError(f"the latest checkpoint was written in the middle of an epoch whose train loader "
                          f"dealt out {layout.samples} samples in batches of {layout.batch}; this "
                          f"run's does not ({here.state_dict() if here is not None else None}). Resume with the "
                          f"same data, or on {saved_world} process(es) (--nproc {saved_world})")
    position = layout.consumed(within)
    if position >= layout.samples:
        raise RecipeError("the state was taken after its epoch's last batch, before the epoch completed; "
                          "take it at EPOCH_COMPLETED (engineflow's checkpoints are) to resume it on "
                          "another number of processes")
    return ResumePlan(start_at=position, moved=True)
