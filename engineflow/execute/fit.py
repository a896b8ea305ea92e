"""Wire a recipe's steps into engines: validation, the training loss, history and the best epoch.

:func:`build_fit` returns a :class:`Fit`, a small record of values: the train and eval engines
(plain Ignite engines underneath), the loaders, the per-epoch history and the best-epoch tracker.
Nothing runs until :meth:`Fit.run` or an engine's ``run`` is called, so a test or a notebook can
use the engines directly.

What one epoch of :meth:`Fit.run` does, in order::

    train EPOCH_STARTED:     metrics of the last epoch are cleared
    for each batch:          train step, then ITERATION_COMPLETED handlers (loss check first)
    train EPOCH_COMPLETED:   -300 train/loss   -200 validation   -100 history + best
                             0 your handlers   1000 the epoch log line
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from ignite.engine import Events, State

from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe
from engineflow.declare.steps import StepSpec
from engineflow.declare.supervised import supervised_eval_step, supervised_train_step
from engineflow.errors import EngineflowError, RecipeError, StepCheckError
from engineflow.execute.best import Best, infer_mode
from engineflow.execute.engine import StepEngine, attach_in_order, make_engine
from engineflow.execute.injection import describe
from engineflow.execute.losses import LossMonitor, is_loss
from engineflow.metrics import attach_metrics, check_metric_takes
from engineflow.state.position import EpochData

HELD_OUT = ("train", "test")


@dataclass
class Fit:
    """The engines of one fit and what they record.

    Attributes:
        train: the train engine (an Ignite ``Engine``).
        eval: the eval engine, or None when the recipe has no eval step.
        loaders: the loaders by name ("train", "valid", "test"...).
        eval_loaders: the loaders validated on during the fit.
        history: one dict of metrics per completed epoch.
        best: the main metric's best epoch and value.
        loss: the training-loss monitor.
        components: what ``setup`` returned (model, optimizer, loaders...).
        train_metrics: the train step's metrics by name (reported as ``train/<name>``).
        seed: the run's seed; each epoch's RNGs start from ``(seed, epoch)``.
        eval_spec: the eval step, or None.
    """

    train: StepEngine
    eval: StepEngine | None
    components: Mapping[str, Any]
    loaders: Mapping[str, Iterable[Any]]
    eval_loaders: tuple[str, ...]
    best: Best
    loss: LossMonitor
    history: list[dict[str, Any]] = field(default_factory=list)
    train_metrics: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    eval_spec: StepSpec | None = None

    def evaluate(self, loader: str = "valid") -> dict[str, float]:
        """Run the eval step and its metrics over one loader; returns ``{"<loader>/<metric>": value}``.

        A run stopped before the end of the loader (StopFit raised by an eval handler) returns ``{}``:
        its metrics would describe part of the data, and the previous run's are not this one's.

        Example::

            fit, cfg, ctx = ef.build("recipes/digits.py")
            fit.evaluate("valid")  # {'valid/accuracy': 0.1, 'valid/loss': 2.3} before training
        """
        if self.eval is None:
            raise RecipeError("the recipe has no eval step; decorate one with @ef.eval_step")
        if loader not in self.loaders:
            raise RecipeError(f"no loader named {loader!r}; setup() returned loaders {', '.join(self.loaders)}")
        state = self.eval.run(self.loaders[loader], max_epochs=1)
        return {f"{loader}/{name}": value for name, value in state.metrics.items()}

    def check_eval_outputs(self) -> None:
        """Run the eval step on the first batch of the first validation loader and feed its output to
        a copy of each metric, so that a mistake (no ``"y"``, a shape a metric cannot take) is a
        :class:`RecipeError` naming the step and the metric before training, not after an epoch.

        Nothing is recorded: the metrics attached to the engine, the RNG states and the modules'
        modes are as they were. A recipe without an eval step or validation loader has nothing to check.
        """
        if self.eval is None or not self.eval_loaders or not self.eval_spec.metrics:
            return
        loader = self.eval_loaders[0]
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(self.loaders[loader]), None)
            if batch is None:
                raise RecipeError(f"the {loader!r} loader is empty; the eval step has nothing to evaluate")
            step = describe(self.eval_spec.fn)
            try:
                output = self.eval.process_batch(batch)
            except EngineflowError:
                raise
            except Exception as err:
                raise StepCheckError(
                    f"eval step {step} failed on the first batch of the {loader!r} loader, which engineflow "
                    f"evaluates before training (nothing was trained or recorded): {type(err).__name__}: {err}"
                ) from err
            for name, metric in self.eval_spec.metrics.items():
                check_metric_takes(metric, name, output, step)

    def run(self, epochs: int, *, resume: Callable[[EpochData], None] | None = None) -> State:
        """Train for ``epochs`` epochs (validating as the eval step asks); returns the train state.

        Each epoch's RNGs start from ``(seed, epoch)`` (see :mod:`engineflow.state.rng`). ``resume``
        positions a restored fit: it gets the train data and loads the rest of the state.
        """
        data = EpochData(self.loaders["train"], self.seed, lambda: self.train.state.epoch)
        if resume is None:
            return self.train.run(data, max_epochs=epochs)
        resume(data)
        return self.train.run(data)


def resolve_steps(recipe: Recipe, components: Mapping[str, Any]) -> tuple[StepSpec, StepSpec | None]:
    """The recipe's train and eval steps, or the supervised defaults when it declares none."""
    from engineflow.declare.steps import step_spec

    train = recipe.steps.get("train")
    evaluate = recipe.steps.get("eval")
    has_supervised = all(name in components for name in ("model", "optimizer", "loss_fn"))
    if train is None:
        if not has_supervised:
            raise RecipeError(
                f"{recipe.path}: no train step. Decorate a function with @ef.train_step, or return "
                "'model', 'optimizer' and 'loss_fn' from setup() to use the default supervised step "
                f"(setup returned: {', '.join(components) or 'nothing'})"
            )
        train = step_spec(supervised_train_step())
    if evaluate is None and "model" in components and "loss_fn" in components:
        from engineflow.metrics import Loss

        evaluate = step_spec(supervised_eval_step(metrics={"loss": Loss(components["loss_fn"])}))
    assert train is not None  # step_spec of a freshly decorated function
    return train, evaluate


