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


def trainable(modules: Mapping[str, torch.nn.Module]) -> dict[str, list[bool]]:
    """Which parameters of each module train (``requires_grad``), in ``parameters()`` order."""
    return {name: [p.requires_grad for p in module.parameters()] for name, module in modules.items()}


def set_trainable(modules: Mapping[str, torch.nn.Module], flags: Mapping[str, list[bool]], *,
                  strict: bool = True) -> None:
    """Set ``requires_grad`` of each module's parameters as ``flags`` (:func:`trainable`'s) has them.
    Modules it does not name are left as they are; ``strict=False`` also leaves those with another
    number of parameters (another structure) instead of raising."""
    for name, module in modules.items():
        wanted, params = flags.get(name), list(module.parameters())
        if wanted is None or (not strict and len(wanted) != len(params)):
            continue
        for param, flag in zip(params, wanted, strict=True):
            param.requires_grad_(bool(flag))


def component_states(components: Mapping[str, Any]) -> dict[str, Any]:
    """The ``state_dict`` of every stateful component, by name (see :func:`stateful_components`)."""
    return {name: obj.state_dict() for name, obj in stateful_components(components).items()}


def load_component_states(components: Mapping[str, Any], saved: Mapping[str, Any],
                          requires_grad: Mapping[str, list[bool]]) -> None:
    """Load what :func:`component_states` returned into ``components`` (the same names and structure),
    and which parameters of each module train (``requires_grad``, :func:`trainable`'s; a module it
    does not name is left as it is).

    Raises:
        KeyError: ``saved`` has no entry for a stateful component (its name is the error's argument).
    """
    for name, obj in stateful_components(components).items():
        if name not in saved:
            raise KeyError(name)
        obj.load_state_dict(saved[name])
    set_trainable(modules_of(components), requires_grad)
