"""Where a fit is in its train data: each epoch reseeded from ``(seed, epoch)``, resumable mid-epoch.

A resume creates the epoch's iterator as a fresh run would, skips the batches already trained on
(loaders with their own ``state_dict``, like :class:`~engineflow.data.TensorLoader`, position
themselves instead), then restores the RNG states saved at the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engineflow.state.components import is_stateful
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
