"""Learning-rate schedules that engineflow steps: ``ef.schedule(scheduler, every=...)``.

``setup()`` (or a stage's ``prepare``) returns the wrapped scheduler as a component, under any name;
its state (the scheduler's, and where its warm-up stands) is in every checkpoint, as any component's::

    scheduler=ef.schedule(torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=300), every="iteration")

What engineflow does with it (:mod:`engineflow.execute.learning_rates` attaches the handlers):

- a torch scheduler steps after each iteration whose optimizers stepped (``every="iteration"``), or
  once per epoch after its validation (``every="epoch"``); torch's ``ReduceLROnPlateau`` is given the
  epoch's value of the fit's main metric, and an epoch without it (not validated) does not step it;
- an Ignite parameter scheduler (``ignite.handlers.param_scheduler``: ``LinearCyclicalScheduler``,
  ``CosineAnnealingScheduler``, ``ConcatScheduler``, ``LRScheduler``, what
  ``create_lr_scheduler_with_warmup`` returns...) is called as Ignite's documentation attaches it:
  when each iteration (``every="iteration"``; after an iteration whose optimizers did not step, it is
  not called again) or each epoch starts;
- ``warmup=N`` (torch schedulers): the first N steps (iterations, or epochs) raise each param
  group's learning rate linearly from ``warmup_start`` times the scheduler's own (the lr the group has
  when ``ef.schedule`` is called) to that lr, then the scheduler takes over from its first value, as
  torch's ``SequentialLR([LinearLR(start_factor=warmup_start, total_iters=N), scheduler], [N])`` does.

A torch scheduler returned without ``ef.schedule`` is checkpointed but not stepped by engineflow: a
handler of the recipe steps it.
"""

from __future__ import annotations

from typing import Any

from engineflow.errors import RecipeError

EVERY = ("iteration", "epoch")


