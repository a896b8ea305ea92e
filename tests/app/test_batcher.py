"""The micro-batcher on its own: batches by size, time and shape, failures one by one, a bounded queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engineflow.app.batcher import Batcher, ItemError, QueueFullError
from engineflow.errors import RecipeError


def batched(run: Callable[[list[torch.Tensor]], list[Any]], scenario: Callable[[Batcher], Any], **options: Any) -> Any:
    """Run ``scenario(batcher)`` (a coroutine function) on a fresh event loop with a started batcher."""
    settings = {"max_batch_size": 4, "max_wait_ms": 30, "max_queue": 8, **options}
    batcher = Batcher(run, **settings)
    batcher.start()

    async def main() -> Any:
        try:
            return await scenario(batcher)
        finally:
            batcher.close()

    return asyncio.run(main())


def doubled(seen: list[int]) -> Callable[[list[torch.Tensor]], list[Any]]:
    def run(samples: list[torch.Tensor]) -> list[Any]:
        seen.append(len(samples))
        x = torch.stack(samples)
        if (x < 0).any():
            raise ValueError("negative input")
        return list(x * 2)

    return run


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_a_full_batch_runs_at_once_and_a_drain_runs_the_rest_without_waiting():
    seen: list[int] = []

    async def scenario(batcher: Batcher) -> list[Any]:
        items = batcher.submit([torch.tensor([float(i)]) for i in range(6)], deadline=later(60))
        full = [await item.future for item in items[:4]]  # four fill a batch: no 60 s wait for them
        assert batcher.depth() == 2 and seen == [4]
        batcher.drain()  # what a stop signal does: the two left run now, not after --max-wait-ms
        return full + [await item.future for item in items[4:]]

    results = batched(doubled(seen), scenario, max_wait_ms=60_000, max_batch_size=4)
    assert seen == [4, 2]
    assert [float(r) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_shapes_are_never_mixed_in_one_batch():
    shapes: list[list[tuple[int, ...]]] = []

    def run(samples: list[torch.Tensor]) -> list[Any]:
        shapes.append([tuple(s.shape) for s in samples])
        return [s.sum() for s in samples]

    async def scenario(batcher: Batcher) -> list[Any]:
        items = batcher.submit([torch.ones(2), torch.ones(3), torch.ones(2)], deadline=later())
        return [await item.future for item in items]

    results = batched(run, scenario)
    assert sorted(shapes) == [[(2,), (2,)], [(3,)]]
    assert [float(r) for r in results] == [2.0, 3.0, 2.0]


def test_a_failing_sample_fails_alone_and_an_unsplittable_output_fails_every_sample():
    seen: list[int] = []

    async def scenario(batcher: Batcher) -> list[Any]:
        items = batcher.submit([torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([3.0])], deadline=later())
        return await asyncio.gather(*(item.future for item in items), return_exceptions=True)

    good, bad, other = batched(doubled(seen), scenario)
    assert seen == [3, 1, 1, 1]  # the batch, then each sample alone
    assert (float(good), float(other)) == (2.0, 6.0)
    assert isinstance(bad, ItemError) and str(bad) == "ValueError: negative input"

    def unsplittable(samples: list[torch.Tensor]) -> list[Any]:
        raise RecipeError("infer step predict returned float for a batch of 2")

    outcomes = batched(unsplittable, scenario)
    assert all(isinstance(o, RecipeError) for o in outcomes)


def test_the_queue_is_bounded_and_a_request_joins_whole_or_not_at_all():
    async def scenario(batcher: Batcher) -> tuple[int, str]:
        first = batcher.submit([torch.zeros(1)] * 6, deadline=later())
        with pytest.raises(QueueFullError) as refused:
            batcher.submit([torch.zeros(1)] * 3, deadline=later())
        depth = batcher.depth()
        batcher.cancel(first)
        return depth, str(refused.value), batcher.depth()

    depth, message, after = batched(doubled([]), scenario, max_wait_ms=10_000, max_batch_size=32)
    assert (depth, message, after) == (6, "the queue holds 6 of 8 items", 0)


def test_cancelled_and_expired_items_never_run():
    seen: list[int] = []

    async def scenario(batcher: Batcher) -> Any:
        gone = batcher.submit([torch.tensor([1.0])], deadline=later())
        batcher.cancel(gone)
        expired = batcher.submit([torch.tensor([2.0])], deadline=time.monotonic() + 0.01)
        kept = batcher.submit([torch.tensor([3.0])], deadline=later())
        outcome = await asyncio.gather(expired[0].future, return_exceptions=True)
        return gone[0].future.cancelled(), outcome[0], float(await kept[0].future)

    cancelled, expired, kept = batched(doubled(seen), scenario, max_wait_ms=100)
    assert cancelled and isinstance(expired, TimeoutError) and kept == 6.0
    assert seen == [1]  # only the kept item ran
