"""The LR finder: a short training run whose learning rate grows exponentially, on a twin of the fit's
train engine, and the learning rates its loss curve suggests.

What :func:`sweep_lr` does::

    save every stateful component (models, optimizers, loaders...), the fit's parts, which
        parameters train, their gradients, the modules' modes, the global RNGs, the loaders' generators
    on a twin of the train engine (the same step on the same names, none of the fit's handlers):
        the train loader as the fit's first epochs see it (reseeded per epoch)
        before step i of n:  every param group's lr = start * (end / start) ** (i / (n - 1)), times its
                             ratio to the first group's lr (of the first optimizer) before the sweep
        after the step:      the loss (``loss``, else the first ``*_loss``) smoothed as fastai does;
                             stop when it is not finite or the smoothed loss exceeds DIVERGE x its best
    restore everything saved, also when the step raised

fastai and Lightning smooth the loss the same way (an exponential average, beta 0.98, divided by
``1 - beta**k`` after k steps) and stop at 4x the best smoothed loss; Ignite's ``FastaiLRFinder``
averages with weight 0.05 on the new loss, undebiased, and stops at 5x.

Ignite's ``FastaiLRFinder`` is not used: it sweeps one optimizer (a GAN's recipe has two), restores
only what ``to_save`` holds (not the RNGs, the gradients or the modules' modes), goes on through a
NaN loss (``nan > 5 * best`` is false), and gives every param group the same learning rate.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from engineflow.declare.recipe import Recipe
from engineflow.errors import RecipeError
from engineflow.execute.build import build_pipeline
from engineflow.execute.engine import StepEngine
from engineflow.execute.fit import Fit
from engineflow.execute.losses import is_loss
from engineflow.execute.lr_suggestions import suggestions
from engineflow.execute.pipeline import Pipeline
from engineflow.naming import option
from engineflow.state.components import (
    component_states,
    find_components,
    load_component_states,
    modules_of,
    trainable,
)
from engineflow.state.position import EpochData
from engineflow.state.rng import loader_generators, rng_state, set_rng_state

DIVERGE = 4.0  # stop when the smoothed loss exceeds this many times its best (fastai's and Lightning's)
BETA = 0.98  # the smoothing of the loss (fastai's and Lightning's)


@dataclass(frozen=True)
class LRSweep:
    """What an LR sweep saw and suggests.

    Attributes:
        lrs: the learning rate of each step (the first param group's of the first optimizer).
        losses: the smoothed loss after each step (what the suggestions read).
        raw_losses: the step's own loss.
        suggestions: the learning rate of each rule (``valley``, ``steep``, ``min10``; see
            :mod:`engineflow.execute.lr_suggestions`), None when the sweep has too few points.
        diverged: whether the sweep stopped because the loss diverged.
        stopped: why the sweep ended, in words.
        stage: the train stage swept ("fit" for a recipe without stages).
        steps: the steps asked for (``iterations``).
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, float | None]
    diverged: bool
    stopped: str
    stage: str
    steps: int

    def plot(self, out: str | Path) -> Path:
        """Write the loss against the learning rate (log axis) with each suggestion marked and labelled
        to ``out`` (.png, .svg, .pdf); needs matplotlib (the ``plot`` extra)."""
        from engineflow.execute.lr_plot import plot_sweep

        return plot_sweep(self.lrs, self.losses, self.raw_losses, self.suggestions, out,
                          title=f"LR sweep ({self.stage}): {len(self.lrs)} steps, "
                                f"{'diverged' if self.diverged else 'did not diverge'}")

    def to_dict(self) -> dict[str, Any]:
        """The sweep as plain values (what ``engineflow lr-find --json`` prints)."""
        return {"lrs": list(self.lrs), "losses": list(self.losses), "raw_losses": list(self.raw_losses),
                "suggestions": dict(self.suggestions), "diverged": self.diverged, "stopped": self.stopped,
                "stage": self.stage, "iterations": self.steps}


