"""What a stage's user functions may ask for by name, assembled in one place.

Entering a stage builds one :class:`StageScope`; its ``prepare``, its fit's steps and handlers, and
its test or inference pass all take their names from it. The names, besides the components
(what setup() and the prepares returned, by their names):

``cfg``, ``device``, ``run``
    the config, the device, the run's :class:`~engineflow.runtime.RunContext` (its ``stage`` this one);
``pipeline``
    a :class:`~engineflow.execute.stage.Progress`: the stage and the pipeline's counts;
``history``, ``best``
    a train stage's own epochs and best-epoch tracker; in a test or inference pass, the pipeline's
    history so far and the latest train stage's tracker;
``evaluate``
    in a train stage, ``evaluate(loader)`` runs the eval step over one loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engineflow.execute.stage import Progress
from engineflow.state.resume import StageInfo


@dataclass(frozen=True)
class StageScope:
    """One stage's names (see the module).

    Attributes:
        info: the stage's place in its pipeline.
        base: the names every stage has: ``cfg``, ``device``, ``run`` (this stage's context).
        components: setup()'s and the prepares' components, by name.
        history: what ``history`` is here, or None (a train stage's fit gives its own).
        best: what ``best`` is here, or None.

    Example:
        >>> scope = StageScope(StageInfo("finetune", 1, prefix="finetune/"), {"cfg": {}}, {"model": "m"})
        >>> sorted(scope.names()), scope.names()["pipeline"].stage
        (['cfg', 'model', 'pipeline'], 'finetune')
    """

    info: StageInfo
    base: Mapping[str, Any]
    components: Mapping[str, Any]
    history: Any = None
    best: Any = None
    progress: Progress = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.progress is None:
            object.__setattr__(self, "progress", Progress(self.info))

    def names(self, **own: Any) -> dict[str, Any]:
        """Every name here, then ``own`` (a fit's ``history``, ``best``, ``evaluate``) over them."""
        names = {**self.base, **self.components, "pipeline": self.progress}
        if self.history is not None:
            names["history"] = self.history
        if self.best is not None:
            names["best"] = self.best
        names.update(own)
        return names
