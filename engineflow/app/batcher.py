"""The micro-batcher of ``engineflow serve``: requests' samples gathered into batches for one inference thread.

A bounded queue of items (one sample each) fed from the event loop; one thread takes up to
``max_batch_size`` items of one shape and dtype, or what came within ``max_wait_ms`` of the oldest
one, whichever comes first, and runs them as one batch::

    while not closed or queue:
        wait for an item
        wait until the queue holds max_batch_size items, max_wait_ms have passed since the oldest
            arrived, or the batcher drains or closes (then nothing more is waited for)
        batch = up to max_batch_size items of the oldest one's shape and dtype, in arrival order;
                items past their deadline are answered TimeoutError and left out
        run_batch(batch); when it raises, each item runs alone, so a bad one fails by itself
        each item's future gets its own output (or error) on its event loop

An item whose client gave up (a deadline, a disconnect) is taken out of the queue by
:meth:`Batcher.cancel` and never runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engineflow.errors import RecipeError


class QueueFullError(Exception):
    """The queue has no room for a request's items: answer 429 and let the client retry."""


class ItemError(Exception):
    """One item failed in the infer step, alone (its own batch of one): answer 422 with the reason."""


@dataclass(eq=False)
class Item:
    """One sample waiting for its batch; ``future`` lives on the event loop that submitted it."""

    sample: torch.Tensor
    deadline: float
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Items batch together only with the same shape and dtype."""
        return tuple(self.sample.shape), self.sample.dtype


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the client gave up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    """A bounded queue and the one thread that runs its items in batches (see the module docstring).

    Args:
        run_batch: takes the samples of one batch (same shape and dtype) and returns one output per
            sample, in order; runs on the inference thread only.
        max_batch_size: the most items in one batch.
        max_wait_ms: how long the oldest queued item waits for others to join it.
        max_queue: the most items waiting at once; :meth:`submit` raises :class:`QueueFullError` past it.
        on_batch: told each batch's size and seconds, on the inference thread (for metrics).
    """

    def __init__(self, run_batch: Callable[[list[torch.Tensor]], Sequence[Any]], *, max_batch_size: int,
                 max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[Item] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._draining = False
        self._thread = threading.Thread(target=self._work, name="engineflow-inference", daemon=True)

    def start(self) -> None:
        """Start the inference thread."""
        self._thread.start()

    def depth(self) -> int:
        """Items waiting now."""
        return len(self._queue)

    def submit(self, samples: Sequence[torch.Tensor], *, deadline: float) -> list[Item]:
        """Queue a request's samples together, or none of them: :class:`QueueFullError` when they do not fit.

        ``deadline`` is a ``time.monotonic()`` time. Call from the event loop the futures belong to.
        """
        loop = asyncio.get_running_loop()
        items = [Item(sample, deadline, loop.create_future(), loop) for sample in samples]
        with self._lock:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFullError(f"the queue holds {len(self._queue)} of {self.max_queue} items")
            self._queue.extend(items)
            self._lock.notify()
        return items

    def cancel(self, items: Sequence[Item]) -> None:
        """Take items whose client gave up out of the queue (those running already finish unseen)."""
        with self._lock:
            for item in items:
                item.future.cancel()
                try:
                    self._queue.remove(item)
                except ValueError:
                    pass

    def drain(self) -> None:
        """From now on run what is queued at once, without waiting for more (the server is stopping)."""
        with self._lock:
            self._draining = True
            self._lock.notify()

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued without waiting for more, then stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Item] | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if not self._queue:
                return None
            while len(self._queue) < self.max_batch_size and not (self._closed or self._draining) and self._queue:
                left = self._queue[0].arrived + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            if not self._queue:
                return []
            now, key = time.monotonic(), self._queue[0].key
            batch: list[Item] = []
            kept: deque[Item] = deque()
            while self._queue:
                item = self._queue.popleft()
                if item.deadline <= now:
                    item.loop.call_soon_threadsafe(_settle, item.future, None, TimeoutError())
                elif item.key == key and len(batch) < self.max_batch_size:
                    batch.append(item)
                else:
                    kept.append(item)
            self._queue = kept
            return batch

    def _run(self, batch: list[Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = list(self._run_batch([item.sample for item in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} samples")
            results: list[tuple[Any, BaseException | None]] = [(out, None) for out in outputs]
        except RecipeError as err:  # the step's output cannot be split per sample: no sample's fault
            results = [(None, err)] * len(batch)
        except Exception as err:
            results = self._one_by_one(batch) if len(batch) > 1 else [(None, _item_error(err))]
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for item, (value, error) in zip(batch, results, strict=True):
            try:
                item.loop.call_soon_threadsafe(_settle, item.future, value, error)
            except RuntimeError:  # its loop is closed: nobody is waiting any more
                pass

    def _one_by_one(self, batch: list[Item]) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
        for item in batch:
            try:
                results.append((self._run_batch([item.sample])[0], None))
            except Exception as err:
                results.append((None, _item_error(err)))
        return results


def _item_error(err: Exception) -> ItemError:
    return err if isinstance(err, ItemError) else ItemError(f"{type(err).__name__}: {err}")
