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
    """Skip the rest of the current batch: its step and/or its remaining handlers."""


class EndEpoch(ControlFlow):
    """End the current epoch after this batch; ``EPOCH_COMPLETED`` still fires."""


class StopFit(ControlFlow):
    """Stop the fit cleanly after the current event's handlers have run."""
