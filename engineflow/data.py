"""An in-memory loader that slices whole batches out of tensors, for data that fits in memory.

A ``DataLoader`` over a ``TensorDataset`` fetches every sample on its own and collates the batch
in Python: on small models that is about half of each iteration. :class:`TensorLoader` gathers
each batch with one indexing call per tensor instead, and draws each epoch's order from
``(seed, epoch)`` alone, so the order is reproducible and a checkpoint of
:meth:`TensorLoader.state_dict` resumes it exactly, even in the middle of an epoch.

Example:
    >>> import torch
    >>> import engineflow as ef
    >>> x, y = torch.randn(10, 4), torch.arange(10)
    >>> loader = ef.data.TensorLoader(x, y, batch_size=4, shuffle=True, seed=0)  # in setup(): loaders={"train": ...}
    >>> [len(yb) for _, yb in loader]
    [4, 4, 2]
    >>> def first_epoch(seed):
    ...     return [yb.tolist() for _, yb in ef.data.TensorLoader(x, y, batch_size=4, shuffle=True, seed=seed)]
    >>> first_epoch(0) == first_epoch(0), first_epoch(0) == first_epoch(1)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch

from engineflow.shards import Dealer, Layout

# Odd 64-bit constant (the golden ratio's): spreads seeds far apart, so (seed, epoch) pairs of
# nearby seeds never share a permutation generator.
_SEED_STRIDE = 0x9E3779B97F4A7C15


class TensorLoader:
    """Batches of rows of in-memory tensors, in order or shuffled per epoch, one gather per batch.

    Each pass over the loader is one epoch. With ``shuffle=True`` the order of epoch ``e`` is a
    permutation drawn from ``(seed, e)`` only: the same seed gives the same orders in every run,
    whatever else used the random number generators. One tensor yields batch tensors; several
    yield tuples of batches, like ``DataLoader(TensorDataset(...))`` (which yields lists).

    Iterate one pass at a time: a new pass starts the next epoch, except right after
    :meth:`load_state_dict`, when it continues the saved epoch at the saved batch.

    Args:
        *tensors: tensors with the same first dimension (samples), e.g. inputs and targets.
        batch_size: samples per batch.
        shuffle: draw a new order every epoch; otherwise batches are contiguous views, in order.
        drop_last: drop the last batch when it is smaller than ``batch_size``.
        seed: seed of the epochs' orders; default: drawn from torch's global RNG when a shuffled
            loader is built, so ``torch.manual_seed`` (or engineflow's ``seed``) makes it reproducible.
        device: move the tensors there once, when the loader is built (e.g. "cuda"); batches are
            then gathered on that device and need no copy per step.

    Example:
        >>> x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
        >>> loader = TensorLoader(x, y, batch_size=4, shuffle=True, seed=0)
        >>> len(loader), [len(yb) for _, yb in loader]
        (3, [4, 4, 2])
        >>> sorted(torch.cat([yb for _, yb in loader]).tolist()) == list(range(10))
        True
        >>> loader.state_dict()
        {'seed': 0, 'epoch': 2, 'batch': 0}
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        _check_tensors(tensors)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TensorLoader(batch_size=...) expects a whole number >= 1, got {batch_size!r}")
        if seed is None:
            # Only a shuffled loader draws from the global RNG: building an ordered one leaves the
            # stream that initialises models untouched.
            seed = int(torch.empty((), dtype=torch.int64).random_().item()) if shuffle else 0
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"TensorLoader(seed=...) expects an int or None, got {seed!r}")
        self.tensors = tuple(t.to(device) for t in tensors) if device is not None else tuple(tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.samples = len(self.tensors[0])
        self._epoch = 0  # the epoch in progress, or the next one when none is
        self._batch = 0  # batches of that epoch already handed out
        self._resume = False
        self._share = (0, 1, True)  # (rank, world size, pad): the whole order, on one process
        self._offset = 0  # positions of the epoch's order before the pass of `_epoch` (see start_at)

    def shard(self, rank: int, world_size: int, *, pad: bool) -> None:
        """Hand out only rank ``rank``'s share of each epoch's order (engineflow calls it on several
        processes): every ``world_size``-th sample from ``rank``; ``pad`` repeats the order's first
        samples up to a multiple of ``world_size`` (train), else shards differ by one at most (eval)."""
        self._share = (rank, world_size, pad)

    def _dealer(self) -> Dealer:
        rank, world, pad = self._share
        return Dealer(self.samples, self.batch_size, world, rank, self.drop_last, pad)

    def __len__(self) -> int:
        return self._dealer().count(self._offset)

    def __iter__(self) -> Iterator[Any]:
        if self._resume:
            self._resume = False
        elif self._batch > 0:  # the previous pass stopped early or was not run to its end
            self._epoch, self._batch, self._offset = self._epoch + 1, 0, 0
        return self._batches(self._epoch, self._batch)

    def _batches(self, epoch: int, first: int) -> Iterator[Any]:
        order, single = self.order(epoch), len(self.tensors) == 1
        for index, positions in islice(enumerate(self._dealer().batches(self._offset)), first, None):
            batch = self._gather(order, positions)
            # Counted before the yield: a checkpoint taken while this batch is being trained on
            # resumes with the next one.
            self._batch = index + 1
            yield batch[0] if single else batch
        self._epoch, self._batch, self._offset = epoch + 1, 0, 0

    def _gather(self, order: torch.Tensor | None, positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The rows at ``positions`` of the order (``None``: ``0..n-1``), one indexing call a tensor."""
        if isinstance(positions, range):
            if order is None and positions.step == 1:  # contiguous rows: views, no copy
                return tuple(t[positions.start:positions.stop] for t in self.tensors)
            if order is not None:
                rows = order[positions.start:positions.stop:positions.step]
            else:
                rows = torch.arange(positions.start, positions.stop, positions.step, device=self.tensors[0].device)
        else:
            rows = torch.tensor(positions, device=self.tensors[0].device)
            rows = order.index_select(0, rows) if order is not None else rows
        return tuple(t.index_select(0, rows) for t in self.tensors)

    def order(self, epoch: int) -> torch.Tensor | None:
        """The sample order of ``epoch`` (a permutation on the tensors' device), or None unshuffled."""
        if not self.shuffle:
            return None
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) % 2**63)
        # Drawn on the CPU so that the order does not depend on the device the data is on.
        return torch.randperm(self.samples, generator=generator).to(self.tensors[0].device)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``, from its first batch."""
        self._epoch, self._batch, self._offset, self._resume = epoch, 0, 0, True

    def start_at(self, position: int) -> None:
        """Make the next pass continue the epoch in progress after ``position`` positions of its
        order, each later position once (engineflow calls it to resume on another number of
        processes; see :mod:`engineflow.shards`)."""
        if not 0 <= position < self.samples:
            raise ValueError(f"TensorLoader.start_at expects a position in [0, {self.samples}), got {position}")
        self._batch, self._offset, self._resume = 0, position, True

    def layout(self) -> Layout:
        """How a pass deals out the order (see :mod:`engineflow.shards`): its offset is the pass in
        progress's."""
        return self._dealer().layout("tensor", self._offset)

    def state_dict(self) -> dict[str, int]:
        """Where the data order stands: ``{"seed", "epoch", "batch"}`` (batches of ``epoch`` handed
        out), and ``"offset"`` in a pass that resumed its epoch part-way (see :meth:`start_at`)."""
        if self._batch and self._batch >= len(self):  # every batch handed out: the next pass is the next epoch
            return {"seed": self.seed, "epoch": self._epoch + 1, "batch": 0}
        state = {"seed": self.seed, "epoch": self._epoch, "batch": self._batch}
        return {**state, "offset": self._offset} if self._offset else state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next pass resumes that epoch at that batch."""
        missing = {"seed", "epoch"} - set(state)
        if missing:
            raise ValueError(f"TensorLoader state needs 'seed' and 'epoch' (from state_dict()), got {sorted(state)}")
        self.seed = int(state["seed"])
        self._epoch, self._batch = int(state["epoch"]), int(state.get("batch", 0))
        self._offset = int(state.get("offset", 0))
        self._resume = True

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return (f"TensorLoader({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, seed={self.seed})")


def _check_tensors(tensors: tuple[Any, ...]) -> None:
    if not tensors:
        raise ValueError("TensorLoader needs at least one tensor, e.g. TensorLoader(x, y, batch_size=64)")
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise ValueError(
                f"TensorLoader: argument {position} is {type(tensor).__name__}, expected a tensor with a sample "
                "dimension first; convert arrays with torch.as_tensor"
            )
    sizes = [len(t) for t in tensors]
    if len(set(sizes)) > 1:
        raise ValueError(f"TensorLoader: the tensors must hold the same number of samples, got sizes {sizes}")