def build_fit(
    recipe: Recipe,
    components: Mapping[str, Any],
    provided: Mapping[str, Any],
    *,
    seed: int = 0,
    extras: Iterable[Callable[[Fit], Iterable[HandlerSpec]]] = (),
) -> Fit:
    """Build the engines of a fit from a recipe and the components its ``setup`` returned.

    Args:
        recipe: the loaded recipe.
        components: what ``setup`` returned; ``loaders`` must hold a "train" loader.
        provided: everything steps and handlers may ask for by name (components included).
        extras: functions of the fit that return more handlers (progress, logging), attached with
            the recipe's by order.
    """
    loaders = _loaders_of(components, recipe)
    train_spec, eval_spec = resolve_steps(recipe, components)
    eval_loaders = _eval_loaders(eval_spec, loaders, recipe)
    best = Best(*_main_metric(eval_spec, eval_loaders, train_spec, recipe))
    monitor = LossMonitor()
    history: list[dict[str, Any]] = []
    holder: dict[str, Fit] = {}

    def evaluate(loader: str = "valid") -> dict[str, float]:
        return holder["fit"].evaluate(loader)

    provided = {**provided, "history": history, "best": best, "evaluate": evaluate}
    train = make_engine(train_spec, provided)
    attach_metrics(train, train_spec.metrics, prefix="train/")
    evaluator = None
    if eval_spec is not None:
        evaluator = make_engine(eval_spec, provided)
        attach_metrics(evaluator, eval_spec.metrics)
    fit = Fit(train, evaluator, components, loaders, eval_loaders, best, monitor, history,
              {f"train/{name}": m for name, m in train_spec.metrics.items()}, seed, eval_spec)
    holder["fit"] = fit

    everything = [*_own_handlers(fit, eval_spec), *recipe.handlers, *(s for make in extras for s in make(fit))]
    for kind, engine in (("train", train), ("eval", evaluator)):
        specs = [s for s in everything if s.engine == kind]
        if engine is None:
            if specs and not all(s.raw for s in specs):
                names = ", ".join(s.fn.__name__ for s in specs)
                raise RecipeError(f"{recipe.path}: handlers {names} are for the eval engine, but there is no eval step")
            continue
        attach_in_order(engine, specs, provided)
    return fit


