"""Which positions of an epoch's order each process trains on, step by step, and how far a pass got.

An epoch's order is a list of the ``samples`` indices (a permutation, or ``0..n-1``), the same on
every process. A *pass* deals its positions out to ``world`` processes in steps: a step covering
positions ``[start, stop)`` gives rank ``r`` positions ``start + r, start + r + world, ...`` (at
most ``batch`` of them). Every rank takes part in every step, since each step's backward
all-reduces gradients.

* A whole epoch (``offset`` 0) pads the order to a multiple of ``world`` by repeating its first
  samples, ``batch * world`` positions a step (the last step may be short).
* A resumed pass (``offset`` p: positions a run on another number of processes had trained on)
  covers positions ``p..samples-1``, each once: ``batch * world`` a step, and when the last step
  would leave a rank with nothing (fewer than ``world`` positions left), the step before it shares
  its positions with it. Only when there is no step before it, or ``batch`` is 1, does that last
  step repeat positions. ``drop_last`` drops a short last step, unless it is the pass's only one.

A resume on the same number of processes does not use any of this: it re-runs the epoch's pass
and skips the steps already done, which is bit-identical to never stopping.

:class:`Dealer` hands out one rank's batches of these positions (or, ``pad=False``, a split that
evaluates: each position once, nothing repeated, nothing dropped); a :class:`Layout` says how a
pass dealt its order out, for a checkpoint. Every loader engineflow deals out (a
``TensorLoader``, a sharded ``DataLoader``) batches through a :class:`Dealer` and is :class:`Dealt`.

Example:
    >>> steps(10, world=2, batch=2)                 # rank 0: 0 2 | 4 6 | 8   rank 1: 1 3 | 5 7 | 9
    [(0, 4), (4, 8), (8, 10)]
    >>> steps(10, world=3, batch=2, offset=4)       # 6 positions left, dealt out to 3 ranks
    [(4, 10)]
    >>> steps(10, world=3, batch=2, offset=3)       # 7 left: 4 + 3, not 6 + 1 (ranks 1, 2 empty)
    [(3, 7), (7, 10)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable


def steps(samples: int, world: int, batch: int, *, offset: int = 0, drop_last: bool = False) -> list[tuple[int, int]]:
    """The ``[start, stop)`` positions of each step of a pass (see the module); ``stop`` passes
    ``samples`` where positions repeat (see :func:`position_index`)."""
    full = batch * world
    if offset == 0:
        per_rank = -(-samples // world)
        count = per_rank // batch if drop_last else -(-per_rank // batch)
        return [(j * full, min((j + 1) * full, per_rank * world)) for j in range(count)]
    count, left = divmod(samples - offset, full)
    bounds = [(offset + j * full, offset + (j + 1) * full) for j in range(count)]
    if left == 0 or (drop_last and count):  # drop_last, with nothing but a short step left: train it
        return bounds
    if left >= world:
        return [*bounds, (offset + count * full, samples)]
    if bounds and batch > 1:
        start, cut = bounds.pop()[0], samples - world  # the last step keeps exactly one position a rank
        return [*bounds, (start, cut), (cut, samples)]
    start = offset + count * full
    return [*bounds, (start, start + world)]


def rank_positions(step: tuple[int, int], rank: int, world: int) -> range:
    """Rank ``rank``'s positions in one step."""
    return range(step[0] + rank, step[1], world)


def position_index(position: int, samples: int, offset: int = 0) -> int:
    """The index into the order of a position; one past the end repeats the pass from its start."""
    return position if position < samples else offset + (position - samples) % (samples - offset)


def consumed(samples: int, world: int, batch: int, *, offset: int, done: int, drop_last: bool = False) -> int:
    """How many positions of the order a pass had trained on after ``done`` steps (all ranks)."""
    if done <= 0:
        return offset
    return min(steps(samples, world, batch, offset=offset, drop_last=drop_last)[done - 1][1], samples)


