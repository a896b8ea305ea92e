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