def _own_handlers(fit: Fit, eval_spec: StepSpec | None) -> list[HandlerSpec]:
    def clear_metrics(engine: StepEngine) -> None:
        engine.state.metrics.clear()

    def validate(engine: StepEngine) -> None:
        for name in fit.eval_loaders:
            if engine.should_terminate:
                break  # StopFit in an earlier loader's validation: the fit is ending
            engine.state.metrics.update(fit.evaluate(name))

    def record(engine: StepEngine) -> None:
        epoch = engine.state.epoch
        metrics = {k: _scalar(v) for k, v in engine.state.metrics.items()}
        fit.history.append({"epoch": epoch, **{k: v for k, v in metrics.items() if v is not None}})
        value = metrics.get(fit.best.metric)
        if value is not None:
            fit.best.update(epoch, value)

    def spec(fn: Callable[[StepEngine], None], event: Any, order: int) -> HandlerSpec:
        return HandlerSpec(fn, event, "train", order, seq=-1, raw=True)

    own = [
        spec(clear_metrics, Events.EPOCH_STARTED, -1000),
        spec(fit.loss.epoch_started, Events.EPOCH_STARTED, -900),
        spec(fit.loss.iteration_completed, Events.ITERATION_COMPLETED, -1000),
        spec(fit.loss.epoch_completed, Events.EPOCH_COMPLETED, -300),
        spec(record, Events.EPOCH_COMPLETED, -100),
    ]
    if eval_spec is not None and eval_spec.every > 0 and fit.eval_loaders:
        own.append(spec(validate, Events.EPOCH_COMPLETED(every=eval_spec.every), -200))
    return own


def _scalar(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:
        return float(value)
    return None


def _loaders_of(components: Mapping[str, Any], recipe: Recipe) -> dict[str, Iterable[Any]]:
    loaders = components.get("loaders")
    if not isinstance(loaders, Mapping) or "train" not in loaders:
        got = "nothing" if loaders is None else repr(type(loaders).__name__)
        if isinstance(loaders, Mapping):
            got = f"loaders {', '.join(map(str, loaders)) or '(none)'}"
        raise RecipeError(
            f"{recipe.path}: setup() must return loaders={{'train': ..., 'valid': ...}} with at least a "
            f"'train' loader; got {got}"
        )
    for name, loader in loaders.items():
        if not isinstance(loader, Iterable):
            raise RecipeError(f"{recipe.path}: loader {name!r} is {type(loader).__name__}, not iterable")
    return dict(loaders)


def _eval_loaders(spec: StepSpec | None, loaders: Mapping[str, Any], recipe: Recipe) -> tuple[str, ...]:
    if spec is None:
        return ()
    if spec.loaders is None:
        return tuple(name for name in loaders if name not in HELD_OUT)
    missing = [name for name in spec.loaders if name not in loaders]
    if missing:
        raise RecipeError(
            f"{recipe.path}: @eval_step(loaders=...) names {', '.join(missing)}, but setup() returned "
            f"loaders {', '.join(loaders)}"
        )
    return spec.loaders


def _main_metric(
    eval_spec: StepSpec | None, eval_loaders: tuple[str, ...], train_spec: StepSpec, recipe: Recipe
) -> tuple[str, str]:
    available = ["train/loss", *(f"train/{n}" for n in train_spec.metrics)]
    available += [f"{loader}/{n}" for loader in eval_loaders for n in (eval_spec.metrics if eval_spec else {})]
    wanted = eval_spec.main_metric if eval_spec is not None else None
    if wanted is None:
        name = available[len(train_spec.metrics) + 1] if len(available) > len(train_spec.metrics) + 1 else "train/loss"
    elif "/" not in wanted and eval_loaders:
        name = f"{eval_loaders[0]}/{wanted}"
    else:
        name = wanted
    if name not in available and not (name.startswith("train/") and is_loss(name.removeprefix("train/"))):
        raise RecipeError(
            f"{recipe.path}: main_metric {wanted!r} is not reported; available: {', '.join(available)}"
        )
    mode = (eval_spec.mode if eval_spec is not None else None) or infer_mode(name)
    return name, mode


def take(loader: Iterable[Any], n: int) -> Iterable[Any]:
    """The first ``n`` batches of ``loader``, re-iterable, with a length (for ``--check``)."""
    return _Take(loader, n)


class _Take:
    def __init__(self, loader: Iterable[Any], n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if index >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        try:
            return min(self.n, len(self.loader))  # type: ignore[arg-type]
        except TypeError:
            return self.n
