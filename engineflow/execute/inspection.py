"""Seeing the model: its parameters at the start of a run, the gradients' norm by iteration.

:func:`model_summary` counts the parameters of each module component and of its top-level children
(the run prints it and keeps it in ``run.json`` as ``model``). :func:`grad_norm_handlers` shows the
total L2 norm of the trainable parameters' gradients in TensorBoard (``iteration/train/grad_norm``)
after each iteration whose optimizers stepped, in a recorded run: on the CPU each iteration; on
another device the norms stay there and are read back together every :data:`READ_BACK_EVERY`
iterations (and at the epoch's end), so that no step waits for the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.execute.learning_rates import optimizers_stepped
from engineflow.state.components import modules_of

if TYPE_CHECKING:
    from engineflow.execute.engine import StepEngine
    from engineflow.execute.fit import Fit

READ_BACK_EVERY = 20  # gradient norms kept on an accelerator between two read-backs
GRAD_NORM = "train/grad_norm"


def _counts(parameters: list[torch.nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def model_summary(components: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of every module component and of its top-level children: ``parameters`` and
    ``trainable`` (each counted once, however many components share it), and ``modules``: one entry
    per component (``name``, ``type``, ``parameters``, ``trainable``, ``children``: the same for each
    top-level child, by its attribute name).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model[0].requires_grad_(False)
        Linear(in_features=4, out_features=8, bias=True)
        >>> summary = model_summary({"model": model, "lr": 0.1})
        >>> summary["parameters"], summary["trainable"]
        (58, 18)
        >>> [(c["name"], c["type"], c["parameters"], c["trainable"]) for c in summary["modules"][0]["children"]]
        [('0', 'Linear', 40, 0), ('1', 'ReLU', 0, 0), ('2', 'Linear', 18, 18)]
    """
    entries, seen = [], {}
    for name, module in modules_of(components).items():
        params = list(module.parameters())
        seen.update((id(p), p) for p in params)
        total, trainable = _counts(params)
        children = []
        for child_name, child in module.named_children():
            child_total, child_trainable = _counts(list(child.parameters()))
            children.append({"name": child_name, "type": type(child).__name__, "parameters": child_total,
                             "trainable": child_trainable})
        entries.append({"name": name, "type": type(module).__name__, "parameters": total, "trainable": trainable,
                        "children": children})
    total, trainable = _counts(list(seen.values()))
    return {"parameters": total, "trainable": trainable, "modules": entries}


def grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """The total L2 norm of the gradients of the trainable ``parameters`` that have one, on their device
    (no read-back); None when none has a gradient.

    Example:
        >>> weight = torch.nn.Parameter(torch.ones(2))
        >>> grad_norm([weight]) is None
        True
        >>> weight.grad = torch.tensor([3.0, 4.0])
        >>> float(grad_norm([weight]))
        5.0
    """
    grads = [p.grad for p in parameters if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None and device.type != "cpu":  # its foreach kernels: fewer launches on an accelerator
        return total_norm([g.detach() for g in grads])
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()).to(device) for g in grads]))


def grad_norm_handlers(fit: Fit) -> list[HandlerSpec]:
    """Show the gradients' norm after each iteration whose optimizers stepped (a recorded run only)."""
    modules = modules_of(fit.components)
    if not modules:
        return []
    waiting: list[tuple[int, torch.Tensor]] = []

    def read_back() -> None:
        if waiting:
            values = torch.stack([norm for _, norm in waiting]).tolist()  # one transfer for them all
            for (iteration, _), value in zip(waiting, values, strict=True):
                fit.board.scalar(GRAD_NORM, value, iteration)
            waiting.clear()

    def iteration_completed(engine: StepEngine) -> None:
        if not fit.board.open or not optimizers_stepped(fit):
            return
        seen: dict[int, torch.nn.Parameter] = {}
        for module in modules.values():
            seen.update((id(p), p) for p in module.parameters())
        norm = grad_norm(list(seen.values()))
        if norm is None:
            return
        if norm.device.type == "cpu":
            fit.board.scalar(GRAD_NORM, norm, engine.state.iteration)
            return
        waiting.append((engine.state.iteration, norm))
        if len(waiting) >= READ_BACK_EVERY:
            read_back()

    def epoch_completed(engine: StepEngine) -> None:
        read_back()

    return [HandlerSpec(iteration_completed, Events.ITERATION_COMPLETED, "train", orders.GRAD_NORM, -1, raw=True),
            HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", orders.GRAD_NORM, -1, raw=True)]
