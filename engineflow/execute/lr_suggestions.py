"""What an LR sweep's loss curve suggests: fastai's three rules, on the smoothed losses.

Each rule takes the learning rates and the smoothed losses of a sweep (in order, the rates growing)
and returns one learning rate:

``valley``
    fastai's default: the longest stretch over which the loss keeps falling (the longest decreasing
    subsequence), and a point about half-way down it.
``steep``
    where the loss falls fastest per decade of learning rate: the steepest descent of the smoothed
    loss against ``log(lr)``.
``min10``
    the learning rate at the lowest loss, divided by 10.

:func:`suggestions` trims the curve as fastai's ``Learner.lr_find`` does before applying them: it
drops the first tenth of the sweep's steps and the last 5 (where the loss is either still at its
start or already diverging), and stops at the first loss that is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

SKIP_END = 5  # points dropped at the end, as fastai's lr_find does


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``valley``: the longest decreasing subsequence of ``losses``, ending at index ``end``
    with length ``n``, taken to start at ``end - n``; the rate a third plus a sixth of the way along it.

    Example:
        >>> losses = [16 - i for i in range(13)] + [5, 8, 12]  # falls from index 0 to 12: n = 13, start -1
        >>> valley(list(range(16)), losses)                  # -1 + int(13 / 3) + int(13 / 6)
        5
    """
    n = len(losses)
    longest = [1] * n  # longest decreasing subsequence ending at each index
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    sections = (end - start) / 3
    # fastai's start is one before the valley's first point; on a short valley that would be -1
    return lrs[max(start + int(sections) + int(sections / 2), 0)]


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``steep``: the rate at the left of the steepest fall of the loss per unit of ``log(lr)``.

    Example:
        >>> steep([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.9, 1.0, 0.9])  # the big drop is from 1e-2 to 1e-1
        0.01
    """
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(len(lrs) - 1)]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def min10(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``minimum``: the rate at the lowest loss, divided by 10.

    Example:
        >>> min10([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.0, 0.5, 3.0])
        0.01
    """
    return lrs[min(range(len(losses)), key=losses.__getitem__)] / 10


RULES: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley, "steep": steep, "min10": min10}


def trimmed(lrs: Sequence[float], losses: Sequence[float], steps: int) -> tuple[list[float], list[float]]:
    """The part of a sweep of ``steps`` steps that the rules read: up to the first loss that is not
    finite, less the first ``steps // 10`` points and the last :data:`SKIP_END`; the whole finite part
    when that would leave fewer than 3 points."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    lrs, losses = list(lrs[:finite]), list(losses[:finite])
    first, last = steps // 10, len(losses) - SKIP_END
    if last - first >= 3:
        return lrs[first:last], losses[first:last]
    return lrs, losses


def suggestions(lrs: Sequence[float], losses: Sequence[float], steps: int) -> dict[str, float | None]:
    """Each rule's learning rate for a sweep of ``steps`` steps (see :func:`trimmed`); None for every
    rule when fewer than 2 finite points remain.

    Example:
        >>> lrs = [10 ** (-4 + i / 10) for i in range(41)]             # 1e-4 to 1
        >>> losses = [2.0 - 1.5 / (1 + math.exp(-(i - 20))) for i in range(41)]  # falls fastest at 1e-2
        >>> {name: f"{lr:.3g}" for name, lr in suggestions(lrs, losses, 41).items()}  # read from 4 to 35
        {'valley': '0.00631', 'steep': '0.01', 'min10': '0.0316'}
    """
    lrs, losses = trimmed(lrs, losses, steps)
    if len(losses) < 2:
        return dict.fromkeys(RULES)
    return {name: float(rule(lrs, losses)) for name, rule in RULES.items()}
