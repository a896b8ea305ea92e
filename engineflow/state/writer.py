"""What a checkpoint leaves to a background thread: making its files durable, then pruning.

A checkpoint is taken in two parts:

1. on the training thread, the state is serialised and its file and checksum written and renamed
   into place (:func:`~engineflow.state.checkpoint_files.save_checkpoint` with ``durable=False``).
   From then on a process killed at any point finds the checkpoint whole: the operating system has
   its data. Nothing is copied: the file holds the state as it was at that step.
2. a background thread fsyncs the files and their folder, so that they also survive a machine's
   crash, and only then deletes the files the policy no longer keeps (a crash before the fsyncs
   finds a file its checksum does not match, and an older, durable checkpoint to use instead).

The fsyncs are the part of a save that only waits (for the disk); they overlap the next step, whose
end waits for them (so a run's files are as settled one step after each checkpoint as before).

The rules that keep this as safe as doing everything on the training thread:

* **One job at a time, in order.** :meth:`CheckpointWriter.submit` first waits for the previous job.
* **A failure is the training thread's.** What a job raises (an fsync's error) is kept and raised on
  the training thread by the next :meth:`~CheckpointWriter.check`, ``submit`` or
  :meth:`~CheckpointWriter.wait`, once.
* **Nothing is left behind.** Each job runs in a thread of its own, started when the previous one
  has ended and not a daemon: the interpreter waits for it at exit, and no thread is left waiting
  for work that will not come. Whoever ends a run calls :meth:`~CheckpointWriter.wait` or
  :meth:`~CheckpointWriter.close`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class CheckpointWriter:
    """Runs jobs in the background, one at a time, in the order they were submitted.

    Args:
        name: the thread's name (what a stack dump or a profiler shows).

    Example:
        >>> done = []
        >>> writer = CheckpointWriter()
        >>> writer.submit(lambda: done.append("synced"))
        >>> writer.wait()
        >>> done
        ['synced']
    """

    def __init__(self, name: str = "engineflow-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its failure), then run ``job`` in the background.

        Raises:
            BaseException: what the previous job raised, not raised before; ``job`` is not run.
        """
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # the training thread raises it: a thread's own error would be lost
            self._failure = err

    def check(self) -> None:
        """Raise what a finished job raised, once; cheap enough for every iteration (waits for nothing)."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def wait(self) -> None:
        """Wait until the job in progress (if any) is done, then raise its failure (once)."""
        self._join()
        self.check()

    def close(self) -> BaseException | None:
        """Wait until the job in progress is done; return its failure not raised yet instead of
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
        """Whether a job is in progress."""
        return self._thread is not None and self._thread.is_alive()
