"""Metrics for steps that return ``{"y_pred": ..., "y": ...}`` dicts: Ignite's, and three of engineflow's.

Any ``ignite.metrics.Metric`` works in ``@ef.eval_step(metrics={...})``. Every metric here keeps
sums and counts across batches and divides once at the end of the loader, so an uneven last batch
counts for what it holds. What each name means, over all the batches of one loader (``N``
samples; ``y_pred`` and ``y`` as the step returns them):

========================  ==============================================  ===============================
name                      value                                           torch equivalent
========================  ==============================================  ===============================
MeanSquaredError          mean of ``(y_pred - y) ** 2`` over every         ``F.mse_loss(y_pred, y)``
                          element (samples and features)
MeanAbsoluteError         mean of ``abs(y_pred - y)`` over every element   ``F.l1_loss(y_pred, y)``
RootMeanSquaredError      square root of MeanSquaredError                  ``F.mse_loss(y_pred, y).sqrt()``
Loss(loss_fn)             mean of ``loss_fn(y_pred, y)`` per batch,        ``loss_fn`` on the whole loader
                          weighted by batch size                           when it is a ``reduction="mean"``
                                                                           loss with the same number of
                                                                           terms per sample (not with class
                                                                           weights or ``ignore_index``)
Accuracy                  fraction of samples predicted right: argmax      ``(y_pred.argmax(1) == y)``
                          of ``(N, C)`` scores; a binary ``y_pred`` must   ``.float().mean()``
                          hold 0/1; multilabel counts a sample right
                          only if all its labels are
TopKCategoricalAccuracy   fraction of samples whose class is among the     none
                          ``k`` (default 5) highest scores
Precision, Recall         per class, TP / (TP + FP) and TP / (TP + FN):    none
                          a tensor per class unless ``average=``
                          (``"macro"``, ``"micro"``, ``"weighted"``);
                          the positive class's float for binary
Fbeta(beta)               F-beta from Precision and Recall, averaged       none
                          over classes by default (``average=True``)
ConfusionMatrix(C)        ``C x C`` counts, row = true class, column =     none
                          predicted class (``average=`` normalises)
Average                   mean of a value the step returns; give it        ``values.mean(0)`` only if each
                          ``output_transform=lambda out: out["key"]``.     batch gives an ``(n, k)`` tensor,
                          Rows of a 2-D+ tensor count one each; a number   one row per sample
                          or a 0-d or 1-D tensor counts as one, so
                          per-batch means are averaged unweighted
========================  ==============================================  ===============================

The first three are engineflow's own, so that they mean what torch's functional losses with
``reduction="mean"`` mean. Ignite's metrics of the same names sum over the features of each sample
and divide by ``N``: on ``(N, 64)`` outputs Ignite's ``MeanSquaredError`` is 64 times
``F.mse_loss``. They are still there as ``ignite.metrics.MeanSquaredError``,
``ignite.metrics.MeanAbsoluteError`` and ``ignite.metrics.RootMeanSquaredError``. On ``(N,)`` or
``(N, 1)`` outputs both agree.

The main metric's mode comes from its name (:func:`engineflow.state.best.infer_mode`): names containing
``loss``, ``error``, ``mse``, ``mae`` or ``rmse`` are minimised, other names maximised.

Example:
    >>> import torch, torch.nn.functional as F
    >>> import engineflow as ef
    >>> mse = ef.metrics.MeanSquaredError()
    >>> mse.update((torch.zeros(3, 2), torch.ones(3, 2))); mse.update((torch.zeros(1, 2), torch.zeros(1, 2)))
    >>> mse.compute()  # (6 * 1.0 + 2 * 0.0) / 8 elements
    0.75
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import ignite.metrics as _im
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import (
    Accuracy,
    Average,
    ConfusionMatrix,
    Fbeta,
    Metric,
    Precision,
    Recall,
    TopKCategoricalAccuracy,
)
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from engineflow.errors import RecipeError
from engineflow.ignite_internals import metric_device, state_dict_keys

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


@state_dict_keys("_sum_of_errors", "_num_elements")
class _ElementwiseMean(Metric):
    """Mean of ``_error(y_pred - y)`` over every element of every batch: sum of errors / elements.

    The sum is kept in float64 (float32 on MPS, which has no float64) on the metric's ``device``;
    each batch is summed on its own device first, so only one number moves per batch.
    """

    @staticmethod
    def _error(diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        device = metric_device(self)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._sum_of_errors = torch.tensor(0.0, dtype=dtype, device=device)
        self._num_elements = 0

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        y_pred, y = output[0].detach(), output[1].detach()
        if y.shape != y_pred.shape:
            # (N, 1) against (N,) is the common case: compare element by element, as Ignite does,
            # where F.mse_loss would broadcast to (N, N) and warn
            if y.numel() != y_pred.numel():
                raise ValueError(f"{type(self).__name__}: y_pred has shape {tuple(y_pred.shape)} "
                                 f"but y has shape {tuple(y.shape)}; they need the same number of elements")
            y = y.reshape(y_pred.shape)
        total = self._error(y_pred - y).sum(dtype=self._sum_of_errors.dtype)
        self._sum_of_errors += total.to(metric_device(self))
        self._num_elements += y_pred.numel()

    @sync_all_reduce("_sum_of_errors", "_num_elements")
    def compute(self) -> float:
        if self._num_elements == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one example before it can be computed.")
        return self._sum_of_errors.item() / self._num_elements


class MeanSquaredError(_ElementwiseMean):
    """Mean of ``(y_pred - y) ** 2`` over every element: ``F.mse_loss`` on the whole loader.

    Ignite's own (``ignite.metrics.MeanSquaredError``) sums over each sample's features instead.
    """

    @staticmethod
    def _error(diff: torch.Tensor) -> torch.Tensor:
        return diff.square()


class MeanAbsoluteError(_ElementwiseMean):
    """Mean of ``abs(y_pred - y)`` over every element: ``F.l1_loss`` on the whole loader.

    Ignite's own (``ignite.metrics.MeanAbsoluteError``) sums over each sample's features instead.
    """

    @staticmethod
    def _error(diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()


class RootMeanSquaredError(MeanSquaredError):
    """Square root of :class:`MeanSquaredError`: ``F.mse_loss(...).sqrt()`` on the whole loader."""

    def compute(self) -> float:
        return math.sqrt(super().compute())


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


def check_metric_takes(metric: Metric, name: str, output: Any, step: str) -> None:
    """Feed ``output`` (one batch of a step) to a copy of ``metric``; a failure is a RecipeError that
    names the step, the metric, what the step returned and what the metric reads. The metric itself
    is untouched.

    Example:
        >>> check_metric_takes(Accuracy(), "accuracy", {"y_pred": torch.zeros(2, 3)}, "'evaluate'")
        Traceback (most recent call last):
        ...
        engineflow.errors.RecipeError: metric 'accuracy' (Accuracy) cannot take what eval step 'evaluate' returned ...
    """
    probe = copy.deepcopy(metric)
    probe.reset()
    try:
        probe.iteration_completed(SimpleNamespace(state=SimpleNamespace(output=output)))  # type: ignore[arg-type]
        probe.compute()
    except Exception as err:
        keys = metric.required_output_keys
        reads = f"reads {' and '.join(map(repr, keys))} from the step's dict" if keys else "reads the step's output"
        raise RecipeError(
            f"metric {name!r} ({type(metric).__name__}) cannot take what eval step {step} returned "
            f"({describe_output(output)}): {type(err).__name__}: {err}. The metric {reads}; for "
            f"{type(metric).__name__}, y_pred and y are typically (batch, classes) scores and (batch,) labels, "
            "or tensors of one shape for regression metrics"
        ) from None


def describe_output(output: Any) -> str:
    """``{'y_pred': float32[4, 10], 'y': int64[4]}``: what a step returned, shapes instead of values.

    Example:
        >>> describe_output({"y_pred": torch.zeros(4, 10), "y": torch.zeros(4, dtype=torch.long), "n": 3})
        "{'y_pred': float32[4, 10], 'y': int64[4], 'n': int}"
    """
    if isinstance(output, torch.Tensor):
        return f"{str(output.dtype).removeprefix('torch.')}[{', '.join(map(str, output.shape))}]"
    if isinstance(output, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_output(v)}" for k, v in output.items()) + "}"
    if isinstance(output, (tuple, list)):
        inner = ", ".join(describe_output(v) for v in output)
        return f"({inner})" if isinstance(output, tuple) else f"[{inner}]"
    return type(output).__name__
