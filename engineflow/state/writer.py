"""Checkpoints written off the training thread: a copy taken now, written by a background thread.

A checkpoint is taken in two parts, as ``torch.distributed.checkpoint.async_save`` and Lightning's
``AsyncCheckpointIO`` do:

1. on the training thread, :meth:`CheckpointWriter.submit` copies the state (:func:`snapshot`: every
   tensor's data cloned, so the next optimizer step cannot change what is written);
2. a background thread writes the copy (serialisation, checksum, fsync, rename, then pruning the
   files it made old), while training goes on.

The rules that keep this as safe as writing on the training thread:

* **One write at a time, in order.** ``submit`` first waits for the previous write, so at most one
  copy of the state exists besides the live one (its memory: one state's tensors).
* **A failure is the training thread's.** What a write raises (a full disk) is kept and raised on the
  training thread by the next :meth:`~CheckpointWriter.check`, ``submit`` or
  :meth:`~CheckpointWriter.wait`, once.
* **Nothing is lost or left behind.** Each write runs in a thread of its own, started when the
  previous one has ended and not a daemon: the interpreter waits for it at exit, and no thread is
  left waiting for work that will not come. Whoever ends a run calls :meth:`~CheckpointWriter.wait`
  or :meth:`~CheckpointWriter.close`. A process killed mid-write leaves the previous checkpoint
  (files are written to a temporary name and renamed, see
  :mod:`engineflow.state.checkpoint_files`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def snapshot(state: T) -> T:
    """A copy of ``state`` that shares no tensor data with it, and saves to the same bytes.

    Every tensor's storage is cloned once: two tensors that shared a storage (views, tied weights)
    share the clone, so ``torch.save`` writes the copy exactly as it would have written ``state``.
    Plain values are copied as :func:`copy.deepcopy` copies them.

    Example:
        >>> weight = torch.zeros(2)
        >>> copied = snapshot({"weight": weight, "epoch": 1})
        >>> weight += 1
        >>> copied["weight"].tolist(), copied["epoch"]
        ([0.0, 0.0], 1)
    """
    with torch.no_grad():
        return copy.deepcopy(state)


class CheckpointWriter:
    """Writes copies of states in the background, one at a time, in the order they were submitted.

    Args:
        name: the writing thread's name (what a stack dump or a profiler shows).

    Example:
        >>> written = []
        >>> writer = CheckpointWriter()
        >>> state = {"step": torch.tensor(1)}
        >>> writer.submit(written.append, state)
        >>> state["step"] += 1  # the next step: the copy being written keeps the value it had
        >>> writer.wait()
        >>> written[0]["step"].item()
        1
    """

    def __init__(self, name: str = "engineflow-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def submit(self, write: Callable[[Any], None], state: Any) -> None:
        """Wait for the previous write (raising its failure), copy ``state`` here (:func:`snapshot`),
        then call ``write`` with the copy in the background.

        Raises:
            BaseException: what the previous write raised, not raised before; ``write`` is not called.
        """
        self.wait()
        copied = snapshot(state)
        ready = _copies_done(copied)
        self._thread = threading.Thread(target=self._run, args=(write, copied, ready), name=self.name)
        self._thread.start()

    def _run(self, write: Callable[[Any], None], state: Any, ready: Callable[[], None]) -> None:
        try:
            ready()
            write(state)
        except BaseException as err:  # the training thread raises it: a thread's own error would be lost
            self._failure = err

    def check(self) -> None:
        """Raise what a finished write raised, once; cheap enough for every iteration (waits for nothing)."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def wait(self) -> None:
        """Wait until the write in progress (if any) is done, then raise its failure (once)."""
        self._join()
        self.check()

    def close(self) -> BaseException | None:
        """Wait until the write in progress is done; return its failure not raised yet instead of
        raising it (for a run that ends with an error of its own)."""
        self._join()
        failure, self._failure = self._failure, None
        return failure

    def _join(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    @property
    def busy(self) -> bool:
        """Whether a write is in progress."""
        return self._thread is not None and self._thread.is_alive()


def _copies_done(state: Any) -> Callable[[], None]:
    """What the writing thread calls before it reads the copy: on a GPU the copies are queued on
    the training thread's stream, which the writer's reads would not otherwise wait for."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return lambda: None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize
