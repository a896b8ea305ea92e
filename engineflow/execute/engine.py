"""Step functions on Ignite engines: injection, control flow and handler order.

:func:`make_engine` wraps a user step in a :class:`StepEngine`, an Ignite ``Engine`` that adds
two things Ignite lacks: skipping the rest of a batch (Ignite issue #996) and the control-flow
exceptions of :mod:`engineflow.declare.control`. Everything else is Ignite's: events, filters,
``state``, ``add_event_handler``, metrics.

One iteration, as :class:`StepEngine` runs it::

    fire GET_BATCH_STARTED; batch = next(loader); fire GET_BATCH_COMPLETED
    fire ITERATION_STARTED                  # SkipBatch here: the step is not called
    output = step(batch=..., **components)  # SkipBatch/EndEpoch/StopFit here: output is None
    fire ITERATION_COMPLETED                # not fired for a skipped batch; metrics update here
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from ignite.engine import Engine, Events, State

from engineflow.declare.control import ControlFlow, EndEpoch, SkipBatch, StopFit
from engineflow.declare.handlers import HandlerSpec, handler_specs
from engineflow.declare.steps import StepSpec, step_spec
from engineflow.errors import EngineflowError, HandlerError, RecipeError
from engineflow.execute.ignite_internals import HookedEngine
from engineflow.execute.injection import describe, make_caller
from engineflow.metrics import attach_metrics
from engineflow.state.components import modules_of

# Engines running now, outermost first: StopFit raised in a nested eval run stops the fit too.
_running: contextvars.ContextVar[tuple[Engine, ...]] = contextvars.ContextVar("engineflow_running", default=())

_BATCH_EVENTS = (Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)
STEP_DYNAMIC = ("batch", "engine", "state")
HANDLER_DYNAMIC = ("engine", "state", "output", "metrics", "batch")


class StepEngine(HookedEngine):
    """An Ignite ``Engine`` that honours engineflow's control-flow exceptions.

    Users never subclass it; :func:`make_engine` builds one around a step function.
    ``kind`` is "train", "eval" or "infer"; ``modules`` are put in eval mode (and back) around
    each run of an eval or infer engine. An eval or infer run starts with empty ``state.metrics``:
    a run stopped before its epoch completed (StopFit in a handler) reports no metric rather than
    the previous run's.
    """

    def __init__(self, process_function: Callable[[Engine, Any], Any], *, kind: str, modules: Iterable[Any] = ()):
        super().__init__(process_function)
        # Ignite logs every exception that ends a run (KeyboardInterrupt after an interrupt checkpoint,
        # a NaN loss) at ERROR; with no logging configured Python would print those to stderr beside
        # engineflow's own message. A NullHandler keeps them for users who do configure logging.
        self.logger.addHandler(logging.NullHandler())
        self.kind = kind
        self.batch_skipped = False
        # True once handlers declared with ef.on(Events.EXCEPTION_RAISED) are attached: they clean up,
        # and the error still ends the run (Ignite would take a handler there as having dealt with it).
        self.reraise_after_cleanup = False
        self._cleaned_up: BaseException | None = None
        self._log_events = self.logger.isEnabledFor(logging.DEBUG)
        self._modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        self._step_process = process_function

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Ignite's ``Engine.run``; eval/infer engines run their modules in eval mode, then restore."""
        if self.kind != "train":
            self.state.metrics = {}
        token = _running.set((*_running.get(), self))
        self._cleaned_up = None
        self._log_events = self.logger.isEnabledFor(logging.DEBUG)
        try:
            with self._modules_mode():
                return super().run(*args, **kwargs)
        finally:
            _running.reset(token)

    def process_batch(self, batch: Any) -> Any:
        """The step's output for one batch, outside any run: no event fires, no handler runs.

        Modules are in eval mode for an eval or infer engine, as during its runs. Used to check a
        step's outputs before training starts.
        """
        with self._modules_mode():
            return self._step_process(self, batch)

    @contextmanager
    def _modules_mode(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self._modules] if self.kind != "train" else []
        for module, _ in modes:
            module.eval()
        try:
            yield
        finally:
            for module, was_training in modes:
                module.train(was_training)

    def skip_batch(self) -> None:
        """Skip the rest of the current batch (what raising :class:`SkipBatch` does)."""
        self.batch_skipped = True

    def stop_fit(self) -> None:
        """Stop this engine and every engine whose run it is nested in, after the current event."""
        for engine in (*_running.get(), self):
            engine.terminate()

    def fire(self, event: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Run an event's handlers, honouring a skipped batch and the control exceptions."""
        if event is Events.EPOCH_STARTED:
            # An EndEpoch before the step ends the epoch with no ITERATION_COMPLETED to clear this.
            self.batch_skipped = False
        if self.batch_skipped and event in _BATCH_EVENTS:
            if event is Events.ITERATION_COMPLETED:
                self.batch_skipped = False
            return
        if not self.has_handlers(event):
            self.note_event(event)  # most events of an iteration have no handler
            return
        try:
            if self._log_events:
                super().fire(event, args, kwargs)  # Ignite's own, with its debug line per event
            else:
                self.call_handlers(event, args, kwargs)
        except SkipBatch:
            self._control_in_batch(event, "SkipBatch")
        except EndEpoch:
            self._control_in_batch(event, "EndEpoch")
            self.terminate_epoch()
        except StopFit:
            self.stop_fit()
        if event is Events.ITERATION_COMPLETED:
            self.batch_skipped = False

    def handle_exception(self, error: BaseException) -> None:
        """Ignite's handling, except that with engineflow's cleanup handlers attached the original error
        always ends the run; a cleanup handler's own failure is added to it as a note."""
        if not self.reraise_after_cleanup:
            super().handle_exception(error)
            return
        if error is self._cleaned_up:  # Ignite hands an error from the batch loop over twice: clean up once
            raise error
        self._cleaned_up = error
        try:
            super().handle_exception(error)
        except BaseException as failed:  # a failing cleanup must not hide the error it cleans up
            if failed is not error:
                add_note(error, f"while handling it, a handler of EXCEPTION_RAISED on the {self.kind} engine "
                                f"raised {type(failed).__name__}: {failed}")
        raise error

    def _control_in_batch(self, event_name: Any, what: str) -> None:
        if event_name not in _BATCH_EVENTS:
            raise RecipeError(
                f"{what} was raised by a handler of {event_name} on the {self.kind} engine; it only means "
                "something during a batch (ITERATION_STARTED/COMPLETED or the step). Raise StopFit to stop."
            )
        if event_name is not Events.ITERATION_COMPLETED:
            self.batch_skipped = True


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (shown under its traceback); Python < 3.11 keeps it in ``__notes__``."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def normalize_output(out: Any, step: Callable[..., Any]) -> dict[str, Any]:
    """A step's output as a dict: dicts pass, a tensor becomes ``{"loss": tensor}``, else error."""
    if type(out) is dict:
        return out
    if isinstance(out, torch.Tensor):
        return {"loss": out}
    if isinstance(out, Mapping):
        return dict(out)
    raise RecipeError(
        f"step {describe(step)} returned {type(out).__name__}; a train or eval step must return a dict "
        "of outputs (e.g. {'loss': loss}) or a loss tensor"
    )


def make_engine(spec: StepSpec, provided: Mapping[str, Any]) -> StepEngine:
    """Wrap a step in a :class:`StepEngine` whose process function injects components by name.

    Args:
        spec: the step (from a step decorator).
        provided: components for the step by name (what ``setup`` returned, ``cfg``, ``device``...).

    Example:
        >>> from engineflow.declare.steps import StepSpec, step_spec
        >>> engine = make_engine(StepSpec("train", lambda batch, k: {"loss": batch * k}), {"k": 2})
        >>> engine.run([1, 2, 3], max_epochs=1).output
        {'loss': 6}
    """
    call = make_caller(
        spec.fn,
        provided=provided,
        dynamic=STEP_DYNAMIC,
        first_gets="batch" if spec.kind == "infer" else None,
        what=f"{spec.kind} step",
    )
    step = spec.fn
    grad = spec.kind == "train"
    normalize = spec.kind != "infer"

    def process(engine: StepEngine, batch: Any) -> Any:
        if engine.batch_skipped:
            return None
        try:
            if torch.is_grad_enabled() is grad:  # the usual case: no context manager per step
                out = call({"batch": batch, "engine": engine, "state": engine.state})
            else:
                with torch.set_grad_enabled(grad):
                    out = call({"batch": batch, "engine": engine, "state": engine.state})
        except SkipBatch:
            engine.skip_batch()
            return None
        except EndEpoch:
            engine.skip_batch()
            engine.terminate_epoch()
            return None
        except StopFit:
            engine.skip_batch()
            engine.stop_fit()
            return None
        return normalize_output(out, step) if normalize else out

    return StepEngine(process, kind=spec.kind, modules=modules_of(provided).values())


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


def attach_in_order(engine: StepEngine, specs: Iterable[HandlerSpec], provided: Mapping[str, Any]) -> None:
    """Attach handlers so that each event runs them by (order, declaration).

    One Ignite handler per event dispatches to all of that event's specs and checks their
    filters inline: a handler that is not due costs a modulo, not a call through Ignite's filter
    wrapper. Handlers of ``EXCEPTION_RAISED`` are cleanup: each runs even if an earlier one
    failed, and the error that ended the run is still raised afterwards (see
    :meth:`StepEngine.handle_exception`).
    """
    by_event: dict[Any, list[tuple[Callable[..., None], Any, int | None]]] = {}
    for spec in sorted(specs, key=lambda s: (s.order, s.seq)):
        base, event_filter = _split(engine, spec.event)
        if (event_filter is not None or spec.every) and base not in State.event_to_attr:
            raise RecipeError(
                f"handler {describe(spec.fn)}: {base} keeps no count of its own, so it takes no filter "
                "(every=, once=, before=, after=); attach it to the plain event and test the state inside"
            )
        handler = wrap_handler(spec, provided, base)
        by_event.setdefault(base, []).append((handler, None if spec.every else event_filter, spec.every))
        if spec.at_start:
            by_event.setdefault(Events.STARTED, []).append(
                (lambda e, h=handler: h(e) if e.state.epoch == 0 else None, None, None))
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


def _dispatcher(base: Any, entries: list[tuple[Callable[..., None], Any, int | None]]) -> Callable[..., None]:
    if base == Events.EXCEPTION_RAISED:
        handlers = [h for h, _, _ in entries]

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
    if all(event_filter is None and every is None for _, event_filter, every in entries):
        handlers = [h for h, _, _ in entries]
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
        for handler, event_filter, every in entries:
            if every is not None:
                if value % every:
                    continue
            elif event_filter is not None and not event_filter(engine, value):
                continue
            handler(engine, *args, **kwargs)

    return dispatch


def engine(step: Callable[..., Any], *handlers: Callable[..., Any], **components: Any) -> StepEngine:
    """A step and its handlers as an engine: a value to pass around and run on any loader, from plain
    Python or from a handler of another engine.

    Args:
        step: a function marked with a step decorator; its metrics are attached.
        handlers: functions marked with handler decorators for this step's kind of engine
            (``engine="eval"`` or ``engine=step`` for an eval step).
        components: what the step and the handlers ask for by name.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> @ef.eval_step(metrics={"mae": ef.metrics.MeanAbsoluteError()})
        ... def check(batch, scale):
        ...     return {"y_pred": batch * scale, "y": batch}
        >>> evaluator = ef.engine(check, scale=2.0)
        >>> evaluator.run([torch.ones(2), torch.ones(2)]).metrics
        {'mae': 1.0}
    """
    spec = step_spec(step)
    if spec is None:
        raise RecipeError(f"ef.engine() takes a step function marked with @ef.train_step, @ef.eval_step or "
                          f"@ef.infer_step; {describe(step)} is not marked")
    specs = [s for fn in handlers for s in handler_specs(fn)]
    if not specs and handlers:
        raise RecipeError(f"ef.engine(): {describe(handlers[0])} is not a handler; decorate it with ef.on(...)")
    wrong = [s for s in specs if s.engine != spec.kind]
    if wrong:
        raise RecipeError(f"ef.engine(): handler {describe(wrong[0].fn)} is for the {wrong[0].engine} engine, but "
                          f"{describe(step)} is the {spec.kind} step; attach it with engine={spec.kind!r}")
    built = make_engine(spec, components)
    attach_metrics(built, spec.metrics, prefix="train/" if spec.kind == "train" else "")
    attach_in_order(built, specs, components)
    return built
