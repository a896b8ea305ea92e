"""Step functions on Ignite engines: injection by name and control flow (handlers: :mod:`~engineflow.execute.dispatch`).

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
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from ignite.engine import Engine, Events

from engineflow.declare.control import EndEpoch, SkipBatch, StopFit
from engineflow.declare.handlers import HandlerSpec, handler_specs
from engineflow.declare.steps import StepSpec, step_spec
from engineflow.errors import RecipeError
from engineflow.execute.dispatch import Dispatch, HandlerHandle, attach_in_order
from engineflow.execute.injection import describe, make_caller
from engineflow.execute.notes import add_note
from engineflow.ignite_internals import HookedEngine
from engineflow.metrics import attach_metrics
from engineflow.state.components import modules_of

# Engines running now, outermost first: StopFit raised in a nested eval run stops the fit too.
_running: contextvars.ContextVar[tuple[Engine, ...]] = contextvars.ContextVar("engineflow_running", default=())

_BATCH_EVENTS = (Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)
STEP_DYNAMIC = ("batch", "engine", "state")


class StepEngine(HookedEngine):
    """An Ignite ``Engine`` that honours engineflow's control-flow exceptions.

    Users never subclass it; :func:`make_engine` builds one around a step function.
    ``kind`` is "train", "eval" or "infer"; ``modules`` are put in eval mode (and back) around
    each run of an eval or infer engine. An eval or infer run starts with empty ``state.metrics``:
    a run stopped before its epoch completed (StopFit in a handler) reports no metric rather than
    the previous run's.
    """

    def __init__(self, process_function: Callable[[Engine, Any], Any], *, kind: str, modules: Iterable[Any] = (),
                 provided: Mapping[str, Any] | None = None):
        super().__init__(process_function)
        # its handlers by event, in order, and the names they are given by default
        self.dispatch = Dispatch(provided or {})
        # Ignite logs every exception that ends a run (KeyboardInterrupt after an interrupt checkpoint,
        # a NaN loss) at ERROR; with no logging configured Python would print those to stderr beside
        # engineflow's own message. A NullHandler keeps them for users who do configure logging; the
        # logger is the one every StepEngine shares (Ignite names it after the class), so one is enough.
        if not any(isinstance(handler, logging.NullHandler) for handler in self.logger.handlers):
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

    def twin(self) -> StepEngine:
        """A new engine that runs this engine's step on the same names, with none of its handlers,
        metrics or state: what runs on it leaves this engine as it was (the LR finder sweeps on one)."""
        return StepEngine(self._step_process, kind=self.kind, modules=self._modules, provided=self.dispatch.provided)

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

    def attach(self, *specs: HandlerSpec) -> list[HandlerHandle]:
        """Attach handlers now, each in its place by (order, declaration) among those attached already, given
        the names this engine's handlers are given; one removable handle each (what ``ef.on(event, fn,
        engine=...)`` returns). Filters count this engine's own events."""
        return attach_in_order(self, specs, self.dispatch.provided)

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
        if not self.handlers_of(event):  # most events of an iteration have none
            self.last_event_name = event  # as Ignite records every event it fires
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


def make_engine(spec: StepSpec, provided: Mapping[str, Any], *,
                around: Callable[[StepEngine], AbstractContextManager[Any]] | None = None) -> StepEngine:
    """Wrap a step in a :class:`StepEngine` whose process function injects components by name.

    Args:
        spec: the step (from a step decorator).
        provided: components for the step by name (what ``setup`` returned, ``cfg``, ``device``...).
        around: ``around(engine)``, a context manager each call of the step runs inside (a fit's
            step options: autocast, DDP's ``no_sync``; see :mod:`engineflow.execute.backprop`).

    Example:
        >>> from engineflow.declare.steps import StepSpec
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
            if around is not None:
                with around(engine), torch.set_grad_enabled(grad):
                    out = call({"batch": batch, "engine": engine, "state": engine.state})
            elif torch.is_grad_enabled() is grad:  # the usual case: no context manager per step
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

    return StepEngine(process, kind=spec.kind, modules=modules_of(provided).values(), provided=provided)


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
