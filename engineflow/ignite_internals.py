"""Every use of Ignite's private API, in one module, checked against the Ignite versions it was read in.

engineflow needs nine things Ignite keeps private:

* ``Engine._fire_event``: overridden, so that :class:`~engineflow.execute.engine.StepEngine` decides how an
  event's handlers run (skipped batches, control exceptions, no debug line formatted per event);
* ``Engine._event_handlers``: the ``(handler, args, kwargs)`` entries of an event, called as Ignite
  calls them (a leading weak reference means "pass the engine first"), and one replaced in its place
  (an event's dispatcher, rebuilt when a handler is attached or removed);
* ``Engine._handle_exception``: overridden, so that a failed fit's cleanup handlers do not swallow
  the error (Ignite re-raises only when no ``EXCEPTION_RAISED`` handler exists);
* ``Engine._allowed_events``: the events an engine fires (Ignite keeps no public list);
* ``Engine._init_iter``: how Ignite itself starts a resumed epoch after the batches already done;
* ``Engine._is_done``: overridden, so that a run ends after its epochs, not after ``epoch_length *
  max_epochs`` iterations: a run resumed on another number of processes has had epochs of another
  length before;
* the attributes a metric's ``compute`` all-reduces (the arguments of ``sync_all_reduce``, kept in its
  wrapper's closure) and ``Metric.__state_dict_key_per_rank``: a metric's state saved by N processes is
  regrouped for M (:func:`synced_attributes`, :data:`PER_RANK_KEY`);
* ``Metric._device``: where a metric keeps its sums (:func:`metric_device`);
* ``Metric._state_dict_all_req_keys``: the attributes ``Metric.state_dict`` saves, which
  engineflow's own metrics name (:func:`state_dict_keys`).

The module is one of the top-level ones every layer may import: the engines use it, and so does the
public :mod:`engineflow.metrics`, which is below them.

Their layout was read in the Ignite releases of :data:`VERIFIED`; on any other release importing this
module raises :class:`UntestedIgniteError` instead of running with a layout it may not have.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ignite
import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from engineflow.errors import EXIT_USAGE, EngineflowError

# [lowest, first untested): the releases whose private layout this module was read in and tested with
VERIFIED = ((0, 5, 3), (0, 5, 6))


class UntestedIgniteError(EngineflowError):
    """The installed pytorch-ignite is outside the releases engineflow was verified with."""

    exit_code = EXIT_USAGE


def release(version: str) -> tuple[int, ...]:
    """``"0.5.5"`` -> ``(0, 5, 5)``; suffixes such as ``.post2`` or ``rc1`` are ignored.

    Example:
        >>> release("0.5.0.post2"), release("0.6.0rc1")
        ((0, 5, 0), (0, 6, 0))
    """
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(part) for part in match.groups() if part is not None) if match else ()


def check_version(version: str) -> None:
    """Raise :class:`UntestedIgniteError` unless ``version`` lies in :data:`VERIFIED`."""
    low, high = VERIFIED
    if not low <= release(version) < high:
        raise UntestedIgniteError(
            f"engineflow was verified with pytorch-ignite {'.'.join(map(str, low))} up to, not including, "
            f"{'.'.join(map(str, high))}, and it relies on Ignite internals those releases share; "
            f"pytorch-ignite {version} is installed. "
            f"Install a verified release: pip install 'pytorch-ignite>={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))}'"
        )


check_version(ignite.__version__)


class HookedEngine(Engine):
    """An Ignite ``Engine`` whose event firing and exception handling subclasses replace.

    By default both do exactly what Ignite does; :class:`~engineflow.execute.engine.StepEngine` overrides
    :meth:`fire` and :meth:`handle_exception`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # an event's handler entries, or None: a bound dict lookup, for the check every event makes
        self.handlers_of = self._event_handlers.get

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        self.fire(event_name, event_args, event_kwargs)

    def _handle_exception(self, e: BaseException) -> None:
        self.handle_exception(e)

    @staticmethod
    def _is_done(state: Any) -> bool:
        # Ignite's test, less its count of iterations against epoch_length * max_epochs (max_iters
        # came in pytorch-ignite 0.5.4)
        max_iters = getattr(state, "max_iters", None)
        return ((max_iters is not None and state.iteration >= max_iters)
                or (state.max_epochs is not None and state.epoch >= state.max_epochs))

    def fire(self, event: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Run the handlers of ``event``: Ignite's own method, with its debug line."""
        Engine._fire_event(self, event, *args, **kwargs)

    def handle_exception(self, error: BaseException) -> None:
        """What Ignite does with an error that ends a run: hand it to ``EXCEPTION_RAISED`` handlers if
        there are any (and then not raise it), else raise it."""
        Engine._handle_exception(self, error)

    def call_handlers(self, event: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Ignite's ``_fire_event`` without the debug line it formats for every event, whatever the log
        level: the same calls, in the same order, with the same arguments."""
        self.last_event_name = event
        for func, stored_args, stored_kwargs in self._event_handlers[event]:
            stored_kwargs.update(kwargs)  # as Ignite does: the event's keywords replace the stored ones
            if stored_args and isinstance(stored_args[0], weakref.ref):
                engine = stored_args[0]()
                if engine is None:
                    raise RuntimeError("Engine reference not resolved. Cannot execute event handler.")
                func(engine, *args, *stored_args[1:], **stored_kwargs)
            else:
                func(*args, *stored_args, **stored_kwargs)

    def replace_event_handler(self, event: Any, old: Callable[..., Any], new: Callable[..., Any]) -> None:
        """Put ``new`` in the place of ``old`` among the handlers of ``event`` (Ignite runs them in that
        order), with the arguments ``old`` was registered with; ``new`` takes the same arguments."""
        handlers = self._event_handlers[event]
        for index, (handler, stored_args, stored_kwargs) in enumerate(handlers):
            if handler is old:
                handlers[index] = (new, stored_args, stored_kwargs)
                return
        raise ValueError(f"{old!r} is not a handler of {event}")

    def allowed_events(self) -> list[Any]:
        """The events this engine fires: Ignite's and any registered with ``register_events``."""
        return list(self._allowed_events)

    def start_epoch_after(self, batches_done: int) -> None:
        """Make the next ``run`` start its first epoch after ``batches_done`` batches, as Ignite's own
        resume from a mid-epoch state does."""
        self._init_iter = batches_done


def _per_rank_key() -> str:
    return Metric._Metric__state_dict_key_per_rank  # type: ignore[attr-defined]


# the key of Metric.state_dict()'s list of per-rank states (a name-mangled class attribute)
PER_RANK_KEY: str = _per_rank_key()


def synced_attributes(metric: Any) -> dict[str, str] | None:
    """The attributes ``metric.compute`` all-reduces over the processes, with their reduction
    ("SUM", "MAX", "MIN" or "PRODUCT"): the arguments of Ignite's ``sync_all_reduce`` decorator; None
    when its ``compute`` is not decorated with it.

    Example:
        >>> from ignite.metrics import Accuracy
        >>> synced_attributes(Accuracy())
        {'_num_examples': 'SUM', '_num_correct': 'SUM'}
    """
    compute = getattr(type(metric), "compute", None)
    code = getattr(compute, "__code__", None)
    if code is None or code.co_name != "another_wrapper" or "attrs" not in code.co_freevars:
        return None
    attrs = compute.__closure__[code.co_freevars.index("attrs")].cell_contents
    found = {}
    for attr in attrs:
        name, _, op = attr.partition(":")
        found[name] = op or "SUM"
    return found


def metric_device(metric: Metric) -> torch.device:
    """The device ``metric`` keeps its state on: the ``device`` it was made with (Ignite keeps no
    public accessor).

    Example:
        >>> from ignite.metrics import Accuracy
        >>> metric_device(Accuracy(device="cpu"))
        device(type='cpu')
    """
    return metric._device


MetricClass = TypeVar("MetricClass", bound=type[Metric])


def state_dict_keys(*names: str) -> Callable[[MetricClass], MetricClass]:
    """Class decorator: ``state_dict`` of the metric class saves its attributes ``names`` (and
    ``load_state_dict`` restores them), as Ignite's own metrics declare theirs. Returns the class.

    Example:
        >>> from ignite.metrics import Metric
        >>> @state_dict_keys("_total")
        ... class Total(Metric):
        ...     def reset(self): self._total = 0
        ...     def update(self, output): self._total += output
        ...     def compute(self): return self._total
        >>> total = Total(); total.update(3)
        >>> restored = Total(); restored.load_state_dict(total.state_dict()); restored.compute()
        3
    """

    def declare(cls: MetricClass) -> MetricClass:
        cls._state_dict_all_req_keys = names
        return cls

    return declare