def lr_find(recipe: str | Path | Recipe | Fit, overrides: Mapping[str, Any] | None = None, *, start: float = 1e-7,
            end: float = 10.0, iterations: int = 100, stage: str | None = None, device: str | torch.device = "cpu",
            seed: int | None = None) -> LRSweep:
    """Sweep the learning rate of a recipe's train step from ``start`` to ``end`` over at most
    ``iterations`` steps, stopping when the loss diverges; returns what it saw and suggests.

    The recipe is built as :func:`engineflow.build` builds it (nothing is recorded), and swept with
    :func:`sweep_lr`; the process's RNGs are as they were before. ``stage``: that train stage of a
    recipe with stages (default: the first train stage), its components as setup() and the prepares
    of the stages up to it build them. Given a :class:`Fit` (``ef.build``'s), it sweeps that fit and
    leaves it as it was.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> sweep = ef.lr_find("recipes/sine.py", {"samples": 64}, iterations=30)
        >>> len(sweep.lrs) <= 30, f"{sweep.lrs[0]:.0e}", sorted(sweep.suggestions)
        (True, '1e-07', ['min10', 'steep', 'valley'])
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})
        >>> before = [p.clone() for p in fit.components["model"].parameters()]
        >>> _ = ef.lr_find(fit, iterations=10)      # a built fit: swept, then left as it was
        >>> all(torch.equal(a, b) for a, b in zip(before, fit.components["model"].parameters()))
        True
    """
    check_sweep(start, end, iterations)
    if isinstance(recipe, Fit):
        given = [name for name, value in (("overrides", overrides), ("stage", stage), ("seed", seed)) if value]
        if given:
            raise RecipeError(f"lr_find(fit, ...): {', '.join(given)} are for a recipe; a fit is swept as it was "
                              "built")
        return sweep_lr(recipe, start=start, end=end, iterations=iterations)
    before = rng_state()
    try:
        pipeline, _, _ = build_pipeline(recipe, overrides, device=device, seed=seed)
        enter_train_stage(pipeline, stage)
        assert pipeline.fit is not None
        return sweep_lr(pipeline.fit, start=start, end=end, iterations=iterations)
    finally:
        set_rng_state(before)


