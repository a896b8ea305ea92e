"""A fit's learning rates: each optimizer's, shown every epoch and iteration, and the schedules that step them.

Names: the component ``optimizer``'s param groups are ``train/lr``, ``train/lr.1``, ...; another
optimizer component's are ``train/<name>/lr``, ``train/<name>/lr.1`` (``train/generator_opt/lr``, and
``train/optimizers.g/lr`` for one in a dict of optimizers).

What runs, on the train engine (orders in :mod:`engineflow.declare.orders`)::

    EPOCH_STARTED, ITERATION_STARTED:  Ignite parameter schedulers set their value (SCHEDULE_STARTED)
    ITERATION_COMPLETED:               each group's lr to TensorBoard (the lr the step used, when it changed),
                                       then each every="iteration" torch schedule steps, when the optimizers
                                       stepped (SCHEDULE_ITERATION)
    EPOCH_COMPLETED:                   train/lr... join the epoch's metrics (LEARNING_RATES: the lr the groups
                                       hold at the epoch's end); after validation and history, each
                                       every="epoch" torch schedule steps (SCHEDULE_EPOCH)

A schedule acts in the stages whose components hold its optimizer (a stage's ``prepare`` that
replaces the optimizer returns a new schedule for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.schedules import Schedule, is_schedule
from engineflow.errors import RecipeError
from engineflow.state.components import find_components

if TYPE_CHECKING:
    from engineflow.execute.engine import StepEngine
    from engineflow.execute.fit import Fit


def optimizers_stepped(fit: Fit) -> bool:
    """Whether the optimizers stepped in the iteration that just ended: the ``stepped`` flag of the fit's
    ``backprop`` part (False on the batches of an accumulation that do not step), else True."""
    return bool(getattr(fit.parts.get("backprop"), "stepped", True))


def optimizers_of(components: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
    """The optimizer components by name (a dict of optimizers gives ``name.key`` entries)."""
    return find_components(components, lambda value: isinstance(value, torch.optim.Optimizer))


def lr_names(name: str, groups: int) -> list[str]:
    """The metric names of an optimizer component's param groups.

    Example:
        >>> lr_names("optimizer", 2), lr_names("d_opt", 1)
        (['train/lr', 'train/lr.1'], ['train/d_opt/lr'])
    """
    base = "train/lr" if name == "optimizer" else f"train/{name}/lr"
    return [base if index == 0 else f"{base}.{index}" for index in range(groups)]


def learning_rates(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
    """Each param group's learning rate, by metric name (see :func:`lr_names`)."""
    rates: dict[str, float] = {}
    for name, optimizer in optimizers.items():
        groups = optimizer.param_groups
        rates.update(zip(lr_names(name, len(groups)), (float(group["lr"]) for group in groups), strict=True))
    return rates


def learning_rate_handlers(fit: Fit) -> list[HandlerSpec]:
    """The handlers that show a fit's learning rates and step its schedules (see the module's docstring).

    Raises:
        RecipeError: a ReduceLROnPlateau's mode is not the main metric's.
    """
    optimizers = optimizers_of(fit.components)
    if not optimizers:
        return []
    held = {id(optimizer) for optimizer in optimizers.values()}
    schedules = [s for s in find_components(fit.components, is_schedule).values()
                 if not s.optimizers or any(id(o) in held for o in s.optimizers)]
    for found in schedules:
        _check_plateau(found, fit)
    by_iteration = [s for s in schedules if s.every == "iteration"]
    stepped_torch = [s for s in by_iteration if s.kind != "ignite"]
    called_ignite = [s for s in by_iteration if s.kind == "ignite"]
    by_epoch = [s for s in schedules if s.every == "epoch"]
    before = fit.stage.epochs_before
    shown = _Shown(fit)

    def iteration_completed(engine: StepEngine) -> None:
        if fit.board.open:
            shown.iteration(learning_rates(optimizers), engine.state.iteration)
        if not optimizers_stepped(fit):
            return
        for schedule in stepped_torch:
            schedule.step()
        for schedule in called_ignite:
            schedule.pending = True

    def iteration_started(engine: StepEngine) -> None:
        for schedule in called_ignite:
            if schedule.pending:
                schedule.call(engine)

    def epoch_started(engine: StepEngine) -> None:
        epoch = before + engine.state.epoch  # the pipeline's: a schedule may go on across stages
        for schedule in by_epoch:
            if schedule.kind == "ignite" and schedule.called_in_epoch != epoch:
                schedule.call(engine)
                schedule.called_in_epoch = epoch

    def epoch_lr(engine: StepEngine) -> None:
        engine.state.metrics.update(learning_rates(optimizers))
        shown.epoch_completed()

    def epoch_completed(engine: StepEngine) -> None:
        for schedule in by_epoch:
            if schedule.kind == "torch":
                schedule.step()
            elif schedule.kind == "plateau":
                value = engine.state.metrics.get(fit.best.metric)
                if value is not None:  # an epoch that did not validate leaves the plateau where it is
                    schedule.step(float(value))

    specs = [HandlerSpec(iteration_completed, Events.ITERATION_COMPLETED, "train", orders.SCHEDULE_ITERATION, -1,
                         raw=True),
             HandlerSpec(epoch_lr, Events.EPOCH_COMPLETED, "train", orders.LEARNING_RATES, -1, raw=True)]
    if called_ignite:
        specs.append(HandlerSpec(iteration_started, Events.ITERATION_STARTED, "train", orders.SCHEDULE_STARTED, -1,
                                 raw=True))
    if any(s.kind == "ignite" for s in by_epoch):
        specs.append(HandlerSpec(epoch_started, Events.EPOCH_STARTED, "train", orders.SCHEDULE_STARTED, -1, raw=True))
    if any(s.kind != "ignite" for s in by_epoch):
        specs.append(HandlerSpec(epoch_completed, Events.EPOCH_COMPLETED, "train", orders.SCHEDULE_EPOCH, -1,
                                 raw=True))
    return specs


class _Shown:
    """Learning rates to the fit's board, each written when it changes (with the iteration before, so that a
    change draws as a step, not a slope) and at the epoch's end: the same lines as a point per
    iteration, without a TensorBoard event per iteration for a learning rate that holds."""

    def __init__(self, fit: Fit) -> None:
        self.fit = fit
        self.last: dict[str, tuple[int, float, bool]] = {}  # name: (iteration, value, written)

    def iteration(self, rates: Mapping[str, float], iteration: int) -> None:
        for name, value in rates.items():
            last = self.last.get(name)
            if last is not None and last[1] == value:
                self.last[name] = (iteration, value, False)
                continue
            if last is not None and not last[2]:
                self.fit.board.scalar(name, last[1], last[0])
            self.fit.board.scalar(name, value, iteration)
            self.last[name] = (iteration, value, True)

    def epoch_completed(self) -> None:
        for name, (iteration, value, written) in self.last.items():
            if not written and self.fit.board.open:
                self.fit.board.scalar(name, value, iteration)
                self.last[name] = (iteration, value, True)


def _check_plateau(schedule: Schedule, fit: Fit) -> None:
    if schedule.kind != "plateau":
        return
    wanted = "min" if fit.best.mode == "min" else "max"
    if schedule.scheduler.mode != wanted:
        raise RecipeError(f"ef.schedule(ReduceLROnPlateau(mode={schedule.scheduler.mode!r})) reads the main metric "
                          f"{fit.best.metric}, which is better when {'lower' if wanted == 'min' else 'higher'}: "
                          f"pass mode={wanted!r}")