class Schedule:
    """A scheduler and when engineflow steps it; a component with ``state_dict``/``load_state_dict``.

    Attributes:
        scheduler: the torch LR scheduler or Ignite parameter scheduler.
        every: "iteration" or "epoch".
        kind: "torch", "plateau" (torch's ReduceLROnPlateau) or "ignite".
        optimizers: the optimizers it schedules (empty when the scheduler does not say).
        warmup: steps of linear warm-up before the scheduler's own (torch schedulers).
        warmup_start: the warm-up's first factor of each group's learning rate.
        warmed: warm-up steps done.
        pending: an Ignite scheduler is called at the next start (its optimizers stepped since the last call).
        called_in_epoch: the pipeline's epoch an Ignite ``every="epoch"`` scheduler was last called in
            (a mid-epoch resume starts that epoch again without calling it twice).

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=1.0)
        >>> schedule = ef.schedule(torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5), every="epoch", warmup=2)
        >>> lrs = []
        >>> for epoch in range(5):  # what engineflow does at the end of each epoch
        ...     lrs.append(optimizer.param_groups[0]["lr"])
        ...     optimizer.step()
        ...     schedule.step()
        >>> lrs
        [0.1, 0.55, 1.0, 1.0, 0.5]
    """

    def __init__(self, scheduler: Any, *, every: str, warmup: int = 0, warmup_start: float = 0.1) -> None:
        self.scheduler = scheduler
        self.kind = _kind(scheduler)
        if every not in EVERY:
            raise RecipeError(f"ef.schedule(..., every={every!r}): every is 'iteration' or 'epoch'")
        if self.kind == "plateau" and every != "epoch":
            raise RecipeError("ef.schedule(ReduceLROnPlateau(...), every='iteration'): a plateau schedule reads the "
                              "epoch's main metric; use every='epoch'")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise RecipeError(f"ef.schedule(..., warmup={warmup!r}): warmup is a whole number of steps >= 0")
        if warmup and self.kind == "ignite":
            raise RecipeError("ef.schedule(<Ignite scheduler>, warmup=...): warm-up is for torch schedulers; build "
                              "the Ignite one with ignite.handlers.create_lr_scheduler_with_warmup instead")
        if not 0.0 <= warmup_start <= 1.0:
            raise RecipeError(f"ef.schedule(..., warmup_start={warmup_start!r}): a factor from 0 to 1")
        self.every = every
        optimizer = getattr(scheduler, "optimizer", None)  # a list for Ignite's ParamGroupScheduler
        self.optimizers = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else \
            (optimizer,) if optimizer is not None else ()
        self.warmup, self.warmup_start = warmup, float(warmup_start)
        self.warmed = 0
        self.pending = True
        self.called_in_epoch = 0
        # the learning rates the scheduler starts from (it set them when it was built): the warm-up's end
        self.targets = [group["lr"] for group in scheduler.optimizer.param_groups] if warmup else []
        if warmup:
            self._set_warmup_lr()

    def step(self, metric: float | None = None) -> None:
        """One step of a torch schedule (an iteration or an epoch): the warm-up's, else the scheduler's
        (``metric``: the main metric's value, for ReduceLROnPlateau)."""
        if self.warmed < self.warmup:
            self.warmed += 1
            self._set_warmup_lr()
        elif self.kind == "plateau":
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def call(self, engine: Any) -> None:
        """Call an Ignite parameter scheduler (it sets its value for the iteration or epoch that starts)."""
        self.scheduler(engine)
        self.pending = False

    def _set_warmup_lr(self) -> None:
        factor = self.warmup_start + (1.0 - self.warmup_start) * self.warmed / self.warmup
        for group, target in zip(self.scheduler.optimizer.param_groups, self.targets, strict=True):
            # the warm-up's last step gives back the scheduler's own value exactly, which a chainable
            # scheduler multiplies from
            group["lr"] = target if self.warmed == self.warmup else target * factor

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state and where the warm-up and the calls stand."""
        return {"scheduler": self.scheduler.state_dict(), "warmed": self.warmed, "targets": list(self.targets),
                "pending": self.pending, "called_in_epoch": self.called_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.warmed, self.targets = state["warmed"], list(state["targets"])
        self.pending, self.called_in_epoch = state["pending"], state["called_in_epoch"]

    def __repr__(self) -> str:
        warm = f", warmup={self.warmup}" if self.warmup else ""
        return f"ef.schedule({type(self.scheduler).__name__}, every={self.every!r}{warm})"


def schedule(scheduler: Any, *, every: str, warmup: int = 0, warmup_start: float = 0.1) -> Schedule:
    """A scheduler that engineflow steps every ``"iteration"`` or every ``"epoch"``, after a linear
    warm-up of ``warmup`` steps from ``warmup_start`` times its learning rate (see
    :mod:`engineflow.declare.schedules`). Return it from ``setup`` (or a stage's ``prepare``).

    Args:
        scheduler: a torch LR scheduler (``ReduceLROnPlateau`` included) or an Ignite parameter scheduler.
        every: when it steps: "iteration" (after each iteration whose optimizers stepped; an Ignite
            scheduler: as each iteration starts) or "epoch" (after validation; an Ignite scheduler:
            as each epoch starts).
        warmup: warm-up steps, counted in ``every``'s unit (torch schedulers only).
        warmup_start: the warm-up's first factor of each group's learning rate.

    Raises:
        RecipeError: not a scheduler, or an option it cannot take.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
        >>> ef.schedule(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100), every="iteration")
        ef.schedule(CosineAnnealingLR, every='iteration')
    """
    return Schedule(scheduler, every=every, warmup=warmup, warmup_start=warmup_start)


def is_schedule(value: Any) -> bool:
    """Whether ``value`` is an :func:`schedule` (a schedule engineflow steps)."""
    return isinstance(value, Schedule)


def _kind(scheduler: Any) -> str:
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    if isinstance(scheduler, ReduceLROnPlateau):
        return "plateau"
    if isinstance(scheduler, LRScheduler):
        return "torch"
    from ignite.handlers.param_scheduler import BaseParamScheduler, ParamGroupScheduler, ReduceLROnPlateauScheduler

    if isinstance(scheduler, ReduceLROnPlateauScheduler):
        raise RecipeError("ef.schedule(ReduceLROnPlateauScheduler(...)): Ignite's plateau scheduler reads an "
                          "evaluator's metrics; use torch's ReduceLROnPlateau, which engineflow gives the main metric")
    if isinstance(scheduler, (BaseParamScheduler, ParamGroupScheduler)):
        return "ignite"
    raise RecipeError(f"ef.schedule(...) takes a torch LR scheduler (torch.optim.lr_scheduler) or an Ignite "
                      f"parameter scheduler (ignite.handlers.param_scheduler), got {type(scheduler).__name__}")
