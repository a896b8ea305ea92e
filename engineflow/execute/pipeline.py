"""A recipe's stages, run in order on one set of components: train stages, test and infer passes.

A recipe without ``stages`` is a pipeline of one train stage, "fit", whose records carry no
prefix: exactly what such a recipe always ran. With ``stages``, each stage in turn:

1. its RNGs are seeded from ``(seed, stage index)``, then its ``prepare`` runs (a new optimizer,
   frozen layers, a head), its changes kept in the components the next stages get;
2. a train stage builds a :class:`~engineflow.execute.fit.Fit` with its steps, loaders and handlers
   and runs its epochs; a test pass runs the eval step's metrics over its loaders; an infer pass
   runs the infer step over its loaders (no gradients, eval mode) and keeps the predictions;
3. its summary (name, status, epochs, best, metrics) joins those of the stages before it.

``StopFit`` ends the stage it is raised in; the next stage starts as usual. An early stopping
declared for every stage (``ef.early_stopping(...)`` without ``stage=``) that stops ends the
pipeline's training: the later train stages are skipped (their ``prepare`` still runs, so
the components are those every later stage and ``ef.load_run`` expect; they train no epoch:
status "skipped"), its test and inference passes still run.

Resuming needs the components as they were built, not as setup() alone builds them: the stages
before the one a checkpoint was written in are prepared again in order, each from its own seed, so
a new head or optimizer exists again with the same structure, and the checkpoint then gives
every component its state (``requires_grad`` flags and optimizer param groups included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch

from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe
from engineflow.declare.stages import Stage
from engineflow.errors import EngineflowError, RecipeError, SetupError
from engineflow.execute.fit import Fit, build_fit, stage_handlers
from engineflow.execute.injection import check_component_names, describe, make_caller
from engineflow.execute.parallel import current_world
from engineflow.execute.passes import evaluation_pass, inference_pass
from engineflow.execute.scope import StageScope
from engineflow.execute.validation import LoaderScope
from engineflow.execute.wiring import eval_loaders_of, main_metric, resolve_steps, step_options
from engineflow.state.components import load_component_states
from engineflow.state.resume import ResumeRecord, StageInfo
from engineflow.state.rng import seed_rngs, stage_seed

CHECK_BATCHES = 2  # --check: the first 2 batches of every loader
CHECK_EPOCHS = 2  # --check: 2 epochs of each train stage


def stage_epochs(recipe: Recipe, cfg: Mapping[str, Any], *, check: bool, only: str | None = None) -> list[int]:
    """Epochs of each stage in order (0 for test and infer passes); a recipe without stages has
    one, ``cfg.epochs`` (default 1). ``--check`` runs :data:`CHECK_EPOCHS` of each train stage;
    ``only`` (``--stage``): that stage's epochs, 0 for every other."""
    if not recipe.stages:
        return [CHECK_EPOCHS if check else cfg.get("epochs", 1)]
    epochs = []
    for stage in recipe.stages:
        value = stage.epochs
        if isinstance(value, str):
            if value not in cfg:
                raise RecipeError(f"{recipe.path}: stage {stage.name!r} takes its epochs from config key {value!r}, "
                                  f"which the config does not have; add it to ef.config(...)")
            value = cfg[value]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{recipe.path}: stage {stage.name!r}: config {stage.epochs!r} must be a whole "
                                  f"number of epochs >= 1, got {value!r}")
        epochs.append(0 if stage.kind != "train" or only not in (None, stage.name) else
                      CHECK_EPOCHS if check else value)
    return epochs


