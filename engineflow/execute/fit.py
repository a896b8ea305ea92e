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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from ignite.engine import Events, State

from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe
from engineflow.declare.stages import Stage
from engineflow.declare.steps import StepSpec, wraps_around
from engineflow.errors import EngineflowError, RecipeError, StepCheckError
from engineflow.execute.best import Best
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import StepEngine, make_engine
from engineflow.execute.injection import describe
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
from engineflow.execute.stage import Progress, StageInfo
from engineflow.execute.wiring import eval_loaders_of, loaders_of, main_metric, resolve_steps
from engineflow.metrics import attach_metrics, check_metric_takes
from engineflow.shards import Layout
from engineflow.state.components import component_states, load_component_states
from engineflow.state.position import EpochData
from engineflow.state.rng import rng_state, set_rng_state

# what each rank of a data-parallel fit keeps for itself (``state_dict()["ranks"]``)
RANK_STATE = ("rng", "loss", "train_metrics")


@dataclass(frozen=True)
class LoaderScope:
    """Where :meth:`Fit.evaluate` finds a loader by name: the fit's own loaders (a stage's, by the
    names the stage uses), then setup()'s by their own names.

    Attributes:
        stage: the stage's name; None for a recipe without stages (its loaders are setup()'s).
        sources: the stage's name of each of its loaders -> setup()'s name.
        setup: setup()'s loaders.
    """

    stage: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)
    setup: Mapping[str, Iterable[Any]] = field(default_factory=dict)

    def find(self, loaders: Mapping[str, Iterable[Any]], name: str) -> Iterable[Any]:
        """The loader called ``name``; a RecipeError naming what there is when none is."""
        if name in loaders:
            return loaders[name]
        if name in self.setup:
            return self.setup[name]
        if self.stage is None:
            raise RecipeError(f"no loader named {name!r}; setup() returned loaders {', '.join(loaders)}")
        uses = ", ".join(n if self.sources.get(n, n) == n else f"{n} (setup()'s {self.sources[n]!r})"
                         for n in loaders)
        raise RecipeError(f"no loader named {name!r}: stage {self.stage!r} uses loaders {uses}, and setup() "
                          f"returned loaders {', '.join(self.setup) or '(none)'}")


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
        gather: on several processes, collects a value from every rank (see :meth:`state_dict`).
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
    # after a load on another number of processes mid-epoch: train metrics whose saved states could
    # not all be added up (they count the steps since the resume and the first processes' before it)
    partial_metrics: list[str] = field(default_factory=list)
    # where the fit stands in its epochs, kept by its own handlers (see position())
    _epoch_start: int = field(default=0, repr=False)
    _epoch_done: bool = field(default=False, repr=False)
    _restored: bool = field(default=False, repr=False)
    _resume_within_epoch: Callable[[], None] | None = field(default=None, repr=False)
    _resume_batches: int | None = field(default=None, repr=False)
    _whole_epoch: int | None = field(default=None, repr=False)

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
        """Train for ``epochs`` epochs (validating as the eval step asks); returns the train state.

        Each epoch's RNGs start from ``(seed, epoch)`` (see :mod:`engineflow.state.rng`). After
        :meth:`load_state_dict` the fit continues where that state stood: mid-epoch, the batches
        already trained on are skipped, then the RNGs, the running loss and the train metrics are
        restored as they were at that batch.
        """
        data = EpochData(self.loaders["train"], self.seed, lambda: self.train.state.epoch, self.rank)
        if self._resume_batches is None:
            return self.train.run(data, max_epochs=epochs)
        batches, within = self._resume_batches, self._resume_within_epoch
        self._resume_batches = self._resume_within_epoch = None
        if within is not None:
            # at an epoch boundary the next epoch's seeding defines every RNG: nothing more to restore
            data.resume_at(batches, within)
        return self.train.run(data)

    def summary(self, status: str) -> dict[str, Any]:
        """The fit as its run records its stage (see :meth:`StageInfo.summary`)."""
        return self.stage.summary(status, self.history, self.best.as_dict(), self.train.state.iteration)

    def position(self) -> dict[str, int]:
        """Where the fit stands: epochs completed and batches done in the epoch in progress.

        Counted from the events, not from ``iteration % epoch_length``: after an ``EndEpoch`` the
        iteration is no longer a multiple of the epoch length at epoch boundaries.
        """
        state = self.train.state
        if self._epoch_done:
            return {"epochs_completed": state.epoch, "batches_in_epoch": 0}
        return {"epochs_completed": max(state.epoch - 1, 0), "batches_in_epoch": state.iteration - self._epoch_start}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: the engine's counts and position, every stateful component
        (models, optimizers with their param groups, schedulers, a TensorLoader...), which parameters
        train (``requires_grad``), the train metrics, the losses, the best epoch, the history, the RNG
        states and the seed. Tensors and plain values only."""
        engine = self.train.state
        metrics = {}
        for name, metric in self.train_metrics.items():
            try:
                metrics[name] = metric.state_dict()
            except (NotImplementedError, AttributeError):
                metrics[name] = None
        layout = order_layout(self.loaders["train"])
        state = {
            "engine": {"iteration": engine.iteration, "epoch_length": engine.epoch_length,
                       "max_epochs": engine.max_epochs, **self.position()},
                **component_states(self.components),
            "train_metrics": metrics, "loss": self.loss.state_dict(), "best": self.best.state_dict(),
            "history": list(self.history), "rng": rng_state(), "seed": self.seed, "stage": self.stage.state_dict(),
            "order": layout.state_dict() if layout is not None else None,
        }
        if self.gather is not None:
            # Models and optimizers are the same on every rank; what each rank drew and summed is its
            # own. Collective: every rank writes its state_dict at the same iteration.
            state["ranks"] = self.gather({k: state[k] for k in RANK_STATE})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next :meth:`run` continues from it.

        Saved in the middle of an epoch on another number of processes, the epoch continues after
        the positions of its order the processes had trained on, each later one once (see
        :mod:`engineflow.shards`); this needs a train loader engineflow deals out itself
        (a ``DataLoader`` it sharded, a ``TensorLoader``).
        """
        engine = state["engine"]
        within = engine["batches_in_epoch"]
        layout = Layout.from_state(state["order"]) if state.get("order") is not None else None
        if layout is not None:  # a loader sharded when saved is sharded here too (its orders are those)
            self.loaders["train"] = positioned(self.loaders["train"], layout)
        normal = _length(self.loaders["train"])  # batches in a whole epoch here
        try:
            load_component_states(self.components, state)
        except KeyError as err:
            raise RecipeError(f"the checkpoint has no state for component {err.args[0]!r} (it holds "
                              f"{', '.join(state['components'])}); did setup() change since the run started?") from None
        self.best.load_state_dict(state["best"])
        self.history[:] = state["history"]

        ranks = state.get("ranks")
        saved_world = len(ranks) if ranks is not None else 1
        # the processes each pass is dealt out to, then and here (a loader not dealt out by position: the world's)
        here = order_layout(self.loaders["train"])
        moved = bool(within) and ((layout.world if layout else saved_world)
                                  != (here.world if here is not None else self.world_size))
        if within and layout is not None:
            fits = here is not None and here.matches(layout)
            if not fits and moved:
                raise RecipeError(f"the latest checkpoint was written in the middle of an epoch whose train loader "
                                  f"dealt out {layout.samples} samples in batches of {layout.batch}; this "
                                  f"run's does not ({here.state_dict() if here else None}). Resume with the same "
                                  f"data, or on "
                                  f"{saved_world} process(es) (--nproc {saved_world})")
            if moved:  # continue after the positions the saved processes had trained on
                position = layout.consumed(within)
                if position >= layout.samples:
                    raise RecipeError("the state was taken after its epoch's last batch, before the epoch completed; "
                                      "take it at EPOCH_COMPLETED (engineflow's checkpoints are) to resume it on "
                                      "another number of processes")
                resume_order(self.loaders["train"], position)
                within = 0
            elif layout.kind == "shard":
                resume_order(self.loaders["train"], layout.offset)  # the same pass again, then skip
        elif within and saved_world != self.world_size:
            raise RecipeError(f"the latest checkpoint was written in the middle of an epoch on {saved_world} "
                              f"process(es) by a train loader engineflow does not deal out itself; resume it on "
                              f"{saved_world} (--nproc {saved_world}), or give setup() a DataLoader with "
                              "shuffle=True or False or an ef.data.TensorLoader. A checkpoint at an epoch's end "
                              "resumes on any number")
        length = _length(self.loaders["train"])
        # Ignite derives the epoch from iteration // epoch_length, which an EndEpoch, or epochs of
        # another length on another number of processes, makes wrong: load the epochs the state
        # counted, then its iteration (the first epoch then runs only the remaining batches, as in
        # Ignite's own mid-epoch resume).
        self.train.load_state_dict({"epoch": engine["epochs_completed"],
                                    "epoch_length": length if length is not None else engine["epoch_length"],
                                    "max_epochs": engine["max_epochs"]})
        self.train.state.iteration = engine["iteration"]
        self.train.start_epoch_after(within)
        self._epoch_start = engine["iteration"] - within
        self._epoch_done = engine["batches_in_epoch"] == 0
        self._restored = True
        self._resume_batches = within
        self._whole_epoch = normal if normal is not None and normal != length else None

        share = _rank_share(state, ranks, self.rank, moved, self.train_metrics, self.world_size)
        # train metrics that count only some of the epoch's steps before the resume (see regrouped_metric_state)
        self.partial_metrics = list(share.get("partial", ())) if within else []
        # the running loss (the progress line's) goes on across epochs; the epoch's sums only within one
        self.loss.load_running(share["loss"])

        def within_epoch() -> None:
            self.loss.load_state_dict(share["loss"])
            for name, metric_state in share["train_metrics"].items():
                if metric_state is not None:
                    self.train_metrics[name].load_state_dict(metric_state)
            if "rng" in share:  # a rank new to the epoch keeps the epoch's seeding
                set_rng_state(share["rng"])

        self._resume_within_epoch = within_epoch if engine["batches_in_epoch"] else None

    def _epoch_started(self, engine: StepEngine) -> None:
        self._epoch_done = False
        if self._restored:  # the resumed epoch started before the kill, at the restored count
            self._restored = False
            return
        self._epoch_start = engine.state.iteration
        if self._whole_epoch is not None:  # the epoch resumed part-way had a length of its own
            engine.state.epoch_length, self._whole_epoch = self._whole_epoch, None

    def _epoch_completed(self, engine: StepEngine) -> None:
        self._epoch_done = True


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length: the engine keeps the saved epoch length
        return None