@dataclass(frozen=True)
class Layout:
    """How a pass deals out an epoch's order, as a checkpoint holds it (under ``"order"``).

    ``kind``: what deals it out ("tensor": a ``TensorLoader``; "shard": a ``DataLoader`` engineflow
    sharded); ``offset``: the positions before the pass in progress (see the module).

    Example:
        >>> layout = Layout("tensor", samples=10, batch=2, world=3, offset=4, drop_last=False)
        >>> layout.state_dict()
        {'kind': 'tensor', 'samples': 10, 'batch': 2, 'world': 3, 'offset': 4, 'drop_last': False}
        >>> Layout.from_state(layout.state_dict()) == layout
        True
    """

    kind: Literal["tensor", "shard"]
    samples: int
    batch: int
    world: int
    offset: int = 0
    drop_last: bool = False

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's dict: ``{"kind", "samples", "batch", "world", "offset", "drop_last"}``."""
        return {"kind": self.kind, "samples": self.samples, "batch": self.batch, "world": self.world,
                "offset": self.offset, "drop_last": self.drop_last}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Layout:
        """The layout a :meth:`state_dict` holds."""
        return cls(state["kind"], int(state["samples"]), int(state["batch"]), int(state["world"]),
                   int(state["offset"]), bool(state["drop_last"]))

    def matches(self, other: Layout) -> bool:
        """Whether ``other`` deals out the same samples in batches of the same size (on any number of
        processes, from any offset)."""
        return (self.kind, self.samples, self.batch, self.drop_last) == \
            (other.kind, other.samples, other.batch, other.drop_last)

    def consumed(self, done: int) -> int:
        """How many positions of the order its pass had trained on after ``done`` steps (all ranks)."""
        return consumed(self.samples, self.world, self.batch, offset=self.offset, done=done, drop_last=self.drop_last)


@dataclass(frozen=True)
class Dealer:
    """Rank ``rank``'s batches of a pass over an epoch's order, as positions of the order.

    ``pad`` (train): the steps of the module, every rank in every step. ``pad=False`` (a split that
    evaluates): rank ``r`` takes positions ``offset + r, offset + r + world, ...``, each once, in
    batches of ``batch``; ranks' numbers of batches differ by one at most, and ``drop_last`` drops
    a rank's short last batch.

    Example:
        >>> [list(b) for b in Dealer(10, batch=2, world=2, rank=1).batches()]
        [[1, 3], [5, 7], [9]]
        >>> [list(b) for b in Dealer(7, batch=2, world=2, rank=1).batches()]  # 7 pads to 8: the first again
        [[1, 3], [5, 0]]
        >>> [list(b) for b in Dealer(10, batch=2, world=3, rank=2).batches(offset=4)]
        [[6, 9]]
        >>> [list(b) for b in Dealer(7, batch=2, world=3, rank=2, pad=False).batches()]
        [[2, 5]]
    """

    samples: int
    batch: int
    world: int = 1
    rank: int = 0
    drop_last: bool = False
    pad: bool = True

    def batches(self, offset: int = 0) -> Iterator[Sequence[int]]:
        """The positions of each of this rank's batches in a pass from ``offset``: a ``range``,
        or a list where positions repeat."""
        if not self.pad:
            rows = range(offset + self.rank, self.samples, self.world)
            for start in range(0, self.count(offset) * self.batch, self.batch):
                yield rows[start:start + self.batch]
            return
        samples, rank, world = self.samples, self.rank, self.world
        for start, stop in steps(samples, world, self.batch, offset=offset, drop_last=self.drop_last):
            if stop <= samples:
                yield range(start + rank, stop, world)
            else:
                yield [position_index(p, samples, offset) for p in range(start + rank, stop, world)]

    def count(self, offset: int = 0) -> int:
        """How many batches :meth:`batches` hands out from ``offset``."""
        if not self.pad:
            rows = len(range(offset + self.rank, self.samples, self.world))
            return rows // self.batch if self.drop_last else -(-rows // self.batch)
        return len(steps(self.samples, self.world, self.batch, offset=offset, drop_last=self.drop_last))

    def layout(self, kind: Literal["tensor", "shard"], offset: int) -> Layout:
        """The :class:`Layout` of a pass from ``offset``, dealt out by a loader of ``kind``."""
        return Layout(kind, self.samples, self.batch, self.world, offset, self.drop_last)


@runtime_checkable
class Dealt(Protocol):
    """A loader (or a DataLoader's batch sampler) that deals out its batches by position."""

    def layout(self) -> Layout:
        """The :class:`Layout` of the pass in progress (or of the next, before one starts)."""
        ...

    def start_at(self, position: int) -> None:
        """Make the next pass continue the epoch in progress after ``position`` positions of its
        order, each later position once."""
        ...
