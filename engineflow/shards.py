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

Example:
    >>> steps(10, world=2, batch=2)                 # rank 0: 0 2 | 4 6 | 8   rank 1: 1 3 | 5 7 | 9
    [(0, 4), (4, 8), (8, 10)]
    >>> steps(10, world=3, batch=2, offset=4)       # 6 positions left, dealt out to 3 ranks
    [(4, 10)]
    >>> steps(10, world=3, batch=2, offset=3)       # 7 left: 4 + 3, not 6 + 1 (ranks 1, 2 empty)
    [(3, 7), (7, 10)]
"""

from __future__ import annotations


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
