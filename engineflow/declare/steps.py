"""Step decorators: mark plain functions as the train, eval or infer step of a recipe.

The decorators return the function unchanged (same object), so a test calls it directly:
``train(batch, model=m, optimizer=o)``. They only record options in a :class:`StepSpec`
that the recipe loader finds; nothing runs at decoration time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from engineflow.declare.step_options import StepOptions
from engineflow.errors import RecipeError

if TYPE_CHECKING:
    from ignite.metrics import Metric

StepKind = Literal["train", "eval", "infer"]
STEP_KINDS: tuple[StepKind, ...] = ("train", "eval", "infer")
STEP_ATTR = "__engineflow_step__"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StepSpec:
    """What a step decorator recorded about a function.

    Attributes:
        kind: "train", "eval" or "infer".
        fn: the user's function, unchanged.
        metrics: Ignite metrics by name, attached to the step's engine.
        every: eval steps only: validate every ``every`` train epochs during a fit (0: never).
        loaders: eval steps only: which loaders to validate on (default: all but train and test).
        main_metric: eval steps only: the metric that picks the best epoch, e.g. "valid/accuracy".
        mode: "max" or "min" for ``main_metric`` (default: "min" for losses and errors, else "max").
        options: train steps only: precision, accumulation, clipping... as declared
            (:class:`~engineflow.declare.step_options.StepOptions`).

    Example:
        >>> import engineflow as ef
        >>> spec = ef.load_recipe("recipes/sine.py").steps["eval"]  # the recipe's eval step, as declared
        >>> spec.kind, sorted(spec.metrics), spec.main_metric, spec.every
        ('eval', ['mae', 'mse'], 'valid/mse', 1)
    """

    kind: StepKind
    fn: Callable[..., Any]
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    every: int = 1
    loaders: tuple[str, ...] | None = None
    main_metric: str | None = None
    mode: str | None = None
    options: StepOptions = field(default_factory=StepOptions)


def step_spec(fn: Any) -> StepSpec | None:
    """The :class:`StepSpec` a decorator attached to ``fn``, or None for a plain function.

    A wrapper made around a marked step with ``functools.wraps`` (or anything that copies the
    function's ``__dict__``) carries the inner function's spec; it is the wrapper that must run, so
    the spec is returned with ``fn`` set to the wrapper, options unchanged.

    Example:
        >>> import functools
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch):
        ...     return {"loss": batch}
        >>> @functools.wraps(train)
        ... def doubled(batch):
        ...     return {"loss": 2 * train(batch)["loss"]}
        >>> step_spec(doubled).fn is doubled
        True
    """
    spec = getattr(fn, STEP_ATTR, None)
    if spec is None or spec.fn is fn or not isinstance(spec, StepSpec):
        return spec
    return replace(spec, fn=fn)


def wraps_around(outer: Any, inner: Any) -> bool:
    """Whether ``outer`` wraps ``inner`` through a chain of ``__wrapped__`` attributes."""
    seen = set()
    current = getattr(outer, "__wrapped__", None)
    while current is not None and id(current) not in seen:
        if current is inner:
            return True
        seen.add(id(current))
        current = getattr(current, "__wrapped__", None)
    return False


def _mark(fn: F, spec: StepSpec) -> F:
    if not callable(fn):
        raise RecipeError(f"@{spec.kind}_step decorates a function, got {fn!r}")
    existing = step_spec(fn)
    if existing is not None and existing.kind != spec.kind:
        raise RecipeError(f"{fn.__qualname__} is already the {existing.kind} step; one function, one role")
    try:
        setattr(fn, STEP_ATTR, spec)
    except AttributeError:
        raise RecipeError(f"@{spec.kind}_step cannot mark {fn!r}; decorate a plain function") from None
    return fn


def _check_metrics(metrics: Mapping[str, Any] | None, kind: str) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise RecipeError(
            f"@{kind}_step(metrics=...) expects a dict of name -> ignite Metric, got {type(metrics).__name__}"
        )
    from ignite.metrics import Metric

    for name, metric in metrics.items():
        if not isinstance(metric, Metric):
            raise RecipeError(
                f"@{kind}_step(metrics=...): {name!r} is {metric!r}, expected an ignite.metrics.Metric "
                "such as ef.metrics.Accuracy()"
            )
    return dict(metrics)


@overload
def train_step(fn: F) -> F: ...
@overload
def train_step(
    *,
    metrics: Mapping[str, Metric] | None = None,
    precision: str | None = None,
    accumulate: int | str | None = None,
    clip_norm: float | str | None = None,
    clip_value: float | str | None = None,
    compile: bool | Mapping[str, Any] | None = None,
    channels_last: bool | None = None,
) -> Callable[[F], F]: ...
def train_step(
    fn: Any = None,
    *,
    metrics: Mapping[str, Metric] | None = None,
    precision: str | None = None,
    accumulate: int | str | None = None,
    clip_norm: float | str | None = None,
    clip_value: float | str | None = None,
    compile: bool | Mapping[str, Any] | None = None,
    channels_last: bool | None = None,
) -> Any:
    """Mark ``fn`` as the recipe's train step; returns it unchanged.

    The step takes what it needs by parameter name (``batch``, ``model``, ``optimizer``, ``cfg``,
    ``state``, ``engine``, ``device``, ``backprop``, anything ``setup`` returned) and returns a dict
    of outputs or a loss tensor (which becomes ``{"loss": tensor}``). A ``"loss"`` output is averaged
    for the progress line and checked for NaN/inf every iteration.

    The step options (``precision`` "32", "bf16" or "fp16", ``accumulate`` batches per optimizer step,
    ``clip_norm`` or ``clip_value``, ``compile``, ``channels_last``; see
    :class:`~engineflow.declare.step_options.StepOptions`) take a value or the name of a config key.
    The step runs under autocast for bf16 and fp16; for fp16, accumulation and clipping it calls
    ``backprop(loss, optimizer)`` in place of ``zero_grad``/``backward``/``step``.

    Example:
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch, scale):
        ...     return {"loss": batch * scale}
        >>> train(2.0, scale=3.0)
        {'loss': 6.0}
        >>> @ef.train_step(precision="bf16", accumulate="accumulate", clip_norm=1.0)
        ... def train(batch, model, optimizer, backprop):
        ...     loss = model(batch).sum()
        ...     backprop(loss, optimizer)  # in place of zero_grad(), backward() and step()
        ...     return loss
    """
    spec_metrics = _check_metrics(metrics, "train")
    given = dict(precision=precision, accumulate=accumulate, clip_norm=clip_norm, clip_value=clip_value,
                 compile=compile, channels_last=channels_last)

    def mark(f: Any) -> Any:
        where = f"@ef.train_step of {getattr(f, '__qualname__', f)!r}"
        return _mark(f, StepSpec("train", f, spec_metrics, options=StepOptions.declared(where, **given)))

    return mark if fn is None else mark(fn)


@overload
def eval_step(fn: F) -> F: ...
@overload
def eval_step(
    *,
    metrics: Mapping[str, Metric] | None = None,
    every: int = 1,
    loaders: tuple[str, ...] | list[str] | None = None,
    main_metric: str | None = None,
    mode: str | None = None,
) -> Callable[[F], F]: ...
def eval_step(
    fn: Any = None,
    *,
    metrics: Mapping[str, Metric] | None = None,
    every: int = 1,
    loaders: tuple[str, ...] | list[str] | None = None,
    main_metric: str | None = None,
    mode: str | None = None,
) -> Any:
    """Mark ``fn`` as the eval step: it runs without gradients, in eval mode, on validation loaders.

    The step returns a dict whose ``y_pred`` and ``y`` feed the metrics. During a fit it runs
    every ``every`` epochs on ``loaders`` (default: every loader but "train" and "test"); its
    metrics are reported as ``<loader>/<name>`` (``valid/accuracy``). ``main_metric`` (default:
    the first metric on the first validation loader) picks the best epoch.

    Example:
        >>> import engineflow as ef
        >>> @ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()}, main_metric="valid/accuracy")
        ... def evaluate(batch, model):
        ...     x, y = batch
        ...     return {"y_pred": model(x), "y": y}
    """
    if not isinstance(every, int) or every < 0:
        raise RecipeError(f"@eval_step(every=...) expects a whole number of epochs >= 0, got {every!r}")
    if mode not in (None, "max", "min"):
        raise RecipeError(f"@eval_step(mode=...) expects 'max' or 'min', got {mode!r}")
    loaders_t = tuple(loaders) if loaders is not None else None

    def mark(f: Any) -> Any:
        return _mark(f, StepSpec("eval", f, _check_metrics(metrics, "eval"), every, loaders_t, main_metric, mode))

    return mark if fn is None else mark(fn)


@overload
def infer_step(fn: F) -> F: ...
@overload
def infer_step() -> Callable[[F], F]: ...
def infer_step(fn: Any = None) -> Any:
    """Mark ``fn`` as the infer step: input in (its first parameter or ``batch``), prediction out.

    Example:
        >>> import engineflow as ef
        >>> @ef.infer_step
        ... def predict(x, model):
        ...     return model(x).argmax(-1)
    """
    if fn is None:
        return lambda f: _mark(f, StepSpec("infer", f))
    return _mark(fn, StepSpec("infer", fn))
