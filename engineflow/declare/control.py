"""Control-flow exceptions a step or a handler raises to change what the engine does next.

They are plain classes so that ``grep SkipBatch`` finds every use. engineflow lets them pass
through its own error wrapping untouched.

* :class:`SkipBatch`: drop the rest of this batch. Raised before or inside the step, the step's
  output is ``None`` and no ``ITERATION_COMPLETED`` handler (metrics included) sees the batch.
  Raised in an ``ITERATION_COMPLETED`` handler, the handlers after it are skipped.
* :class:`EndEpoch`: finish the current epoch now. The rest of the batch is skipped as with
  :class:`SkipBatch`, then ``EPOCH_COMPLETED`` fires as usual (validation still runs).
* :class:`StopFit`: stop the whole fit cleanly. Raised in a handler, the other handlers of the
  same event still run (the epoch is logged and saved), then the fit ends and ``COMPLETED``
  fires. Raised in the step, the batch is skipped first. Raised while an eval engine runs inside
  the fit (for example by early stopping on validation), it stops the fit around it too.
"""

from __future__ import annotations


class ControlFlow(Exception):  # noqa: N818 - these are signals, not errors
    """Base class of the control-flow signals."""


class SkipBatch(ControlFlow):
    """Skip the rest of the current batch: its step and/or its remaining handlers.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch):
        ...     if batch.isnan().any():
        ...         raise ef.SkipBatch  # a corrupt batch: no step, no metrics, no loss check
        ...     return {"loss": batch.mean()}
        >>> losses = []
        >>> @ef.on(ef.Events.ITERATION_COMPLETED)
        ... def log(output):
        ...     losses.append(output["loss"].item())
        >>> state = ef.engine(train, log).run([torch.ones(2), torch.full((2,), float("nan")), torch.zeros(2)])
        >>> state.iteration, losses  # the skipped batch still counts as an iteration
        (3, [1.0, 0.0])
    """


class EndEpoch(ControlFlow):
    """End the current epoch after this batch; ``EPOCH_COMPLETED`` still fires.

    Example:
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch):
        ...     return {"loss": batch}
        >>> @ef.on(ef.Events.ITERATION_COMPLETED)
        ... def good_enough(output):
        ...     if output["loss"] < 0.5:
        ...         raise ef.EndEpoch  # the rest of this epoch's batches are not needed
        >>> ends = []
        >>> @ef.on(ef.Events.EPOCH_COMPLETED)
        ... def note(state):
        ...     ends.append(state.iteration)
        >>> state = ef.engine(train, good_enough, note).run([3.0, 2.0, 0.1, 5.0, 6.0], max_epochs=2)
        >>> ends  # each epoch ended after its third batch of five
        [3, 6]
    """


class StopFit(ControlFlow):
    """Stop the fit cleanly after the current event's handlers have run.

    Example:
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch):
        ...     return {"loss": batch}
        >>> @ef.every_n_epochs(1)
        ... def stop_early(state):
        ...     if state.epoch == 2:
        ...         raise ef.StopFit  # e.g. no progress for a while
        >>> state = ef.engine(train, stop_early).run([1.0, 2.0], max_epochs=10)
        >>> state.epoch, state.iteration
        (2, 4)
    """
