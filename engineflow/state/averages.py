"""An exponential moving average of a module's weights: its state, and where checkpoints and weights
files keep it.

:class:`WeightAverage` holds, for one module component, a copy of every tensor of its
``state_dict`` (parameters and persistent buffers) and moves it towards the module's own at each
:meth:`~WeightAverage.update`::

    average = decay * average + (1 - decay) * weight     (floating-point tensors, as torch.lerp)
    average = weight                                     (integer and bool buffers: a step count)

Its :meth:`~WeightAverage.state_dict` is a registered part of a fit's checkpoints (``kind`` "ema");
the weights files (``best.pt``, ``last.pt``) hold the averages beside the weights, under ``"ema"``
(see :func:`file_weights`).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = model.weight.data.fill_(0.0)
    >>> average = WeightAverage("model")
    >>> _ = average.follow(model)
    >>> _ = model.weight.data.fill_(1.0)
    >>> average.update(0.75)
    >>> average.weights["weight"].item(), average.updates
    (0.25, 1)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from engineflow.errors import RecipeError

KIND = "ema"  # the ``kind`` of a WeightAverage's state among a checkpoint's parts


class WeightAverage:
    """The exponential moving average of one module component's weights.

    Attributes:
        component: the name of the module component it averages (``"model"``, ``"models.g"``).
        evaluated: whether validation evaluates the average instead of the module's own weights (then
            ``best.pt`` holds it as the module's weights).
        updates: how many updates it took since it started from a module's weights.
        weights: the average, by the module's ``state_dict`` names, on the module's device.
        buffers: the names of :attr:`weights` that average buffers (running statistics), not parameters.
    """

    def __init__(self, component: str, *, evaluated: bool = False) -> None:
        self.component = component
        self.evaluated = evaluated
        self.updates = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.buffers: list[str] = []
        self._source: dict[str, torch.Tensor] = {}
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (averages, weights)
        self._copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def follow(self, module: torch.nn.Module) -> bool:
        """Average ``module``'s weights from now on. The average goes on when it has the same names,
        shapes and dtypes as the module's ``state_dict`` (a pipeline's next stage); otherwise it starts
        again from the module's weights. Returns whether it started again."""
        # the live tensors, parameters included (a module's extra state is no tensor to average)
        source = {k: t for k, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
        same = list(source) == list(self.weights) and all(
            t.shape == self.weights[k].shape and t.dtype == self.weights[k].dtype for k, t in source.items())
        self._source = source
        if not same:
            self.weights = {k: t.detach().clone() for k, t in source.items()}
            self.updates = 0
        self.buffers = [k for k, t in source.items() if not isinstance(t, torch.nn.Parameter)]
        self._floats, self._copies = _split(self.weights, source)
        return not same

    def update(self, decay: float) -> None:
        """Move the average towards the module's weights: ``average + (1 - decay) * (weight - average)``
        for floating-point tensors (one fused call), a copy for the others; counts the update."""
        if not self._source:
            raise RuntimeError("WeightAverage.update() before follow(module): there is no module to average")
        with torch.no_grad():
            if self._floats[0]:  # torch's private foreach API, here only: one call for every tensor
                torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - decay)
            for average, weight in zip(*self._copies, strict=True):
                average.copy_(weight)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block, the module holds the average; its own weights are back afterwards, exactly,
        also when the block raises."""
        own = {k: t.detach().clone() for k, t in self._source.items()}
        with torch.no_grad():
            try:
                for k, t in self._source.items():
                    t.copy_(self.weights[k])
                yield
            finally:
                for k, t in self._source.items():
                    t.copy_(own[k])

    def state_dict(self) -> dict[str, Any]:
        """The average as a checkpoint holds it (the tensors themselves, not copies, as a module's)."""
        return {"kind": KIND, "component": self.component, "evaluated": self.evaluated,
                "updates": self.updates, "weights": dict(self.weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the average ``state`` holds (:meth:`state_dict`'s), into this one's tensors."""
        saved = state["weights"]
        if state.get("component") != self.component or list(saved) != list(self.weights):
            raise RecipeError(
                f"the checkpoint's EMA averages component {state.get('component')!r} ({len(saved)} tensors), but "
                f"this recipe's averages {self.component!r} ({len(self.weights)} tensors); did ef.ema(model=...) "
                "or the model change since the run started?")
        with torch.no_grad():
            for k, t in self.weights.items():
                t.copy_(saved[k])
        self.updates = int(state["updates"])


def _split(averages: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]
           ) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(floating-point averages, their weights), (the other averages, their weights)."""
    floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for k, average in averages.items():
        into = floats if average.is_floating_point() else copies
        into[0].append(average)
        into[1].append(source[k])
    return floats, copies


def is_average_state(state: Any) -> bool:
    """Whether a checkpoint part's ``state`` is a :class:`WeightAverage`'s."""
    return isinstance(state, Mapping) and state.get("kind") == KIND and isinstance(state.get("weights"), Mapping)


def average_states(parts: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The states of the weight averages among a fit's parts (live objects) or a checkpoint's parts
    (their states)."""
    states = (part.state_dict() if isinstance(part, WeightAverage) else part for part in parts.values())
    return [state for state in states if is_average_state(state)]


def file_weights(weights: Mapping[str, Any], averages: Iterable[Mapping[str, Any]], *,
                 best: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a weights file holds: the modules' ``weights`` (for ``best``, an average validation
    evaluated in place of its module's) and, beside them, each module's average (``"ema"``), both
    on CPU. Averages of modules not in ``weights`` are left out."""
    ema = {state["component"]: _on_cpu(state["weights"]) for state in averages if state["component"] in weights}
    chosen = {name: _on_cpu(states) for name, states in weights.items()}
    if best:
        for state in averages:
            if state.get("evaluated") and state["component"] in chosen:
                chosen[state["component"]] = ema[state["component"]]
    return chosen, ema


def _on_cpu(states: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in states.items()}
