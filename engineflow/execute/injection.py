"""Pass components to user functions by parameter name, like pytest fixtures.

A user function (a step, a handler, ``setup``) declares what it needs as parameter names.
:func:`make_caller` checks those names once, when the function is attached, and returns a
cheap caller for the hot path; a name nobody provides is a :class:`RecipeError` that lists
what is available.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from engineflow.errors import RecipeError

# The names engineflow itself gives steps, handlers, setup() and a stage's prepare: a component
# returned under one of them would be silently shadowed, or would shadow engineflow's own.
PROVIDED_NAMES = {
    "cfg": "the run's config", "device": "the device the run trains on", "run": "the run's id, folder and world",
    "batch": "the current batch", "engine": "the Ignite engine", "state": "the engine's state",
    "output": "the step's output", "metrics": "the epoch's metrics", "history": "every epoch's metrics",
    "best": "the best epoch", "evaluate": "the function that evaluates a loader",
    "pipeline": "where a pipeline stands", "exception": "the error that ends a run",
    "iter_counter": "the iteration count of TERMINATE_SINGLE_EPOCH",
    "backprop": "the train step's backward pass and optimizer steps under its step options",
}


def check_component_names(names: Iterable[Any], what: str) -> None:
    """Refuse component names that no parameter could ask for, or that engineflow provides itself.

    Example:
        >>> check_component_names(["model", "optimizer"], "setup")
        >>> try:
        ...     check_component_names(["device"], "setup")
        ... except RecipeError as err:
        ...     print(err)
        setup returned 'device', a name engineflow provides itself (the device the run trains on); give the ...
    """
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise RecipeError(f"{what} returned the key {name!r}; steps and handlers ask for components by parameter "
                              "name, so each key must be a Python identifier (e.g. 'encoder')")
        if name in PROVIDED_NAMES:
            raise RecipeError(f"{what} returned {name!r}, a name engineflow provides itself "
                              f"({PROVIDED_NAMES[name]}); give the component another name")


def describe(fn: Callable[..., Any]) -> str:
    """``'train' (recipes/digits.py:31)``: how errors name a user function."""
    fn = inspect.unwrap(fn)
    name = getattr(fn, "__qualname__", repr(fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return repr(name)
    return f"{name!r} ({code.co_filename}:{code.co_firstlineno})"


def make_caller(
    fn: Callable[..., Any],
    *,
    provided: Mapping[str, Any],
    dynamic: Collection[str] = (),
    first_gets: str | None = None,
    what: str = "function",
) -> Callable[[Mapping[str, Any]], Any]:
    """Bind ``fn``'s parameters to ``provided`` values and ``dynamic`` names given per call.

    Args:
        fn: the user function.
        provided: values fixed for the life of the caller (components from ``setup``, ``cfg``...).
        dynamic: names whose values change per call (``batch``, ``state``...), passed to the caller.
        first_gets: a dynamic name that goes to the first parameter when no parameter has its name
            (an infer step may call its input ``x``).
        what: how to name ``fn`` in errors ("train step", "handler").

    Returns:
        ``call(dynamic_values)`` that calls ``fn`` with every parameter it asked for.

    Example:
        >>> call = make_caller(lambda batch, scale: batch * scale, provided={"scale": 2}, dynamic=["batch"])
        >>> call({"batch": 21})
        42
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{what} {describe(fn)}: cannot read its signature ({err})") from None
    available = set(provided) | set(dynamic)
    static: dict[str, Any] = {}
    from_dynamic: list[tuple[str, str]] = []  # (parameter, dynamic name)
    takes_all = False
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for index, param in enumerate(params):
        if param.kind is param.VAR_KEYWORD:
            takes_all = True
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise RecipeError(
                f"{what} {describe(fn)}: parameter {param.name!r} is positional-only; engineflow passes "
                "components by name, so remove the '/' from the signature"
            )
        name = param.name
        if index == 0 and first_gets is not None and first_gets not in names and name not in available:
            from_dynamic.append((name, first_gets))
        elif name in dynamic:
            from_dynamic.append((name, name))
        elif name in provided:
            static[name] = provided[name]
        elif param.default is param.empty:
            raise RecipeError(
                f"{what} {describe(fn)} asks for {name!r}, which nothing provides. "
                f"Available: {', '.join(sorted(available))}. Return {name!r} from setup() "
                "or rename the parameter."
            )
    if takes_all:
        for name, value in provided.items():
            if name not in static and name not in names:
                static[name] = value
        from_dynamic.extend((n, n) for n in dynamic if n not in names)
    return _caller(fn, static, tuple(from_dynamic))


def _caller(
    fn: Callable[..., Any], static: dict[str, Any], from_dynamic: tuple[tuple[str, str], ...]
) -> Callable[[Mapping[str, Any]], Any]:
    # Specialised closures: the hot path (one batch parameter) does no loop per call.
    if not from_dynamic:
        return lambda values: fn(**static)
    if len(from_dynamic) == 1:
        ((param, source),) = from_dynamic
        return lambda values: fn(**{param: values[source]}, **static)
    return lambda values: fn(**{p: values[s] for p, s in from_dynamic}, **static)
