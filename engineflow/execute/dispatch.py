"""Attaching handlers to a StepEngine: in an explicit order, with injection by name, one dispatcher
per event.

Handlers on one event run by ascending ``order``, then in declaration order (Ignite itself runs
them in registration order). A handler gets what it asks for by name; on events that carry values
(``EXCEPTION_RAISED``, ``TERMINATE_SINGLE_EPOCH``, the recipe's own events) it gets those too, as
Ignite delivers them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ignite.engine import Events, State

from engineflow.declare.control import ControlFlow, StopFit
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import EngineflowError, HandlerError, RecipeError
from engineflow.execute.injection import describe, make_caller
from engineflow.execute.notes import add_note

if TYPE_CHECKING:
    from engineflow.execute.engine import StepEngine

HANDLER_DYNAMIC = ("engine", "state", "output", "metrics", "batch")

# What Ignite passes to the handlers of its events that carry arguments, after the engine: positional
# values (named here for injection) and keyword values.
EVENT_ARGUMENTS: dict[Any, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Events.EXCEPTION_RAISED: (("exception",), ()),
    Events.TERMINATE_SINGLE_EPOCH: ((), ("iter_counter",)),
}


def wrap_handler(spec: HandlerSpec, provided: Mapping[str, Any], base: Any = None) -> Callable[..., None]:
    """``fn(engine, *event_args, **event_kwargs)`` for one handler spec; its parameters are checked now.

    ``base`` is the unfiltered event the handler runs on. Besides the names every handler may ask for,
    a handler of an event with arguments gets them as Ignite gives them: by the names of
    :data:`EVENT_ARGUMENTS` (``exception``, ``iter_counter``), and the event's positional values also fill,
    in order, parameters nothing else provides (an Ignite-style ``def cleanup(engine, e)``). On events
    of the recipe's own (``register_events``), every such parameter takes the event's values.

    StopFit lets the other handlers of the event run; any other error is re-raised as a
    :class:`HandlerError` naming the handler, the event and where the fit stood.
    """
    if spec.raw:
        return spec.fn
    positional, keywords = EVENT_ARGUMENTS.get(base, ((), ()))
    known = {*provided, *HANDLER_DYNAMIC, *positional, *keywords}
    unnamed = [p.name for p in _parameters(spec.fn) if p.name not in known and p.default is p.empty]
    slots = tuple(unnamed if base is not None and not isinstance(base, Events) else unnamed[:len(positional)])
    call = make_caller(spec.fn, provided=provided, dynamic=(*HANDLER_DYNAMIC, *positional, *keywords, *slots),
                       what="handler")
    label = f"{spec.event if base is None else base} of the {spec.engine} engine"
    fn = spec.fn

    def handler(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
        state = engine.state
        values = {"engine": engine, "state": state, "output": state.output, "metrics": state.metrics,
                  "batch": state.batch}
        if args or kwargs:
            values.update(kwargs)
            values.update(zip(positional, args, strict=False))
            values.update(zip([slot for slot in slots if slot not in kwargs], args, strict=False))
        missing = [slot for slot in slots if slot not in values]
        if missing:
            raise RecipeError(f"handler {describe(fn)} asks for {', '.join(map(repr, missing))} on {label}, "
                              f"which fired with {len(args)} value(s) and keywords {sorted(kwargs)}")
        try:
            call(values)
        except StopFit:
            engine.stop_fit()  # the other handlers of this event still run
        except (ControlFlow, EngineflowError):
            raise
        except Exception as err:
            raise HandlerError(
                f"handler {describe(fn)} failed on {label} (epoch {state.epoch}, iteration "
                f"{state.iteration}): {type(err).__name__}: {err}"
            ) from err

    return handler


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []  # make_caller reports an unreadable signature
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def attach_in_order(engine: StepEngine, specs: Iterable[HandlerSpec], provided: Mapping[str, Any], *,
                    before: tuple[int, int] = (0, 0)) -> None:
    """Attach handlers so that each event runs them by (order, declaration).

    ``before`` is (iterations, epochs) of the pipeline's stages before this engine's: the filters
    of the recipe's pipeline-wide handlers (``stage=None``) count from there, so
    ``every_n_iterations(100)`` keeps its rhythm across stages; a stage's own handlers and
    engineflow's (``raw``) count the engine's own events.

    One Ignite handler per event dispatches to all of that event's specs and checks their
    filters inline: a handler that is not due costs a modulo, not a call through Ignite's filter
    wrapper. Handlers of ``EXCEPTION_RAISED`` are cleanup: each runs even if an earlier one
    failed, and the error that ended the run is still raised afterwards (see
    :meth:`StepEngine.handle_exception`).
    """
    by_event: dict[Any, list[tuple[Callable[..., None], Any, int | None, int]]] = {}
    for spec in sorted(specs, key=lambda s: (s.order, s.seq)):
        base, event_filter = _split(engine, spec.event)
        if (event_filter is not None or spec.every) and base not in State.event_to_attr:
            raise RecipeError(
                f"handler {describe(spec.fn)}: {base} keeps no count of its own, so it takes no filter "
                "(every=, once=, before=, after=); attach it to the plain event and test the state inside"
            )
        handler = wrap_handler(spec, provided, base)
        # engineflow's own handlers (validation every N epochs...) and a stage's own count the stage's events
        counts = (0, 0) if spec.stage is not None or spec.raw else before
        offset = counts[0] if State.event_to_attr.get(base) == "iteration" else counts[1]
        by_event.setdefault(base, []).append((handler, None if spec.every else event_filter, spec.every, offset))
        if spec.at_start:
            by_event.setdefault(Events.STARTED, []).append(
                (lambda e, h=handler, first=counts[1]: h(e) if e.state.epoch + first == 0 else None, None, None, 0))
    for base, entries in by_event.items():
        if base == Events.EXCEPTION_RAISED:
            engine.reraise_after_cleanup = True
        engine.add_event_handler(base, _dispatcher(base, entries))


def _split(engine: StepEngine, event: Any) -> tuple[Any, Callable[[Any, int], bool] | None]:
    """The unfiltered event an (optionally filtered) Ignite event belongs to, and its filter."""
    from ignite.engine.events import CallableEventWithFilter

    event_filter = event.filter if isinstance(event, CallableEventWithFilter) else None
    for allowed in engine.allowed_events():
        if allowed == event:  # Ignite's events compare equal to their filtered forms
            return allowed, event_filter
    raise RecipeError(f"event {event} is not one the {engine.kind} engine fires")


def _dispatcher(base: Any, entries: list[tuple[Callable[..., None], Any, int | None, int]]) -> Callable[..., None]:
    if base == Events.EXCEPTION_RAISED:
        handlers = [h for h, _, _, _ in entries]

        def clean_up(engine: StepEngine, error: BaseException, *args: Any, **kwargs: Any) -> None:
            # A handler's error reaches cleanups as the handler raised it (as in plain Ignite), not
            # in the HandlerError that names the handler for the report.
            delivered = error.__cause__ if isinstance(error, HandlerError) and error.__cause__ is not None else error
            for handler in handlers:
                try:
                    handler(engine, delivered, *args, **kwargs)
                except Exception as failed:  # the next cleanup still runs; the run's error stays the error
                    add_note(error, f"while handling it: {failed}")

        return clean_up
    takes_values = base in EVENT_ARGUMENTS or not isinstance(base, Events)
    if all(event_filter is None and every is None for _, event_filter, every, _ in entries):
        handlers = [h for h, _, _, _ in entries]
        if takes_values:

            def run_all_with_values(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
                for handler in handlers:
                    handler(engine, *args, **kwargs)

            return run_all_with_values

        def run_all(engine: StepEngine) -> None:
            for handler in handlers:
                handler(engine)

        return run_all

    def dispatch(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
        value = engine.state.get_event_attrib_value(base)
        for handler, event_filter, every, offset in entries:
            if every is not None:
                if (value + offset) % every:
                    continue
            elif event_filter is not None and not event_filter(engine, value + offset):
                continue
            handler(engine, *args, **kwargs)

    return dispatch
