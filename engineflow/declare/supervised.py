"""The default meta-algorithm for ``(x, y)`` batches, each piece replaceable.

Train: prepare (to device, non_blocking) -> forward -> loss -> backward -> optimizer step.
Eval:  prepare -> forward -> ``{"y_pred", "y", "loss"}`` for the metrics.

The pieces are plain functions; pass your own to change one without rewriting the step:

    >>> import engineflow as ef
    >>> train = ef.supervised_train_step(forward=lambda model, x: model(x.flatten(1)))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from engineflow.declare.steps import eval_step, train_step

if TYPE_CHECKING:
    from ignite.metrics import Metric


def prepare_batch(batch: Any, device: torch.device | str | None = None) -> tuple[Any, Any]:
    """Split a batch into ``(x, y)`` and move tensors to ``device`` with ``non_blocking=True``.

    Tensors inside lists, tuples and dicts move too. It is the default ``prepare`` of
    :func:`supervised_train_step` and :func:`supervised_eval_step`; a batch of another shape
    needs a ``prepare`` of its own, which can end in this one.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> x, y = ef.prepare_batch((torch.zeros(4, 3), torch.ones(4)), device="cpu")
        >>> x.shape, y.device
        (torch.Size([4, 3]), device(type='cpu'))
        >>> def prepare_dict(batch, device=None):  # batches of {"image": ..., "label": ...}
        ...     return ef.prepare_batch((batch["image"], batch["label"]), device)
        >>> train = ef.supervised_train_step(prepare=prepare_dict)
    """
    x, y = batch
    if device is None:
        return x, y
    return _to(x, device), _to(y, device)


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def forward(model: Callable[..., Any], x: Any) -> Any:
    """``model(x)``."""
    return model(x)


def compute_loss(loss_fn: Callable[..., Any], y_pred: Any, y: Any) -> torch.Tensor:
    """``loss_fn(y_pred, y)``."""
    return loss_fn(y_pred, y)


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()``."""
    loss.backward()


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` then ``zero_grad(set_to_none=True)``."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def supervised_train_step(
    *,
    prepare: Callable[..., tuple[Any, Any]] = prepare_batch,
    forward: Callable[[Any, Any], Any] = forward,
    loss: Callable[[Any, Any, Any], torch.Tensor] = compute_loss,
    backward: Callable[[torch.Tensor], None] = backward,
    update: Callable[[Any], None] = optimizer_step,
    metrics: Mapping[str, Metric] | None = None,
    precision: str | None = None,
    accumulate: int | str | None = None,
    clip_norm: float | str | None = None,
    clip_value: float | str | None = None,
    compile: bool | Mapping[str, Any] | None = None,
    channels_last: bool | None = None,
) -> Callable[..., dict[str, Any]]:
    """A train step for ``(x, y)`` batches that uses ``model``, ``optimizer`` and ``loss_fn`` from setup.

    Returns ``{"loss", "y_pred", "y"}`` (detached), so train metrics can be attached too. The step
    options after ``metrics`` are :func:`engineflow.train_step`'s. In a fit (or given a ``backprop``,
    e.g. ``ef.backprop(accumulate=4)``) the step ends with ``backprop(loss, optimizer)``, which honours
    them; called without one it runs ``backward`` then ``update``. A ``backward`` or ``update`` of your
    own is always called as it is.

    Example:
        >>> import torch, engineflow as ef
        >>> model = torch.nn.Linear(2, 1)
        >>> step = ef.supervised_train_step()
        >>> out = step((torch.ones(4, 2), torch.zeros(4, 1)), model, torch.optim.SGD(model.parameters(), 0.1),
        ...            torch.nn.functional.mse_loss)
        >>> sorted(out)
        ['loss', 'y', 'y_pred']
    """
    prepare_, forward_, loss_, backward_, update_ = prepare, forward, loss, backward, update
    own_pieces = backward is not _default_backward or update is not _default_update

    def train(batch: Any, model: Any, optimizer: Any, loss_fn: Any, device: Any = None,
              backprop: Any = None) -> dict[str, Any]:
        x, y = prepare_(batch, device)
        if backprop is not None and backprop.options.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y_pred = forward_(model, x)
        value = loss_(loss_fn, y_pred, y)
        if backprop is None or own_pieces:
            backward_(value)
            update_(optimizer)
        else:
            backprop(value, optimizer)
        return {"loss": value.detach(), "y_pred": y_pred.detach(), "y": y}

    return train_step(train, metrics=metrics, precision=precision, accumulate=accumulate, clip_norm=clip_norm,
                      clip_value=clip_value, compile=compile, channels_last=channels_last)


_default_backward, _default_update = backward, optimizer_step


def supervised_eval_step(
    *,
    prepare: Callable[..., tuple[Any, Any]] = prepare_batch,
    forward: Callable[[Any, Any], Any] = forward,
    metrics: Mapping[str, Metric] | None = None,
    every: int = 1,
    loaders: tuple[str, ...] | list[str] | None = None,
    main_metric: str | None = None,
    mode: str | None = None,
) -> Callable[..., dict[str, Any]]:
    """An eval step for ``(x, y)`` batches: ``{"y_pred": model(x), "y": y}`` for the metrics.

    The options after ``forward`` are :func:`engineflow.eval_step`'s.

    Example:
        >>> import engineflow as ef
        >>> evaluate = ef.supervised_eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
    """
    prepare_, forward_ = prepare, forward

    def evaluate(batch: Any, model: Any, device: Any = None) -> dict[str, Any]:
        x, y = prepare_(batch, device)
        return {"y_pred": forward_(model, x), "y": y}

    return eval_step(evaluate, metrics=metrics, every=every, loaders=loaders, main_metric=main_metric, mode=mode)
