"""Toolbox declarations: objects a recipe declares at its top level (early stopping, an EMA of the
weights, activation statistics...) that attach handlers to the fit of each train stage and keep their
state in its checkpoints.

A tool is any object whose class sets ``__engineflow_tool__ = True`` and has:

- ``name``: its key among the fit's registered parts (:meth:`engineflow.Fit.register`); unique in a recipe;
- ``stage``: the one stage it acts in, or None for every train stage (one object across the
  pipeline, so what it keeps carries over from stage to stage);
- ``attach(fit)``: called once per fit it acts in, after the fit's engines are built; registers the
  tool's state with ``fit.register(name, ...)`` and returns the :class:`HandlerSpec` to attach
  (engineflow attaches them in order among the recipe's own).

The recipe names it at its top level, under any name::

    stop = ef.early_stopping(patience=5)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError

TOOL_ATTR = "__engineflow_tool__"


class Registers(Protocol):
    """What a tool is attached to: a fit (:class:`engineflow.Fit`), which keeps registered state."""

    def register(self, name: str, part: Any) -> None: ...


def is_tool(value: Any) -> bool:
    """Whether ``value`` is a toolbox declaration (its class sets ``__engineflow_tool__``)."""
    return getattr(type(value), TOOL_ATTR, False) is True


def collect_tools(values: Iterable[Any], stages: Iterable[str], where: str) -> tuple[Any, ...]:
    """The tools among a recipe module's top-level values, each once, checked: unique names, and a
    ``stage`` that is one of the recipe's stages."""
    tools: dict[int, Any] = {}
    for value in values:
        if is_tool(value):
            tools.setdefault(id(value), value)
    names, stage_names = {}, list(stages)
    for tool in tools.values():
        if tool.name in names:
            raise RecipeError(f"{where}: two toolbox declarations named {tool.name!r}; give one of them "
                              "another name= (each keeps its state in the checkpoints under its name)")
        names[tool.name] = tool
        if tool.stage is not None and tool.stage not in stage_names:
            which = (f"which is not one of the recipe's stages ({', '.join(stage_names)})" if stage_names
                     else "but the recipe declares no stages; drop stage= or declare stages = [ef.stage(...), ...]")
            raise RecipeError(f"{where}: {type(tool).__name__} {tool.name!r} is for stage {tool.stage!r}, {which}")
    return tuple(tools.values())


def tool_handlers(tools: Iterable[Any], fit: Registers, stage: str | None) -> list[HandlerSpec]:
    """Attach the tools that act in ``stage`` (None: a recipe without stages) to ``fit``; their handlers."""
    specs: list[HandlerSpec] = []
    for tool in tools:
        if tool.stage is None or tool.stage == stage:
            specs.extend(tool.attach(fit))
    return specs
