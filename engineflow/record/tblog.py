"""TensorBoard event files (tensorboardX), imported only when a run writes them.

Scalars: the train loss every 50 iterations (tag ``iteration/train/loss``, step = the
iteration; the recorder's handler fires only then), every per-epoch metric under its own name
(``valid/accuracy``, step = the epoch), and at the end the config as hparams with the final
metrics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engineflow.declare.configuration import flatten

FLUSH_EVERY_S = 5.0


class TensorBoardLog:
    """A tensorboardX ``SummaryWriter`` in ``folder``, opened on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None
        self._flushed_at = float("-inf")

    def open(self) -> None:
        """Create the event file now (a one-off cost that then does not land inside an epoch)."""
        _ = self.writer

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(self.folder), flush_secs=30)
        return self._writer

    def iteration(self, iteration: int, loss: float | None, prefix: str = "") -> None:
        if loss is not None:
            self.writer.add_scalar(f"iteration/{prefix}train/loss", loss, iteration)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if name != "epoch":
                self.writer.add_scalar(name, value, epoch)
        # Flushing fsyncs the event file: after each epoch when epochs are long, every few seconds
        # when they are not (and always at close).
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.writer.flush()
            self._flushed_at = time.monotonic()

    def close(self, config: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """Write the hparams summary and close the files."""
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        metrics = {f"hparam/{k}": v for k, v in final.items() if k != "epoch"}
        if metrics:
            self.writer.add_hparams(hparams, metrics, name="hparams")
        if self._writer is not None:
            self._writer.close()

