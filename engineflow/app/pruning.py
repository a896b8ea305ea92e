"""A sweep trial's pruning: the run's main metric reported to Optuna after every epoch, and its stop.

Attached to every train stage's fit of a trial's run (an ``extras`` entry, as the checkpointer is).
After each epoch's validation and best (order :data:`~engineflow.declare.orders.EARLY_STOPPING`),
rank 0 reports the stage's main metric at the pipeline's epoch to the trial and asks its pruner;
on several processes it then shares the decision (an all-reduce every rank makes), so every rank
trains the same epochs and stops at the same one. A prune ends the fit as
:class:`~engineflow.declare.control.StopFit` does, with the pipeline's later train stages skipped:
the epoch's records and checkpoint still run, and the run ends with status "pruned"
(:data:`PRUNED_BY` in its stage's ``stopped``, which the checkpoints keep).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.execute.fit import Fit
from engineflow.execute.parallel import World, max_over_ranks

PRUNED_BY = "pruning"


class Pruning:
    """Reports each epoch's main metric to a trial and stops the fit when its pruner says so.

    Args:
        decide: rank 0's ``decide(value, epoch) -> bool`` (Optuna's report and should_prune); None on
            the other ranks, which take rank 0's decision.
        world: the run's processes.
    """

    def __init__(self, decide: Callable[[float, int], bool] | None, world: World) -> None:
        self.decide = decide
        self.world = world

    def attach(self, fit: Fit) -> list[HandlerSpec]:
        """Keep the fit's ``stopped`` in its checkpoints; the handler after each epoch's best."""
        if "stopped" not in fit.parts:
            fit.register("stopped", fit.stopped)
        metric = fit.best.metric

        def check(engine: Any) -> None:
            value = engine.state.metrics.get(metric)
            if value is None:
                return  # an epoch without validation: nothing to report
            epoch = fit.stage.epochs_before + engine.state.epoch
            stop = self.decide(float(value), epoch) if self.decide is not None else False
            if self.world.distributed:
                stop = bool(max_over_ranks([int(stop)])[0])
            if stop:
                fit.stopped.note(PRUNED_BY, engine.state.epoch, rest=True)
                engine.stop_fit()

        return [HandlerSpec(check, Events.EPOCH_COMPLETED, "train", orders.EARLY_STOPPING, seq=-2, raw=True)]


def trial_pruning(sweep: Mapping[str, Any], world: World, run_id: str) -> Pruning:
    """The pruning of a trial's run in this process: on rank 0, Optuna's trial of ``sweep``
    (``storage``, ``study``, ``trial``, ``pruner``), which is given the run's id at once (user
    attribute ``run_id``); the others follow rank 0."""
    if world.rank != 0:
        return Pruning(None, world)
    from engineflow.app import studies

    trial = studies.trial_handle(sweep)
    trial.set_user_attr("run_id", run_id)

    def decide(value: float, epoch: int) -> bool:
        return studies.report(trial, value if math.isfinite(value) else float("nan"), epoch)

    return Pruning(decide, world)
