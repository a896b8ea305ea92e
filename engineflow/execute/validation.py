"""Evaluating: how an eval step's engine is built, and its metrics over one loader found by name.

A fit validates with it each epoch (``fit.evaluate``, the ``evaluate`` a step may ask for); a test
pass and ``engineflow test`` evaluate with it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.steps import StepSpec
from engineflow.errors import RecipeError
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import StepEngine, make_engine
from engineflow.metrics import attach_metrics


@dataclass(frozen=True)
class LoaderScope:
    """Where :meth:`~engineflow.execute.fit.Fit.evaluate` finds a loader by name: the fit's own
    loaders (a stage's, by the names the stage uses), then setup()'s by their own names.

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



def eval_engine(spec: StepSpec, provided: Mapping[str, Any], handlers: Iterable[HandlerSpec] = ()) -> StepEngine:
    """An eval step's engine with its metrics and its ``engine="eval"`` handlers (those of ``handlers``):
    how every eval engine is built (a fit's validation, a test pass)."""
    evaluator = make_engine(spec, provided)
    attach_metrics(evaluator, spec.metrics)
    attach_in_order(evaluator, [h for h in handlers if h.engine == "eval"], provided)
    return evaluator


def evaluate_loader(evaluator: StepEngine | None, loaders: Mapping[str, Iterable[Any]],
                    loader: str = "valid", scope: LoaderScope | None = None) -> dict[str, float]:
    """The eval engine's metrics over one loader, ``{"<loader>/<metric>": value}``
    (see :meth:`~engineflow.execute.fit.Fit.evaluate`)."""
    if evaluator is None:
        raise RecipeError("the recipe has no eval step; decorate one with @ef.eval_step")
    found = (scope or LoaderScope()).find(loaders, loader)
    state = evaluator.run(found, max_epochs=1)
    return {f"{loader}/{name}": value for name, value in state.metrics.items()}