def _rank_share(state: Mapping[str, Any], ranks: list[Mapping[str, Any]] | None, rank: int, moved: bool,
                metrics: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """What this rank restores within an epoch: its own saved RNGs, sums and train metrics; after a
    change of the number of processes, rank 0 the sum of every saved rank's losses, every rank its
    namesake's RNGs (new ranks keep the epoch's seeding), and each train metric's state regrouped
    for this number (see :func:`~engineflow.execute.parallel.regrouped_metric_state`)."""
    saved = list(ranks) if ranks is not None else [{k: state[k] for k in RANK_STATE}]
    if not moved:
        share = dict(saved[rank] if ranks is not None else saved[0])
        share["train_metrics"] = share.get("train_metrics") or {}
        return share
    share: dict[str, Any] = {"loss": LossMonitor.regrouped([s["loss"] for s in saved], rank), "train_metrics": {}}
    if rank < len(saved):
        share["rng"] = saved[rank]["rng"]
    share["partial"] = []
    for name, metric in metrics.items():
        # every rank saved the same list of every rank's state (Ignite gathers it)
        share["train_metrics"][name], complete = regrouped_metric_state(
            metric, saved[0]["train_metrics"].get(name), rank, world_size)
        if not complete:
            share["partial"].append(name)
    return share


def build_fit(
    recipe: Recipe,
    components: Mapping[str, Any],
    provided: Mapping[str, Any],
    *,
    seed: int = 0,
    extras: Iterable[Callable[[Fit], Iterable[HandlerSpec]]] = (),
    stage: Stage | None = None,
    loaders: Mapping[str, Iterable[Any]] | None = None,
    info: StageInfo | None = None,
    scope: LoaderScope | None = None,
) -> Fit:
    """Build the engines of a fit from a recipe and the components its ``setup`` returned.

    Args:
        recipe: the loaded recipe.
        components: what ``setup`` returned; ``loaders`` must hold a "train" loader.
        provided: everything steps and handlers may ask for by name (components included).
        extras: functions of the fit that return more handlers (progress, logging), attached with
            the recipe's by order.
        stage: in a pipeline, the train stage this fit runs: its steps, and the recipe's handlers
            for it (pipeline-wide ones count iterations and epochs across stages).
        loaders: the stage's loaders (default: setup()'s).
        info: the stage's place in the pipeline (default: a recipe without stages).
        scope: where ``evaluate`` finds a loader the stage does not name (default: its loaders only).
    """
    info = info or StageInfo()
    loaders = dict(loaders) if loaders is not None else loaders_of(components, recipe)
    train_spec, eval_spec = (stage.train, stage.eval) if stage is not None else resolve_steps(recipe, components)
    eval_loaders = eval_loaders_of(eval_spec, loaders, recipe)
    best = Best(*main_metric(eval_spec, eval_loaders, train_spec, recipe))
    distributed = getattr(provided.get("run"), "world_size", 1) > 1
    monitor = LossMonitor(reduce=sum_over_ranks if distributed else None)
    history: list[dict[str, Any]] = []
    # Two phases: the eval engine first, then the train engine, whose steps and handlers may ask for
    # `evaluate` (a function of the eval engine and the loaders).
    progress = Progress(info)
    provided = {**provided, "history": history, "best": best, "pipeline": progress}
    evaluator = None
    if eval_spec is not None:
        evaluator = make_engine(eval_spec, provided)
        attach_metrics(evaluator, eval_spec.metrics)
    scope = scope or LoaderScope()
    provided["evaluate"] = partial(evaluate_loader, evaluator, loaders, scope=scope)
    # on several processes the train step gets DDP-wrapped modules; everything else the plain ones
    train = make_engine(train_spec, {**provided, **train_wrappers(components)} if distributed else provided)
    progress.engine = train
    attach_metrics(train, train_spec.metrics, prefix="train/")
    fit = Fit(train, evaluator, components, loaders, eval_loaders, best, monitor, history,
              {f"train/{name}": m for name, m in train_spec.metrics.items()}, seed, eval_spec, info,
              getattr(provided.get("run"), "rank", 0), getattr(provided.get("run"), "world_size", 1),
              gather_objects if distributed else None, scope)

    own = [*_own_handlers(fit, eval_spec), *(s for make in extras for s in make(fit))]
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


def stage_handlers(handlers: Iterable[HandlerSpec], stage: Stage) -> list[HandlerSpec]:
    """The recipe's handlers that attach in ``stage``: pipeline-wide ones and the stage's own; one
    declared for a step (``engine=finetune``) only where that step runs."""
    steps = stage.steps()
    return [h for h in handlers if h.stage in (None, stage.name)
            and (h.step is None or any(s.fn is h.step or wraps_around(s.fn, h.step) for s in steps))]


def evaluate_loader(evaluator: StepEngine | None, loaders: Mapping[str, Iterable[Any]],
                    loader: str = "valid", scope: LoaderScope | None = None) -> dict[str, float]:
    """The eval engine's metrics over one loader, ``{"<loader>/<metric>": value}`` (see :meth:`Fit.evaluate`)."""
    if evaluator is None:
        raise RecipeError("the recipe has no eval step; decorate one with @ef.eval_step")
    found = (scope or LoaderScope()).find(loaders, loader)
    state = evaluator.run(found, max_epochs=1)
    return {f"{loader}/{name}": value for name, value in state.metrics.items()}


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
        spec(fit._epoch_started, Events.EPOCH_STARTED, -2000),
        spec(fit._epoch_completed, Events.EPOCH_COMPLETED, -3000),
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