def check_sweep(start: float, end: float, iterations: int) -> None:
    """The sweep's bounds make sense, or a RecipeError naming the option to change."""
    if not (0 < start < end) or not math.isfinite(end):
        raise RecipeError(f"the LR sweep goes from {option('start', start)} up to {option('end', end)}; give "
                          "0 < start < end (e.g. --start 1e-7 --end 10)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 2:
        raise RecipeError(f"the LR sweep needs 2 steps or more; got {option('iterations', iterations)}")


def enter_train_stage(pipeline: Pipeline, stage: str | None) -> None:
    """Make ``stage`` (default: the first train stage) the pipeline's current stage, prepared and built."""
    if not pipeline.staged:
        if stage is not None:
            raise RecipeError(f"{pipeline.recipe.path} declares no stages, so {option('stage', stage)} has nothing "
                              "to pick; drop it")
        return
    trains = [s.name for s in pipeline.stages if s.kind == "train"]
    if not trains:
        raise RecipeError(f"{pipeline.recipe.path} has no train stage; the LR sweep runs a train step")
    index = pipeline.stage_index(stage if stage is not None else trains[0])
    if pipeline.stages[index].kind != "train":
        raise RecipeError(f"stage {stage!r} of {pipeline.recipe.path} is a {pipeline.stages[index].kind} pass; the LR "
                          f"sweep runs a train stage's step: {', '.join(trains)}")
    if index != pipeline.info.index:
        pipeline.enter(index)


def sweep_lr(fit: Fit, *, start: float = 1e-7, end: float = 10.0, iterations: int = 100) -> LRSweep:
    """Sweep the learning rate of ``fit``'s train step (see the module); ``fit`` is left as it was."""
    check_sweep(start, end, iterations)
    groups = _scaled_groups(fit)
    saved = _Saved(fit)
    try:
        trace = _run(fit, groups, start, end, iterations)
    finally:
        saved.restore()
    return LRSweep(trace.lrs, trace.losses, trace.raw, suggestions(trace.lrs, trace.losses, iterations),
                   trace.diverged, trace.stopped, fit.stage.name or "fit", iterations)


def _scaled_groups(fit: Fit) -> list[tuple[dict[str, Any], float]]:
    """Every param group of every optimizer, with its lr's ratio to the first group's."""
    optimizers = find_components(fit.components, lambda value: isinstance(value, torch.optim.Optimizer))
    if not optimizers:
        where = f"stage {fit.stage.name!r}" if fit.stage.name else "setup()"
        raise RecipeError(f"the LR sweep sets the learning rate of an optimizer, but {where} gives no "
                          f"torch.optim.Optimizer (components: {', '.join(fit.components)}); return one, "
                          "e.g. optimizer=torch.optim.SGD(...)")
    groups = [group for optimizer in optimizers.values() for group in optimizer.param_groups]
    first = float(groups[0]["lr"])
    return [(group, float(group["lr"]) / first if first else 1.0) for group in groups]


@dataclass
class _Trace:
    """The sweep's points and the smoothed loss, as the steps come."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    diverged: bool = False
    stopped: str = ""
    running_average: float = 0.0
    _best: float = math.inf

    def observe(self, lr: float, loss: float) -> bool:
        """Count one step; True when the sweep must stop (the loss diverged)."""
        if not math.isfinite(loss):
            self.diverged, self.stopped = True, f"the loss was {loss} at lr {lr:.3g}"
            return True
        self.running_average = BETA * self.running_average + (1 - BETA) * loss
        smoothed = self.running_average / (1 - BETA ** (len(self.losses) + 1))
        self.lrs.append(lr)
        self.raw.append(loss)
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if 0 < self._best and DIVERGE * self._best < smoothed:
            self.diverged = True
            self.stopped = (f"the smoothed loss {smoothed:.4g} passed {DIVERGE:g} x its best {self._best:.4g} "
                            f"at lr {lr:.3g}")
            return True
        return False


def _run(fit: Fit, groups: list[tuple[dict[str, Any], float]], start: float, end: float, steps: int) -> _Trace:
    engine = fit.train.twin()
    trace = _Trace()
    rate = [start]

    def set_lr(engine: StepEngine) -> None:
        rate[0] = start * (end / start) ** min((engine.state.iteration - 1) / (steps - 1), 1.0)
        for group, ratio in groups:
            group["lr"] = rate[0] * ratio

    def observe(engine: StepEngine) -> None:
        if trace.observe(rate[0], _loss_of(engine.state.output, fit)) or engine.state.iteration >= steps:
            engine.terminate()

    engine.add_event_handler(Events.ITERATION_STARTED, set_lr)
    engine.add_event_handler(Events.ITERATION_COMPLETED, observe)
    loader = fit.loaders["train"]
    data = EpochData(loader, fit.seed, lambda: engine.state.epoch, fit.rank)
    engine.run(data, max_epochs=math.ceil(steps / max(len(loader), 1)))  # type: ignore[arg-type]
    if not trace.stopped:
        trace.stopped = (f"{len(trace.lrs)} steps without the loss diverging; a larger --end or more "
                         "--iterations reach further")
    return trace


def _loss_of(output: Any, fit: Fit) -> float:
    if isinstance(output, Mapping):
        names = ["loss"] if "loss" in output else [name for name in output if is_loss(name)]
        value = output[names[0]] if names else None
        if isinstance(value, torch.Tensor):
            return value.detach().item()
        if value is not None:
            return float(value)
    raise RecipeError(f"the train step of {fit.stage.name or 'the recipe'} returned no loss (an output named 'loss' "
                      "or ending in '_loss'); the LR sweep follows that loss")


class _Saved:
    """What a sweep changes, saved in host memory and put back by :meth:`restore`."""

    def __init__(self, fit: Fit) -> None:
        self.fit = fit
        self.states = io.BytesIO()
        torch.save((component_states(fit.components), {name: part.state_dict() for name, part in fit.parts.items()}),
                   self.states)
        modules = modules_of(fit.components)
        self.requires_grad = trainable(modules)
        params = [p for module in modules.values() for p in module.parameters()]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self.modes = [(m, m.training) for module in modules.values() for m in module.modules()]
        self.rng = rng_state()
        self.generators = [(g, g.get_state()) for loader in _loaders(fit) for g in loader_generators(loader)]

    def restore(self) -> None:
        self.states.seek(0)
        # bytes this object wrote a moment ago, not a file from elsewhere: any picklable state loads
        components, parts = torch.load(self.states, weights_only=False)
        load_component_states(self.fit.components, components, self.requires_grad)
        for name, part in self.fit.parts.items():
            part.load_state_dict(parts[name])
        for param, grad in self.grads:
            param.grad = grad
        for module, mode in self.modes:
            module.training = mode
        set_rng_state(self.rng)
        for generator, state in self.generators:
            generator.set_state(state)


def _loaders(fit: Fit) -> Iterable[Any]:
    setup_loaders = fit.components.get("loaders")
    found = [*fit.loaders.values(), *(setup_loaders.values() if isinstance(setup_loaders, Mapping) else ())]
    return list({id(loader): loader for loader in found}.values())
