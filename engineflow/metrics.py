"""Metrics: Ignite's, ready for steps that return ``{"y_pred": ..., "y": ...}`` dicts.

Any ``ignite.metrics.Metric`` works in ``@ef.eval_step(metrics={...})``. Ignite's metrics
accumulate sums and counts per batch, so a loader's value weighs every sample equally, whatever
the batch sizes (an uneven last batch counts for what it holds).

Example:
    >>> import torch, torch.nn.functional as F
    >>> import engineflow as ef
    >>> loss = ef.metrics.Loss(F.mse_loss)
    >>> loss.update((torch.zeros(3), torch.ones(3))); loss.update((torch.zeros(1), torch.zeros(1)))
    >>> loss.compute()  # (3 * 1.0 + 1 * 0.0) / 4
    0.75
"""

from __future__ import annotations

from collections.abc import Mapping

import ignite.metrics as _im
from ignite.engine import Engine
from ignite.metrics import (
    Accuracy,
    Average,
    ConfusionMatrix,
    Fbeta,
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    Precision,
    Recall,
    RootMeanSquaredError,
    TopKCategoricalAccuracy,
)

__all__ = [
    "Accuracy",
    "Average",
    "ConfusionMatrix",
    "Fbeta",
    "Loss",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "Precision",
    "Recall",
    "RootMeanSquaredError",
    "TopKCategoricalAccuracy",
    "attach_metrics",
]


class Loss(_im.Loss):
    """Ignite's ``Loss`` (mean of ``loss_fn(y_pred, y)`` weighted by batch size) for dict outputs.

    Ignite's version asks a dict output for a ``criterion_kwargs`` key too; a step that returns
    ``{"y_pred", "y"}`` needs only those two.
    """

    required_output_keys = ("y_pred", "y")


def attach_metrics(engine: Engine, metrics: Mapping[str, Metric], prefix: str = "") -> None:
    """Attach each metric to ``engine`` as ``prefix + name`` in ``engine.state.metrics``."""
    for name, metric in metrics.items():
        metric.attach(engine, prefix + name)
