"""``ef.ema``: an exponential moving average of a model's weights, kept in the checkpoints, validated on
when asked, saved with the weights files.

A toolbox declaration (see :mod:`engineflow.declare.tools`): declared at a recipe's top level, it
attaches to the fit of each train stage it acts in::

    train ITERATION_COMPLETED (order EMA_UPDATE), after an iteration whose optimizers stepped:
        decay = min(decay, (1 + n) / (10 + n)) with warmup=True (n: updates so far), else decay
        average = decay * average + (1 - decay) * weight      (see engineflow.state.averages)
    train EPOCH_COMPLETED, validation (order VALIDATION), with evaluate=True:
        on several processes, every rank takes rank 0's average of the buffers (a broadcast)
        the model holds the average while every eval loader is evaluated, then its own weights again

The average is the fit's registered part ``name`` (its checkpoints hold it, so a resume continues
it exactly); the weights files hold it under ``"ema"`` (see :mod:`engineflow.state.checkpoint_files`).

engineflow keeps its own average rather than Ignite's ``EMAHandler``: that handler attaches itself to
the engine outside engineflow's ordered handlers (so it cannot run after the loss check and before
the checkpoint, nor skip the iterations of an accumulation that do not step), keeps its state in
three places (a deep copy of the module, a momentum scheduler, an attribute of ``engine.state``), and
by default makes the copy's buffers share the model's storage, so that its average could not be
swapped into the model for validation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError
from engineflow.execute.parallel import broadcast_from_first
from engineflow.state.averages import WeightAverage
from engineflow.state.components import modules_of

if TYPE_CHECKING:
    from engineflow.execute.fit import Fit


class EMA:
    """An exponential moving average of a module component's weights (see :func:`ema`).

    Attributes:
        name: its part's name in the checkpoints.
        stage: the one stage it acts in, or None for every train stage.
        decay: the weight of the average at each update, once warmed up.
        warmup: whether the decay starts low (see :meth:`decay_now`).
        model: the name of the module component it averages.
        evaluate: whether validation evaluates the average.
        average: the average itself (its state is the checkpoints' part ``name``).
    """

    __engineflow_tool__ = True

    def __init__(self, decay: float, *, warmup: bool, model: str, evaluate: bool, stage: str | None,
                 name: str) -> None:
        self.name, self.stage, self.decay, self.warmup = name, stage, decay, warmup
        self.model, self.evaluate = model, evaluate
        self.average = WeightAverage(model, evaluated=evaluate)

    def decay_now(self) -> float:
        """The decay of the next update: ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))``
        after ``n`` updates (0.1 at the first, 0.5 at the ninth), so that the average soon leaves the
        initial weights behind."""
        n = self.average.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def attach(self, fit: Fit) -> list[HandlerSpec]:
        """Average ``fit``'s module component :attr:`model` (carried on from the stage before when it
        has the same parameter names and shapes, else started from its weights), register the average
        and, with :attr:`evaluate`, validate on it; returns the update handler."""
        modules = modules_of(fit.components)
        if self.model not in modules:
            where = f" in stage {fit.stage.name!r}" if fit.stage.prefix else ""
            raise RecipeError(f"ef.ema(model={self.model!r}) averages a module component{where}, but the module "
                              f"components there are {', '.join(modules) or '(none)'}; pass one of them as model=")
        self.average.follow(modules[self.model])
        fit.register(self.name, self.average)
        if self.evaluate:
            fit.during_validation(partial(self._validated, fit.world_size))

        def update(engine: Any) -> None:
            # an iteration of an accumulation that did not step changed no weight
            if getattr(fit.parts.get("backprop"), "stepped", True):
                self.average.update(self.decay_now())

        return [HandlerSpec(update, Events.ITERATION_COMPLETED, "train", orders.EMA_UPDATE, seq=-1, raw=True)]

    def _validated(self, world_size: int) -> AbstractContextManager[None]:
        """The average in the model, for a validation. On several processes its buffers are rank 0's
        first (collective): under DDP a process's buffers are its own after each step, until the next
        forward broadcasts rank 0's, and rank 0's are those its checkpoints hold."""
        if world_size > 1:
            broadcast_from_first(self.average.weights[name] for name in self.average.buffers)
        return self.average.swapped_in()


def ema(decay: float = 0.999, *, warmup: bool = False, model: str = "model", evaluate: bool = False,
        stage: str | None = None, name: str = "ema") -> EMA:
    """Keep an exponential moving average of a module component's weights (parameters and buffers),
    updated after each iteration in which the optimizers stepped. Declare it at a recipe's top level.

    Args:
        decay: how much of the average each update keeps, in (0, 1): ``average = decay * average +
            (1 - decay) * weight``.
        warmup: start with a lower decay, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.
        model: the name of the module component to average (``"models.g"`` for one in a dict).
        evaluate: validate on the average: the epoch's metrics, the main metric and the best epoch
            are the average's, and ``best.pt`` holds it as the model's weights.
        stage: the one train stage it acts in; None: every train stage, one average across them.
        name: its name in the checkpoints (two EMAs need two names).

    Raises:
        RecipeError: ``decay`` is not in (0, 1).

    Example:
        >>> import engineflow as ef
        >>> average = ef.ema(0.99, evaluate=True)   # at a recipe's top level
        >>> average.decay, average.model, average.stage
        (0.99, 'model', None)
        >>> ef.ema(0.9, warmup=True).decay_now()     # (1 + 0) / (10 + 0) at the first update
        0.1
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise RecipeError(f"ef.ema(decay={decay!r}): the decay must be a number between 0 and 1 (exclusive), "
                          "e.g. 0.999")
    return EMA(float(decay), warmup=warmup, model=model, evaluate=evaluate, stage=stage, name=name)
