"""Wire a recipe's steps into engines: validation, the training loss, history and the best epoch.

:func:`build_fit` returns a :class:`Fit`, a small record of values: the train and eval engines
(plain Ignite engines underneath), the loaders, the per-epoch history and the best-epoch tracker.
Nothing runs until :meth:`Fit.run` or an engine's ``run`` is called, so a test or a notebook can
use the engines directly.

What one epoch of :meth:`Fit.run` does, in order::

    train EPOCH_STARTED:     metrics of the last epoch are cleared
    for each batch:          train step, then ITERATION_COMPLETED handlers (loss check first)
    train EPOCH_COMPLETED:   the epoch's position, train/loss, validation, history + best, then your
                             handlers (order 0); the order of each is in engineflow.declare.orders
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from ignite.engine import Events, State

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe
from engineflow.declare.stages import Stage
from engineflow.declare.steps import StepSpec, wraps_around
from engineflow.declare.tools import tool_handlers
from engineflow.errors import EngineflowError, RecipeError, StepCheckError
from engineflow.execute.backprop import AccumulatedGradients, Backprop, compiled, to_channels_last
from engineflow.execute.board import Board
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import StepEngine, make_engine
from engineflow.execute.injection import describe
from engineflow.execute.inspection import grad_norm_handlers
from engineflow.execute.learning_rates import learning_rate_handlers
from engineflow.execute.losses import LossMonitor
from engineflow.execute.parallel import (
    gather_objects,
    order_layout,
    positioned,
    regrouped_metric_state,
    resume_order,
    sum_over_ranks,
    train_wrappers,
)
from engineflow.execute.scope import StageScope
from engineflow.execute.stopping import Stopped
from engineflow.execute.validation import LoaderScope, eval_engine, evaluate_loader
from engineflow.execute.wiring import eval_loaders_of, loaders_of, main_metric, resolve_steps, step_options
from engineflow.metrics import attach_metrics, check_metric_takes
from engineflow.state.best import Best
from engineflow.state.components import (
    component_states,
    is_stateful,
    load_component_states,
    modules_of,
    trainable,
)
from engineflow.state.position import EpochData, EpochTracker, plan_resume
from engineflow.state.resume import Position, RankState, ResumeRecord, StageInfo
from engineflow.state.rng import rng_state, set_rng_state


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
        seed: the fit's seed; each epoch's RNGs start from ``(seed, epoch)``.
        eval_spec: the eval step, or None.
        stage: where the fit stands in its pipeline (a recipe without stages: "fit", no prefix).
        rank: this process's rank among those training together (0 on one process).
        world_size: how many processes train together.
        gather: on several processes, collects a value from every rank (see :meth:`resume_record`).
        scope: where :meth:`evaluate` finds a loader by name.
        partial_metrics: after a mid-epoch load on another number of processes, the train metrics
            that count only some of the epoch's steps before it.
        parts: the stateful pieces :meth:`register` keeps in the checkpoints, by name (among them
            "backprop", the fit's :class:`~engineflow.execute.backprop.Backprop`).
        rank_parts: those registered ``per_rank``: each process saves and restores its own.
        tracker: where the fit stands in its epochs (:meth:`resume_position`).
        board: what handlers and tools show in TensorBoard by iteration (see :mod:`engineflow.execute.board`).
        stopped: who ended the fit before its epochs (early stopping, which keeps it in the fit's
            checkpoints as part ``"stopped"``); its summary records it.
        around_validation: what each epoch's validation runs inside (see :meth:`during_validation`).

    Example:
        >>> import ignite.engine
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})
        >>> isinstance(fit.train, ignite.engine.Engine), fit.eval_loaders
        (True, ('valid',))
        >>> _ = fit.run(epochs=2)
        >>> len(fit.history), sorted(fit.history[-1])
        (2, ['epoch', 'train/loss', 'train/lr', 'valid/mae', 'valid/mse'])
        >>> fit.best.metric, fit.best.mode, fit.best.epoch in (1, 2)
        ('valid/mse', 'min', True)
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
    stage: StageInfo = field(default_factory=StageInfo)
    rank: int = 0
    world_size: int = 1
    # on several processes: every rank's value, in rank order (a collective), for the per-rank state
    gather: Callable[[Any], list[Any]] | None = None
    scope: LoaderScope = field(default_factory=LoaderScope)
    partial_metrics: list[str] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)
    rank_parts: dict[str, Any] = field(default_factory=dict)
    tracker: EpochTracker = field(default_factory=EpochTracker, repr=False)
    board: Board = field(default_factory=Board, repr=False)
    stopped: Stopped = field(default_factory=Stopped, repr=False)
    around_validation: list[Callable[[], AbstractContextManager[Any]]] = field(default_factory=list, repr=False)
    # after a load: the batches of the resumed epoch to skip, and what this rank restores after them
    _resume: tuple[int, RankState | None] | None = field(default=None, repr=False)

    def register(self, name: str, part: Any, *, per_rank: bool = False) -> None:
        """Keep ``part`` (anything with ``state_dict``/``load_state_dict``, the same on every process)
        in the fit's checkpoints under ``name``.

        ``per_rank``: a state that differs between processes (gradients added up under DDP's
        ``no_sync``): each process saves its own, and gets its own back when the fit resumes inside
        an epoch, after the batches already trained on are skipped.

        Example::

            fit.register("early_stopping", stopper)   # its state_dict() is saved and loaded on resume
        """
        if not is_stateful(part):
            raise TypeError(f"Fit.register({name!r}, ...) expects an object with state_dict() and "
                            f"load_state_dict(), got {type(part).__name__}")
        (self.rank_parts if per_rank else self.parts)[name] = part

    def during_validation(self, context: Callable[[], AbstractContextManager[Any]]) -> None:
        """Run each epoch's validation inside ``context()`` (entered before the first eval loader,
        left after the last one, also when validation raises), e.g. to evaluate other weights
        (:func:`engineflow.ema`'s average) and give the model its own back afterwards.

        Example::

            fit.during_validation(average.swapped_in)
        """
        self.around_validation.append(context)

    def evaluate(self, loader: str = "valid") -> dict[str, float]:
        """Run the eval step and its metrics over one loader; returns ``{"<loader>/<metric>": value}``.

        A run stopped before the end of the loader (StopFit raised by an eval handler) returns ``{}``:
        its metrics would describe part of the data, and the previous run's are not this one's. In a
        stage of a pipeline, ``loader`` is a name the stage uses, or else one of setup()'s loaders.

        Example::

            fit, cfg, ctx = ef.build("recipes/digits.py")
            fit.evaluate("valid")  # {'valid/accuracy': 0.1, 'valid/loss': 2.3} before training
        """
        return evaluate_loader(self.eval, self.loaders, loader, self.scope)

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

    def run(self, epochs: int) -> State:
        """Train until ``epochs`` epochs are complete (validating as the eval step asks); returns the
        train state.

        A fit an early stopping ended (:attr:`stopped`, also as a loaded state has it) trains no further.

        Each epoch's RNGs start from ``(seed, epoch)`` (see :mod:`engineflow.state.rng`). After
        :meth:`load_state_dict` the fit continues where that state stood, up to ``epochs`` in all:
        mid-epoch, the batches already trained on are skipped, then the RNGs, the running loss and the
        train metrics are restored as they were at that batch.
        """
        if self.stopped.by is not None:
            self._resume = None
            return self.train.state
        data = EpochData(self.loaders["train"], self.seed, lambda: self.train.state.epoch, self.rank)
        if self._resume is None:
            return self.train.run(data, max_epochs=epochs)
        (skip, share), self._resume = self._resume, None
        loaded = self.resume_position().epoch
        if epochs < loaded:
            raise RecipeError(f"Fit.run(epochs={epochs}): the state it loaded is in epoch {loaded}; "
                              "ask for that many epochs or more")
        if share is not None:
            # at an epoch boundary the next epoch's seeding defines every RNG: nothing more to restore
            data.resume_at(skip, partial(self._restore_within_epoch, share))
        return self.train.run(data, max_epochs=epochs)

    def summary(self, status: str) -> dict[str, Any]:
        """The fit as its run records its stage (see :meth:`StageInfo.summary`)."""
        summary = self.stage.summary(status, self.history, self.best.as_dict(), self.train.state.iteration)
        if self.stopped.by is not None:
            summary["stopped"] = self.stopped.as_dict()
        return summary

    def position(self) -> dict[str, int]:
        """Where the fit stands: epochs completed and batches done in the epoch in progress.

        Example::

            fit.position()   # {'epochs_completed': 2, 'batches_in_epoch': 5}
        """
        position = self.resume_position()
        return {"epochs_completed": position.epochs_completed, "batches_in_epoch": position.batches_in_epoch}

    def resume_position(self) -> Position:
        """Where the fit stands, as its checkpoints record it (see :class:`~engineflow.state.resume.Position`)."""
        return self.tracker.position(self.train.state)

    def resume_record(self) -> ResumeRecord:
        """Everything a resume needs (see :class:`~engineflow.state.resume.ResumeRecord`): the engine's
        position, every stateful component (models, optimizers with their param groups, schedulers, a
        TensorLoader...), which parameters train, the best epoch, the history, the seed, the parts
        registered, and what each process keeps for itself (RNG states, losses, train metrics).

        Collective on several processes: every rank takes it at the same iteration."""
        metrics = {}
        for name, metric in self.train_metrics.items():
            try:
                metrics[name] = metric.state_dict()
            except (NotImplementedError, AttributeError):
                metrics[name] = None
        own = RankState(rng_state(), self.loss.state_dict(), metrics,
                        {name: part.state_dict() for name, part in self.rank_parts.items()})
        # Models and optimizers are the same on every rank; what each rank drew and summed is its own.
        ranks = self.gather(own) if self.gather is not None else [own]
        return ResumeRecord(
            position=self.resume_position(), stage=self.stage, seed=self.seed,
            components=component_states(self.components), requires_grad=trainable(modules_of(self.components)),
            best=self.best.state_dict(), history=list(self.history), layout=order_layout(self.loaders["train"]),
            ranks=ranks, parts={name: part.state_dict() for name, part in self.parts.items()})

    def state_dict(self) -> dict[str, Any]:
        """:meth:`resume_record` as a checkpoint holds it (tensors and plain values)."""
        return self.resume_record().to_dict()

    def load_state_dict(self, state: ResumeRecord | Mapping[str, Any]) -> None:
        """Load a :meth:`resume_record` (or its :meth:`state_dict`); the next :meth:`run` continues from it.

        Saved in the middle of an epoch on another number of processes, the epoch continues after
        the positions of its order the processes had trained on, each later one once (see
        :mod:`engineflow.shards`); this needs a train loader engineflow deals out itself
        (a ``DataLoader`` it sharded, a ``TensorLoader``).
        """
        record = state if isinstance(state, ResumeRecord) else ResumeRecord.from_dict(state)
        if record.layout is not None:  # a loader sharded when saved is sharded here too (its orders are those)
            self.loaders["train"] = positioned(self.loaders["train"], record.layout)
        loader = self.loaders["train"]
        whole = _length(loader)  # batches in a whole epoch here
        plan = plan_resume(record, order_layout(loader), self.world_size)
        self._restore(record)
        if plan.start_at is not None:
            resume_order(loader, plan.start_at)
        length, position = _length(loader), record.position
        # Ignite derives the epoch from iteration // epoch_length, which an EndEpoch, or epochs of
        # another length on another number of processes, makes wrong: load the epochs the state
        # counted, then its iteration (the first epoch then runs only the remaining batches, as in
        # Ignite's own mid-epoch resume).
        self.train.load_state_dict({"epoch": position.epochs_completed,
                                    "epoch_length": length if length is not None else position.epoch_length,
                                    "max_epochs": position.max_epochs})
        self.train.state.iteration = position.iteration
        self.train.start_epoch_after(plan.skip)
        self.tracker.restore(position, plan.skip, whole if whole is not None and whole != length else None)
        share, partial_metrics = _rank_share(record, self.rank, plan.moved, self.train_metrics, self.world_size)
        # train metrics that count only some of the epoch's steps before the resume (see regrouped_metric_state)
        self.partial_metrics = partial_metrics if position.mid_epoch else []
        # the running loss (the progress line's) goes on across epochs; the epoch's sums only within one
        self.loss.load_running(share.loss)
        self._resume = (plan.skip, share if position.mid_epoch else None)

    def _restore(self, record: ResumeRecord) -> None:
        """The components, the best epoch, the history and the registered parts, as ``record`` has them."""
        try:
            load_component_states(self.components, record.components, record.requires_grad)
        except KeyError as err:
            raise RecipeError(f"the checkpoint has no state for component {err.args[0]!r} (it holds "
                              f"{', '.join(record.components)}); did setup() change since the run started?") from None
        self.best.load_state_dict(record.best)
        self.history[:] = record.history
        for name, part in self.parts.items():
            if name in record.parts:  # a part registered since the checkpoint was written starts afresh
                part.load_state_dict(record.parts[name])

    def _restore_within_epoch(self, share: RankState) -> None:
        """Mid-epoch, once the batches already trained on are skipped: this rank's sums, metrics and RNGs."""
        self.loss.load_state_dict(share.loss)
        for name, metric_state in share.train_metrics.items():
            if metric_state is not None:
                self.train_metrics[name].load_state_dict(metric_state)
        if share.rng:  # a rank new to the epoch keeps the epoch's seeding
            set_rng_state(share.rng)
        for name, part in self.rank_parts.items():
            if name in share.parts:
                part.load_state_dict(share.parts[name])


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: the engine keeps the saved epoch length
        return None


def _rank_share(record: ResumeRecord, rank: int, moved: bool, metrics: Mapping[str, Any],
                world_size: int) -> tuple[RankState, list[str]]:
    """What this rank restores within an epoch, and the train metrics that cannot count every saved
    step: its own saved RNGs, sums and train metrics; after a change of the number of processes,
    rank 0 the sum of every saved rank's losses, every rank its namesake's RNGs (new ranks keep the
    epoch's seeding), and each train metric's state regrouped for this number (see
    :func:`~engineflow.execute.parallel.regrouped_metric_state`)."""
    saved = record.ranks
    if not moved:
        return saved[rank if len(saved) > 1 else 0], []
    loss = LossMonitor.regrouped([s.loss for s in saved], rank)
    regrouped, partial_metrics = {}, []
    for name, metric in metrics.items():
        # every rank saved the same list of every rank's state (Ignite gathers it)
        regrouped[name], complete = regrouped_metric_state(metric, saved[0].train_metrics.get(name), rank, world_size)
        if not complete:
            partial_metrics.append(name)
    mine = saved[rank] if rank < len(saved) else None
    return RankState(mine.rng if mine else {}, loss, regrouped, mine.parts if mine else {}), partial_metrics


def build_fit(
    recipe: Recipe,
    components: Mapping[str, Any],
    scope: StageScope,
    *,
    seed: int = 0,
    extras: Iterable[Callable[[Fit], Iterable[HandlerSpec]]] = (),
    stage: Stage | None = None,
    loaders: Mapping[str, Iterable[Any]] | None = None,
    loader_scope: LoaderScope | None = None,
) -> Fit:
    """Build the engines of a fit from a recipe and the components its ``setup`` returned.

    Args:
        recipe: the loaded recipe.
        components: what ``setup`` returned; ``loaders`` must hold a "train" loader.
        scope: the stage's names (its place in the pipeline, ``cfg``, ``run``, the components...);
            the fit adds its own ``history``, ``best`` and ``evaluate``.
        extras: functions of the fit that return more handlers (progress, logging), attached with
            the recipe's by order.
        stage: in a pipeline, the train stage this fit runs: its steps, and the recipe's handlers
            for it (pipeline-wide ones count iterations and epochs across stages).
        loaders: the stage's loaders (default: setup()'s).
        loader_scope: where ``evaluate`` finds a loader the stage does not name (default: its loaders only).
    """
    info = scope.info
    loaders = dict(loaders) if loaders is not None else loaders_of(components, recipe)
    train_spec, eval_spec = (stage.train, stage.eval) if stage is not None else resolve_steps(recipe, components)
    eval_loaders = eval_loaders_of(eval_spec, loaders, recipe)
    best = Best(*main_metric(eval_spec, eval_loaders, train_spec, recipe))
    run = scope.base.get("run")
    distributed = getattr(run, "world_size", 1) > 1
    monitor = LossMonitor(reduce=sum_over_ranks if distributed else None)
    history: list[dict[str, Any]] = []
    # Two phases: the eval engine first, then the train engine, whose steps and handlers may ask for
    # `evaluate` (a function of the eval engine and the loaders).
    provided = scope.names(history=history, best=best)
    evaluator = eval_engine(eval_spec, provided) if eval_spec is not None else None
    loader_scope = loader_scope or LoaderScope()
    provided["evaluate"] = partial(evaluate_loader, evaluator, loaders, scope=loader_scope)
    options = step_options(train_spec, stage, scope.base.get("cfg") or {}, precision=getattr(run, "precision", None))
    if options.channels_last:  # before DDP wraps them: its buckets follow the parameters' layout
        to_channels_last(modules_of(components).values())
    # on several processes the train step gets DDP-wrapped modules; everything else the plain ones
    wrapped = train_wrappers(components) if distributed else {}
    synced = [m for v in wrapped.values() for m in (v.values() if isinstance(v, Mapping) else (v,))
              if hasattr(m, "no_sync")]
    backprop = Backprop(options, scope.base.get("device") or "cpu", step=describe(train_spec.fn), synced=synced)
    provided["backprop"] = backprop
    given = {**provided, **wrapped}
    if options.compile:
        given.update(compiled({name: given[name] for name in components},
                              options.compile if isinstance(options.compile, Mapping) else None))
    tracker = EpochTracker()
    train = make_engine(train_spec, given, around=lambda engine: backprop.iteration(_last_batch(tracker, engine)))
    scope.progress.follow(train)
    attach_metrics(train, train_spec.metrics, prefix="train/")
    fit = Fit(train, evaluator, components, loaders, eval_loaders, best, monitor, history,
              {f"train/{name}": m for name, m in train_spec.metrics.items()}, seed, eval_spec, info,
              getattr(run, "rank", 0), getattr(run, "world_size", 1),
              gather_objects if distributed else None, loader_scope, tracker=tracker)
    fit.register("backprop", backprop)
    fit.register("gradients", AccumulatedGradients(backprop, modules_of(components)), per_rank=True)

    own = [*_own_handlers(fit, eval_spec), *tool_handlers(recipe.tools, fit, stage.name if stage is not None else None),
           *(s for make in extras for s in make(fit))]
    everything = [*own, *(stage_handlers(recipe.handlers, stage) if stage is not None else recipe.handlers)]
    for kind, engine in (("train", train), ("eval", evaluator)):
        specs = [s for s in everything if s.engine == kind]
        if engine is None:
            if specs and not all(s.raw or (stage is not None and s.stage is None) for s in specs):
                names = ", ".join(s.fn.__name__ for s in specs if not s.raw)
                where = f"stage {stage.name!r} has" if stage is not None else "there is"
                raise RecipeError(f"{recipe.path}: handlers {names} are for the eval engine, but {where} no eval step")
            continue
        # pipeline-wide handlers count the train engine's iterations and epochs across stages
        counted = (info.iterations_before, info.epochs_before) if kind == "train" else (0, 0)
        attach_in_order(engine, specs, provided, before=counted)
    return fit


def _last_batch(tracker: EpochTracker, engine: StepEngine) -> bool:
    """Whether the batch in progress is its epoch's last (an accumulation group ends there)."""
    length = engine.state.epoch_length
    return length is not None and tracker.position(engine.state).batches_in_epoch >= length


def stage_handlers(handlers: Iterable[HandlerSpec], stage: Stage) -> list[HandlerSpec]:
    """The recipe's handlers that attach in ``stage``: pipeline-wide ones and the stage's own; one
    declared for a step (``engine=finetune``) only where that step runs."""
    steps = stage.steps()
    return [h for h in handlers if h.stage in (None, stage.name)
            and (h.step is None or any(s.fn is h.step or wraps_around(s.fn, h.step) for s in steps))]


def _own_handlers(fit: Fit, eval_spec: StepSpec | None) -> list[HandlerSpec]:
    def clear_metrics(engine: StepEngine) -> None:
        engine.state.metrics.clear()

    def validate(engine: StepEngine) -> None:
        with ExitStack() as around:
            for context in fit.around_validation:
                around.enter_context(context())
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
        spec(fit.tracker.epoch_started, Events.EPOCH_STARTED, orders.FIT_EPOCH_STARTED),
        spec(fit.tracker.epoch_completed, Events.EPOCH_COMPLETED, orders.FIT_EPOCH_COMPLETED),
        spec(clear_metrics, Events.EPOCH_STARTED, orders.CLEAR_METRICS),
        spec(fit.loss.epoch_started, Events.EPOCH_STARTED, orders.LOSS_EPOCH_STARTED),
        spec(fit.loss.iteration_completed, Events.ITERATION_COMPLETED, orders.LOSS_CHECK),
        spec(fit.loss.epoch_completed, Events.EPOCH_COMPLETED, orders.TRAIN_LOSS),
        spec(record, Events.EPOCH_COMPLETED, orders.HISTORY),
        *learning_rate_handlers(fit),
        *grad_norm_handlers(fit),
    ]
    if eval_spec is not None and eval_spec.every > 0 and fit.eval_loaders:
        own.append(spec(validate, Events.EPOCH_COMPLETED(every=eval_spec.every), orders.VALIDATION))
    return own


def _scalar(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:
        return float(value)
    return None
