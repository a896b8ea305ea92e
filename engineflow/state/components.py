"""Finding a fit's components by what they are: modules, and objects with a ``state_dict``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def find_components(components: Mapping[str, Any], keep: Callable[[Any], bool]) -> dict[str, Any]:
    """The components ``keep`` accepts, by name; a dict of components (a GAN's models, the loaders)
    gives ``name.key`` entries."""
    found: dict[str, Any] = {}
    for name, value in components.items():
        if keep(value):
            found[name] = value
        elif isinstance(value, Mapping):
            found.update({f"{name}.{k}": v for k, v in value.items() if keep(v)})
    return found


def stateful_components(components: Mapping[str, Any]) -> dict[str, Any]:
    """Every component with ``state_dict``/``load_state_dict``, by name (``loaders.train``...).

    That is how a recipe registers its own stateful objects: return them from ``setup``.
    """
    return find_components(components, is_stateful)


def is_stateful(value: Any) -> bool:
    """Whether ``value`` can be checkpointed: it has ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def modules_of(components: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The ``nn.Module`` components by name; a dict of modules gives ``name.key`` entries."""
    return find_components(components, lambda value: isinstance(value, torch.nn.Module))


def component_states(components: Mapping[str, Any]) -> dict[str, Any]:
    """The states of the stateful components, and which parameters of each module train.

    ``requires_grad`` is part of it: a model frozen or unfrozen part-way must resume the same.
    """
    return {"components": {name: obj.state_dict() for name, obj in stateful_components(components).items()},
            "requires_grad": {name: [p.requires_grad for p in module.parameters()]
                              for name, module in modules_of(components).items()}}


def load_component_states(components: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Load what :func:`component_states` returned into ``components`` (the same names and structure).

    Raises:
        KeyError: the state has no entry for a stateful component (its name is the error's argument).
    """
    saved = state["components"]
    for name, obj in stateful_components(components).items():
        if name not in saved:
            raise KeyError(name)
        obj.load_state_dict(saved[name])
    for name, flags in state.get("requires_grad", {}).items():  # absent from older checkpoints
        module = modules_of(components).get(name)
        if module is not None:
            for param, flag in zip(module.parameters(), flags, strict=True):
                param.requires_grad_(flag)
