"""Handler decorators: attach functions to engine events, in an explicit order.

A handler is a plain function that takes what it needs by name: ``engine``, ``state``,
``output``, ``metrics``, ``batch``, ``cfg``, ``history``, ``best``, ``evaluate`` and every
component ``setup`` returned. The decorators return the function unchanged and record a
:class:`HandlerSpec`; engineflow attaches it when it builds the engines.

Order: handlers on the same event run by ascending ``order``, then in the order they were
declared. engineflow's own handlers use fixed orders so that yours (default ``order=0``) see finished
work: :mod:`engineflow.declare.orders` names each one, with its reason.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar, overload

from engineflow.declare.orders import USER
from engineflow.declare.steps import STEP_KINDS, step_spec
from engineflow.errors import RecipeError

if TYPE_CHECKING:
    from ignite.engine.events import RemovableEventHandle

HANDLERS_ATTR = "__engineflow_handlers__"
F = TypeVar("F", bound=Callable[..., Any])

# Declaration order breaks ties between handlers of equal ``order``.
_declared = itertools.count()


@dataclass(frozen=True)
class HandlerSpec:
    """One attachment of a handler function to an event of one engine.

    Attributes:
        fn: the user's function, unchanged.
        event: an Ignite event, possibly filtered (``Events.ITERATION_COMPLETED(every=10)``).
        engine: which engine: "train", "eval" or "infer".
        order: lower runs first among handlers of the same event.
        seq: declaration counter, the tie-break for equal ``order``.
        at_start: also call once when the engine starts at epoch 0 (``skip_zero=False``).
        raw: engineflow's own handlers: ``fn(engine)`` is attached as is, with no injection.
        stage: in a pipeline, the one stage it attaches to; None: every stage (pipeline-wide).
        step: when ``engine=`` named a step function, that step: it attaches only where it runs.
    """

    fn: Callable[..., Any]
    event: Any
    engine: str
    order: int
    seq: int
    at_start: bool = False
    raw: bool = False
    stage: str | None = None
    step: Callable[..., Any] | None = None


def handler_specs(fn: Any) -> tuple[HandlerSpec, ...]:
    """Every :class:`HandlerSpec` the decorators attached to ``fn`` (empty for plain functions).

    On a wrapper that copied a decorated function's attributes (``functools.wraps``) the specs name
    the wrapper, which is what runs.
    """
    specs = getattr(fn, HANDLERS_ATTR, ())
    return tuple(spec if spec.fn is fn else replace(spec, fn=fn) for spec in specs)


def _engine_kind(engine: Any, where: str) -> tuple[str, Callable[..., Any] | None]:
    """The engine kind ``engine=`` names, and the step function when it named one."""
    if isinstance(engine, str) and engine in STEP_KINDS:
        return engine, None
    spec = step_spec(engine)
    if spec is not None:
        return spec.kind, spec.fn
    raise RecipeError(
        f"{where}(engine=...) expects a step function (e.g. engine=train) or one of "
        f"{', '.join(map(repr, STEP_KINDS))}, got {engine!r}"
    )


def _register(fn: F, spec: HandlerSpec) -> F:
    if not callable(fn):
        raise RecipeError(f"a handler decorator needs a function, got {fn!r}")
    setattr(fn, HANDLERS_ATTR, (*handler_specs(fn), spec))
    return fn


@overload
def on(event: Any, fn: None = None, *, engine: Any = "train", order: int = USER,
       stage: str | None = None) -> Callable[[F], F]: ...


@overload
def on(event: Any, fn: Callable[..., Any], *, engine: Any, order: int = USER,
       stage: None = None) -> RemovableEventHandle: ...


def on(event: Any, fn: Callable[..., Any] | None = None, *, engine: Any = "train", order: int = USER,
       stage: str | None = None) -> Any:
    """Run the decorated function on an Ignite event of an engine (default: the train engine).

    In a pipeline (a recipe with ``stages``) the handler runs in every stage, or only in ``stage``;
    ``engine=`` given a step function attaches it only to the stages that run that step.

    Ignite's event filters work as in Ignite: ``Events.ITERATION_COMPLETED(every=10)``,
    ``Events.EPOCH_COMPLETED(once=3)``, ``before=``/``after=``, or a custom ``event_filter``.

    Given an engine engineflow built (``fit.train``, ``fit.eval``, ``ef.engine(...)``), ``engine=``
    attaches now, as Ignite's ``add_event_handler`` does: ``ef.on(event, fn, engine=...)`` returns a
    removable handle (``handle.remove()``, or ``with`` it), and the decorator form returns the function
    unchanged. The handler takes its place by ``order`` among those attached already, is given what
    the engine's other handlers are given, and its filter counts the engine's own events.

    Example:
        >>> import engineflow as ef
        >>> @ef.on(ef.Events.ITERATION_COMPLETED(every=100), order=-5)
        ... def log_lr(optimizer, state):
        ...     print(state.iteration, optimizer.param_groups[0]["lr"])

        >>> @ef.eval_step
        ... def check(batch):
        ...     return {"y_pred": batch, "y": batch}
        >>> evaluator = ef.engine(check)
        >>> handle = ef.on(ef.Events.ITERATION_COMPLETED, lambda state: print(state.iteration), engine=evaluator)
        >>> _ = evaluator.run([1, 2])
        1
        2
        >>> handle.remove()
        >>> _ = evaluator.run([1, 2])
    """
    _check_event(event)
    _check_order(order)
    if _is_built_engine(engine):
        if stage is not None:
            raise RecipeError("on(..., stage=...) declares a handler of a recipe's stage; a built engine "
                              f"(engine={engine!r}) is one stage's already: leave stage= out")
        if fn is not None:
            return _attach_now(engine, fn, event, order)
        return lambda fn: (_attach_now(engine, fn, event, order), fn)[1]
    kind, step = _engine_kind(engine, "on")
    _check_stage(stage, "on")
    if fn is not None:
        raise RecipeError(
            f"on(event, {getattr(fn, '__name__', fn)!r}) attaches a function now, so it needs an engine engineflow "
            "built: engine=fit.train, fit.eval or an ef.engine(...); to declare a recipe's handler, decorate it "
            "with @ef.on(event)"
        )
    return lambda fn: _register(fn, HandlerSpec(fn, event, kind, order, next(_declared), stage=stage, step=step))


def _is_built_engine(engine: Any) -> bool:
    """A StepEngine (engineflow.execute.engine), known by its ``attach``: this layer does not import it."""
    from ignite.engine import Engine

    return isinstance(engine, Engine) and callable(getattr(engine, "attach", None))


def _attach_now(engine: Any, fn: Any, event: Any, order: int) -> RemovableEventHandle:
    if not callable(fn):
        raise RecipeError(f"on(event, fn, engine=...) needs a function, got {fn!r}")
    handle: RemovableEventHandle = engine.attach(HandlerSpec(fn, event, engine.kind, order, next(_declared)))[0]
    return handle


def every_n_epochs(n: int, *, engine: Any = "train", skip_zero: bool = True, order: int = USER,
                   stage: str | None = None) -> Callable[[F], F]:
    """Run the decorated function after every ``n``-th epoch (sugar for ``EPOCH_COMPLETED(every=n)``).

    With ``skip_zero=False`` it also runs once before the first epoch ("epoch 0"), e.g. to log the
    untrained model. A resumed run does not repeat that call. In a pipeline, epochs count across
    stages (the pipeline's epoch), or within ``stage`` for a handler of one stage.

    Example:
        >>> import engineflow as ef
        >>> @ef.every_n_epochs(2, skip_zero=False)
        ... def log_weights(state, model):
        ...     print(state.epoch, sum(p.norm() for p in model.parameters()))
    """
    kind, step = _engine_kind(engine, "every_n_epochs")
    _check_positive(n, "every_n_epochs")
    _check_order(order)
    _check_stage(stage, "every_n_epochs")

    def decorate(fn: F) -> F:
        spec = HandlerSpec(fn, _every("EPOCH_COMPLETED", n), kind, order, next(_declared), at_start=not skip_zero,
                           stage=stage, step=step)
        return _register(fn, spec)

    return decorate


def every_n_iterations(n: int, *, engine: Any = "train", order: int = USER,
                       stage: str | None = None) -> Callable[[F], F]:
    """Run the decorated function after every ``n``-th iteration (``ITERATION_COMPLETED(every=n)``).

    Iterations count from the start of the run, across epochs, as Ignite counts them; in a
    pipeline, across stages (the pipeline's iteration), or within ``stage`` for a handler of one stage.

    Example:
        >>> import engineflow as ef
        >>> @ef.every_n_iterations(50)
        ... def log_loss(output, state):
        ...     print(state.iteration, float(output["loss"]))
    """
    kind, step = _engine_kind(engine, "every_n_iterations")
    _check_positive(n, "every_n_iterations")
    _check_order(order)
    _check_stage(stage, "every_n_iterations")

    return lambda fn: _register(
        fn, HandlerSpec(fn, _every("ITERATION_COMPLETED", n), kind, order, next(_declared), stage=stage,
                        step=step))


@functools.cache
def _every(event: str, n: int) -> Any:
    """Ignite's ``Events.<event>(every=n)``, one object for each schedule: the handlers that share it are
    asked about it once per event (see :func:`engineflow.execute.dispatch.attach_in_order`)."""
    from ignite.engine import Events

    return getattr(Events, event)(every=n)


def _check_positive(n: Any, where: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RecipeError(f"{where}(n) expects a whole number >= 1, got {n!r}")


def _check_stage(stage: Any, where: str) -> None:
    if stage is not None and (not isinstance(stage, str) or not stage.isidentifier()):
        raise RecipeError(f"{where}(stage=...) expects the name of one of the recipe's stages, got {stage!r}")


def _check_order(order: Any) -> None:
    if isinstance(order, bool) or not isinstance(order, int):
        raise RecipeError(f"order= expects an int (lower runs first), got {order!r}")


def _check_event(event: Any) -> None:
    from ignite.engine.events import CallableEventWithFilter, EventEnum

    if not isinstance(event, (EventEnum, CallableEventWithFilter)):
        raise RecipeError(
            f"on(event) expects an Ignite event such as ef.Events.EPOCH_COMPLETED or "
            f"ef.Events.ITERATION_COMPLETED(every=10), got {event!r}"
        )