class Pipeline:
    """The stages of one recipe run, the components they share, and where the run stands.

    Args:
        recipe: the loaded recipe.
        components: what setup() returned (loaders included); stages' ``prepare`` changes it.
        provided: the names steps and handlers get besides the components (``cfg``, ``device``, ``run``).
        epochs: epochs of each stage, in order (0 for test and infer passes).
        seed: the run's seed.
        extras: functions of a fit returning more handlers (reporter, recorder, checkpointer).
        listeners: objects told of stage boundaries: ``stage_started(pipeline)``,
            ``stage_completed(pipeline, summary)`` and ``predictions(pipeline, loader, outputs)``,
            each optional.

    Example:
        >>> import engineflow as ef
        >>> tiny = {"pretrain_epochs": 1, "frozen_epochs": 1, "finetune_epochs": 1, "threads": 0}  # 0: torch's own
        >>> pipeline, cfg, ctx = ef.build("recipes/pretrain_finetune.py", tiny)
        >>> pipeline.fit.stage.name               # the first stage is built
        'pretrain'
        >>> pipeline.run()                        # every stage, in order
        >>> for summary in pipeline.summaries:    # one record per stage
        ...     print(summary["name"], summary["kind"], summary["status"], summary["epochs"])
        pretrain train completed 1
        frozen train completed 1
        finetune train completed 1
        test test completed 0
        predict infer completed 0
    """

    def __init__(self, recipe: Recipe, components: dict[str, Any], provided: Mapping[str, Any], *,
                 epochs: list[int], seed: int,
                 extras: Iterable[Callable[[Fit], Iterable[HandlerSpec]]] = (), listeners: Iterable[Any] = ()) -> None:
        self.recipe = recipe
        self.stages: tuple[Stage, ...] = recipe.stages
        self.components = components
        self.provided = dict(provided)
        self.epochs = list(epochs)
        self.seed = seed
        self.extras = tuple(extras)
        self.listeners = list(listeners)
        self.info = StageInfo()
        self.fit: Fit | None = None
        self.last_fit: Fit | None = None  # the latest train stage's fit
        self.summaries: list[dict[str, Any]] = []
        self.predictions: dict[str, dict[str, Any]] = {}
        self._stage_done = False
        self._skipping = False  # an early stopping of every stage stopped: later train stages do not train
        self._test_metrics: dict[str, Any] = {}
        self._prepared = -1  # the highest stage index whose prepare has run

    @property
    def staged(self) -> bool:
        """Whether the recipe declares stages (else it is one fit, recorded without a prefix)."""
        return bool(self.stages)

    def stage_index(self, name: str) -> int:
        """The index of the stage called ``name``; RecipeError naming the stages when none is."""
        names = [s.name for s in self.stages] if self.staged else ["fit"]
        if name not in names:
            raise RecipeError(f"{self.recipe.path}: no stage named {name!r}; its stages are {', '.join(names)}")
        return names.index(name)

    # building ---------------------------------------------------------------------------------
    def enter(self, index: int) -> None:
        """Make stage ``index`` the current one: prepare it (and, first, any before it not yet
        prepared) and build its engines. Nothing runs."""
        self._prepare_through(index)
        self.info = self._info(index)
        self._stage_done = False
        self.fit = None
        if self.info.kind == "train" and not self._skipping:
            self.fit = self._build_fit(index)
            self.last_fit = self.fit

    def check_stages(self) -> None:
        """What can be checked of every stage before the first one runs: the loaders each names, and
        each train stage's validation loaders and main metric (RecipeError naming the stage)."""
        for index, stage in enumerate(self.stages):
            loaders = self.stage_loaders(index)
            if stage.kind == "train":
                eval_loaders = eval_loaders_of(stage.eval, loaders, self.recipe)
                main_metric(stage.eval, eval_loaders, stage.train, self.recipe)
        self.step_options()

    def step_options(self) -> dict[str, dict[str, Any]]:
        """Each train stage's step options as it trains with them (``run.json``'s ``step_options``), by
        stage name ("fit" for a recipe without stages); RecipeError naming a stage whose options are wrong."""
        cfg, run = self.provided.get("cfg") or {}, self.provided.get("run")
        precision = getattr(run, "precision", None)
        if not self.staged:
            train = resolve_steps(self.recipe, self.components)[0]
            return {"fit": step_options(train, None, cfg, precision=precision).as_dict()}
        return {stage.name: step_options(stage.train, stage, cfg, precision=precision).as_dict()
                for stage in self.stages if stage.kind == "train" and stage.train is not None}

    def prepare_all(self) -> None:
        """Run the ``prepare`` of every stage not yet prepared, in order: the components as the
        whole pipeline leaves them (structure; ``ef.load_run`` then loads the weights)."""
        self._prepare_through(len(self.stages) - 1)

    def _prepare_through(self, index: int) -> None:
        """Run the ``prepare`` of every stage up to ``index`` not yet prepared, in order."""
        while self.staged and self._prepared < index:
            self._prepare(self._prepared + 1)

    def _info(self, index: int) -> StageInfo:
        if not self.staged:
            return StageInfo()
        done = tuple(self.summaries[:index])
        return StageInfo(self.stages[index].name, index, self.stages[index].kind, f"{self.stages[index].name}/",
                         sum(d["epochs"] for d in done), sum(d.get("iterations", 0) for d in done), done)

    def _prepare(self, index: int) -> None:
        stage = self.stages[index]
        seed_rngs(stage_seed(self.seed, index))
        self._prepared = index
        if stage.prepare is None:
            return
        call = make_caller(stage.prepare, provided=self.scope(index).names(), what=f"prepare of stage {stage.name!r}")
        try:
            changed = call({})
        except EngineflowError:
            raise
        except Exception as err:
            raise SetupError(f"prepare {describe(stage.prepare)} of stage {stage.name!r} failed: "
                             f"{type(err).__name__}: {err}") from err
        if changed is None:
            return
        if not isinstance(changed, Mapping):
            raise RecipeError(f"prepare {describe(stage.prepare)} of stage {stage.name!r} returned "
                              f"{type(changed).__name__}; return a dict of the components it adds or replaces "
                              "(e.g. {'optimizer': ...}), or None")
        check_component_names(changed, f"prepare {describe(stage.prepare)} of stage {stage.name!r}")
        if "loaders" in changed:  # they are cut for --check and sharded for several processes once, after setup()
            raise RecipeError(f"prepare {describe(stage.prepare)} of stage {stage.name!r} returned loaders; return "
                              "every loader from setup() and pick a stage's with ef.stage(..., loaders={...})")
        device = self.provided.get("device")
        self.components.update({name: to_device(value, device) for name, value in changed.items()})

    def scope(self, index: int) -> StageScope:
        """What the user functions of stage ``index`` may ask for (see :mod:`engineflow.execute.scope`)."""
        info = self._info(index)
        run = self.provided.get("run")
        base = {**self.provided, "run": replace(run, stage=info.name) if run is not None and self.staged else run}
        last = self.last_fit  # after a train stage: its tracker, the pipeline's history (a fit gives its own)
        return StageScope(info, base, self.components, history=self.history() if last is not None else None,
                          best=last.best if last is not None else None)

    def stage_loaders(self, index: int) -> dict[str, Iterable[Any]]:
        """The loaders of stage ``index`` by their names in the stage (``--check``: cut short)."""
        available = self._setup_loaders()
        return {name: available[source] for name, source in self._loader_sources(index).items()}

    def _setup_loaders(self) -> Mapping[str, Iterable[Any]]:
        available = self.components.get("loaders")
        if not isinstance(available, Mapping):
            raise RecipeError(f"{self.recipe.path}: setup() returned no loaders dict; return "
                              "loaders={'train': ..., 'valid': ...} with the other components")
        return available

    def _loader_sources(self, index: int) -> dict[str, str]:
        """Stage ``index``'s name of each of its loaders -> setup()'s name."""
        available = self._setup_loaders()
        stage = self.stages[index] if self.staged else None
        wanted = stage.loaders if stage is not None else None
        if wanted is None:
            if stage is not None and stage.kind == "test":
                wanted = {"test": "test"}
            elif stage is not None and stage.kind == "infer":
                wanted = {"infer": "infer"} if "infer" in available else {"test": "test"}
            else:
                wanted = {name: name for name in available}
        missing = [source for source in wanted.values() if source not in available]
        if missing:
            raise RecipeError(f"{self.recipe.path}: stage {self.info_name(index)!r} uses loader "
                              f"{', '.join(map(repr, missing))}, but setup() returned loaders "
                              f"{', '.join(available) or '(none)'}; name them with ef.stage(..., loaders={{...}})")
        return dict(wanted)

    def info_name(self, index: int) -> str:
        return self.stages[index].name if self.staged else "fit"

    def _build_fit(self, index: int) -> Fit:
        stage = self.stages[index] if self.staged else None
        seed = stage_seed(self.seed, index) if self.staged else self.seed
        loaders = LoaderScope(stage.name, self._loader_sources(index), self._setup_loaders()) if stage else None
        return build_fit(self.recipe, self.components, self.scope(index), seed=seed, extras=self.extras,
                         stage=stage, loaders=self.stage_loaders(index) if stage is not None else None,
                         loader_scope=loaders)

    # running ----------------------------------------------------------------------------------
    def run(self, *, only: bool = False) -> None:
        """Run the current stage to its end, then each stage after it (``only``: just this one).

        A stage a resumed state had finished is not run again; the next one starts.
        """
        if self.fit is None and self.info.kind == "train" and not self._skipping:
            self.enter(self.info.index)
        while True:
            if not self._stage_done:
                self._run_current()
            self._stage_done = True
            summary = self.summary()
            self.summaries[self.info.index:] = [summary]
            for listener in self.listeners:
                getattr(listener, "stage_completed", _nothing)(self, summary)
            if self.fit is not None and self.fit.stopped.rest:
                self._skipping = True
            if only or self.info.index + 1 >= max(len(self.stages), 1):
                return
            self.enter(self.info.index + 1)

    def _run_current(self) -> None:
        for listener in self.listeners:
            getattr(listener, "stage_started", _nothing)(self)
        index = self.info.index
        if self.fit is not None:
            position = self.fit.resume_position()
            if position.epochs_completed < self.epochs[index] or position.mid_epoch:
                self.fit.run(self.epochs[index])
        elif self.info.kind == "train":
            return  # skipped: an early stopping of every stage ended the training
        elif self.info.kind == "test":
            self._test(index)
        else:
            self._infer(index)

    def _test(self, index: int) -> None:
        stage = self.stages[index]
        metrics = evaluation_pass(stage, self.scope(index).names(), stage_handlers(self.recipe.handlers, stage),
                                  self.stage_loaders(index))
        self._test_metrics = {self.info.metric(k): _scalar(v) for k, v in metrics.items()}

    def _infer(self, index: int) -> None:
        stage = self.stages[index]
        provided, handlers = self.scope(index).names(), stage_handlers(self.recipe.handlers, stage)
        found: dict[str, Any] = {}
        for name, loader in self.stage_loaders(index).items():
            found[name] = inference_pass(stage, provided, handlers, loader, current_world())
            for listener in self.listeners:
                getattr(listener, "predictions", _nothing)(self, name, found[name])
        self.predictions[stage.name] = found

    # what it recorded -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The current stage as the run records it: ``name``, ``kind``, ``status``, ``epochs``
        (completed in the stage), ``best`` (its epoch counted in the stage), ``metrics`` (its
        last), and for the stages after it, ``history``, ``iterations`` and ``epochs_before``."""
        info = self.info
        status = "completed" if self._stage_done else "running"
        if self.fit is None and info.kind == "train":
            return info.summary("skipped")
        if self.fit is not None:
            return self.fit.summary(status)
        entry = info.summary(status)
        if info.kind == "test" and self._stage_done:
            entry["metrics"] = dict(self._test_metrics)
        elif info.kind == "infer" and self._stage_done:
            entry["predictions"] = {name: _shape(v) for name, v in self.predictions.get(info.name, {}).items()}
        return entry

    def _entries(self) -> list[dict[str, Any]]:
        return [*self.summaries[:self.info.index], self.summary()]

    def history(self) -> list[dict[str, Any]]:
        """Every epoch of every train stage so far, as the run records them (pipeline epochs)."""
        return [row for entry in self._entries() for row in entry["history"]]

    def best(self) -> dict[str, Any]:
        """The run's best: the best epoch of the latest train stage that has one (pipeline epoch)."""
        for entry in reversed(self._entries()):
            if "from" in entry:  # another run's stage (``--stage``): its best is that run's weights
                continue
            best = entry.get("best")
            if best and best.get("value") is not None:
                return {**best, "epoch": entry["epochs_before"] + best["epoch"]}
        if self.fit is not None:
            return self.fit.best.as_dict()  # no value yet: the metric and mode it will have
        return {"metric": None, "mode": None, "epoch": None, "value": None}

    def metrics(self) -> dict[str, Any]:
        """The latest value of every metric the run recorded (each stage's last epoch, test metrics)."""
        out: dict[str, Any] = {}
        for entry in self._entries():
            if "from" not in entry:  # another run's stages (``--stage``) are that run's records
                out.update(entry["metrics"])
        return out

    def epochs_run(self) -> int:
        """Epochs this run trained (not those of another run's stages it started from)."""
        return sum(entry["epochs"] for entry in self._entries() if "from" not in entry)

    def epochs_completed(self) -> int:
        """Epochs completed across the train stages so far."""
        return self.info.epochs_before + (len(self.fit.history) if self.fit is not None else 0)

    # state ------------------------------------------------------------------------------------
    def load_state_dict(self, record: ResumeRecord) -> None:
        """Continue from a checkpoint (a train stage's fit state): the stages before its stage are
        prepared again (structure), its stage is entered and its fit loads the state. A stage the
        checkpoint marks finished is not run again by :meth:`run`."""
        where = record.stage
        index = where.index if self.staged else 0
        if self.staged and (index >= len(self.stages) or self.stages[index].name != where.name):
            names = ", ".join(s.name for s in self.stages)
            raise RecipeError(f"the checkpoint was written in stage {where.name!r} (number {index + 1}), "
                              f"which this recipe's stages ({names}) do not have there; did the stages change?")
        self.summaries = [dict(d) for d in where.done]
        if self.fit is None or self.info.index != index or self.fit.train.state.iteration:
            self.enter(index)  # the stage built at start-up (not yet run) takes the state as it is
        assert self.fit is not None
        self.fit.load_state_dict(record)
        self._stage_done = record.finished

    def start_from(self, index: int, record: ResumeRecord, source: str) -> None:
        """``--stage``: make stage ``index`` current, with the components as ``record`` (a checkpoint
        written at the end of an earlier train stage of run ``source``) left them. The stages before
        it are recorded as that run's, ``"from": source``."""
        self._prepare_through(index - 1)
        try:
            load_component_states(self.components, record.components, record.requires_grad)
        except KeyError as err:
            raise RecipeError(f"run {source}'s state has no component {err.args[0]!r} (it holds "
                              f"{', '.join(record.components)}); did setup() or a prepare change since?") from None
        except (RuntimeError, ValueError) as err:  # a shape or a param group that differs: another config
            raise RecipeError(f"run {source}'s state does not fit the components this config builds (was it run "
                              f"with another config?): {' '.join(str(err).split())[:300]}") from None
        info = record.stage
        last = info.summary("completed", record.history, record.best, record.position.iteration)
        done = [*info.done, last]
        for position, later in enumerate(self.stages[len(done):index], start=len(done)):
            # test or infer passes after it, which this run does not repeat
            done.append(StageInfo(later.name, position, later.kind, epochs_before=info.epochs_before + last["epochs"],
                                  ).summary("skipped"))
        self.summaries = [{**d, "history": [], "from": source} for d in done[:index]]
        self.enter(index)


def to_device(value: Any, device: Any) -> Any:
    """Modules (alone or in a dict, e.g. a GAN's) move to the device; ``.to`` keeps their parameters,
    so optimizers built around them stay valid."""
    if device is None:
        return value
    if isinstance(value, torch.nn.Module):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in value.items()}
    return value


def _shape(value: Any) -> Any:
    return list(value.shape) if isinstance(value, torch.Tensor) else len(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return value


def _nothing(*args: Any) -> None:
    """A listener without this hook."""
