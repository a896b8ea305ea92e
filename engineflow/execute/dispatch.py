"""Attaching handlers to a StepEngine: in an explicit order, with injection by name, one dispatcher
per event.

Handlers on one event run by ascending ``order``, then in declaration order (Ignite itself runs
them in registration order). A handler gets what it asks for by name; on events that carry values
(``EXCEPTION_RAISED``, ``TERMINATE_SINGLE_EPOCH``, the recipe's own events) it gets those too, as
Ignite delivers them.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ignite.engine import Events, State
from ignite.engine.events import RemovableEventHandle

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


class HandlerHandle(RemovableEventHandle):
    """What attaching a handler returns, as Ignite's :meth:`~ignite.engine.engine.Engine.add_event_handler`
    does: :meth:`remove` detaches it (again: nothing); as a context manager it detaches on exit."""

    def __init__(self, engine: StepEngine, event: Any, entries: list[tuple[Any, _Entry]]) -> None:
        super().__init__(event, entries[0][1].handler, engine)
        self._entries = entries  # (base event, entry): a handler with at_start has two

    def remove(self) -> None:
        """Detach the handler: the events it was attached to no longer call it."""
        engine = self.engine()
        if engine is not None:
            engine.dispatch.remove(engine, self._entries)
        self._entries = []


class _Entry(NamedTuple):
    key: tuple[int, int]  # (order, declaration)
    handler: Callable[..., None]
    event_filter: Callable[[Any, int], bool] | None  # Ignite's filter of the event, or None
    offset: int  # added to the engine's count before the filter sees it


class Dispatch:
    """A :class:`StepEngine`'s handlers by event, each event's sorted by (order, declaration), and the one
    Ignite handler per event that runs them; also the names its handlers are given (``provided``)."""

    def __init__(self, provided: Mapping[str, Any]) -> None:
        self.entries: dict[Any, list[_Entry]] = {}
        self.registered: dict[Any, Callable[..., None]] = {}
        self.provided = provided

    def add(self, engine: StepEngine, placed: Iterable[tuple[Any, _Entry]]) -> None:
        changed = set()
        for base, entry in placed:
            entries = self.entries.setdefault(base, [])
            # after the equal keys already there: attach order breaks the remaining ties
            entries.insert(bisect.bisect_right([e.key for e in entries], entry.key), entry)
            changed.add(base)
        self._refresh(engine, changed)

    def remove(self, engine: StepEngine, placed: Iterable[tuple[Any, _Entry]]) -> None:
        changed = set()
        for base, entry in placed:
            entries = self.entries.get(base, [])
            for index, there in enumerate(entries):
                if there is entry:
                    del entries[index]
                    changed.add(base)
                    break
        self._refresh(engine, changed)

    def _refresh(self, engine: StepEngine, events: Iterable[Any]) -> None:
        """Rebuild each changed event's dispatcher in its place among the event's Ignite handlers."""
        for base in events:
            old, entries = self.registered.pop(base, None), self.entries.get(base)
            if not entries:
                self.entries.pop(base, None)
                if old is not None:
                    engine.remove_event_handler(old, base)
                continue
            new = self.registered[base] = _dispatcher(base, list(entries))
            if old is None:
                engine.add_event_handler(base, new)
            else:
                engine.replace_event_handler(base, old, new)
            if base == Events.EXCEPTION_RAISED:
                engine.reraise_after_cleanup = True


def attach_in_order(engine: StepEngine, specs: Iterable[HandlerSpec], provided: Mapping[str, Any], *,
                    before: tuple[int, int] = (0, 0)) -> list[HandlerHandle]:
    """Attach handlers so that each event runs them by (order, declaration); one handle per spec.

    ``before`` is (iterations, epochs) of the pipeline's stages before this engine's: the filters
    of the recipe's pipeline-wide handlers (``stage=None``) see the engine's count plus these, so
    ``every_n_iterations(100)`` keeps its rhythm across stages; a stage's own handlers and
    engineflow's (``raw``) see the engine's own count.

    Ignite's filters decide when a filtered handler runs (``every=``, ``once=``, ``before=``/``after=``,
    ``event_filter=``), called with that count. One Ignite handler per event calls them and runs the
    due handlers in order; handlers attached later (:func:`engineflow.on` given a function) join
    the same order. Handlers of ``EXCEPTION_RAISED`` are cleanup: each runs even if an earlier one
    failed, and the error that ended the run is still raised afterwards (see
    :meth:`StepEngine.handle_exception`).
    """
    engine.dispatch.provided = provided  # what a handler attached later is given (StepEngine.attach)
    placed: list[list[tuple[Any, _Entry]]] = []
    for spec in specs:
        base, event_filter = _split(engine, spec.event)
        if event_filter is not None and base not in State.event_to_attr:
            raise RecipeError(
                f"handler {describe(spec.fn)}: {base} keeps no count of its own, so it takes no filter "
                "(every=, once=, before=, after=); attach it to the plain event and test the state inside"
            )
        handler = wrap_handler(spec, provided, base)
        # engineflow's own handlers (validation every N epochs...) and a stage's own count the stage's events
        counts = (0, 0) if spec.stage is not None or spec.raw else before
        offset = counts[0] if State.event_to_attr.get(base) == "iteration" else counts[1]
        key = (spec.order, spec.seq)
        entries = [(base, _Entry(key, handler, event_filter, offset))]
        if spec.at_start:  # once, when the (pipeline's) epoch count is 0 as the engine starts
            entries.append((Events.STARTED, _Entry(key, handler, _at_epoch_zero, counts[1])))
        placed.append(entries)
    engine.dispatch.add(engine, [entry for entries in placed for entry in entries])
    return [HandlerHandle(engine, entries[0][0], entries) for entries in placed]


def _at_epoch_zero(engine: Any, epoch: int) -> bool:
    return epoch == 0


def _split(engine: StepEngine, event: Any) -> tuple[Any, Callable[[Any, int], bool] | None]:
    """The unfiltered event an (optionally filtered) Ignite event belongs to, and its filter."""
    from ignite.engine.events import CallableEventWithFilter

    event_filter = event.filter if isinstance(event, CallableEventWithFilter) else None
    for allowed in engine.allowed_events():
        if allowed == event:  # Ignite's events compare equal to their filtered forms
            return allowed, event_filter
    raise RecipeError(f"event {event} is not one the {engine.kind} engine fires")


def _dispatcher(base: Any, entries: list[_Entry]) -> Callable[..., None]:
    if base == Events.EXCEPTION_RAISED:
        handlers = [entry.handler for entry in entries]

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
    if all(entry.event_filter is None for entry in entries):
        handlers = [entry.handler for entry in entries]
        if takes_values:

            def run_all_with_values(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
                for handler in handlers:
                    handler(engine, *args, **kwargs)

            return run_all_with_values

        def run_all(engine: StepEngine) -> None:
            for handler in handlers:
                handler(engine)

        return run_all
    # Each distinct (filter, offset) is asked once per firing: handlers declared with the same schedule
    # (every_n_iterations(100) shares one filter) cost one call together.
    checks = list(dict.fromkeys((e.event_filter, e.offset) for e in entries if e.event_filter is not None))
    plan = [(e.handler, -1 if e.event_filter is None else checks.index((e.event_filter, e.offset))) for e in entries]
    if len(checks) == 1:
        (event_filter, offset), = checks
        everyone = [handler for handler, _ in plan]
        unfiltered = [handler for handler, check in plan if check < 0]

        def dispatch_one_schedule(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
            due = event_filter(engine, engine.state.get_event_attrib_value(base) + offset)
            for handler in everyone if due else unfiltered:
                handler(engine, *args, **kwargs)

        return dispatch_one_schedule

    def dispatch(engine: StepEngine, *args: Any, **kwargs: Any) -> None:
        value = engine.state.get_event_attrib_value(base)
        due = [event_filter(engine, value + offset) for event_filter, offset in checks]
        for handler, check in plan:
            if check < 0 or due[check]:
                handler(engine, *args, **kwargs)

    return dispatch
