"""What a handler that asks for ``pipeline`` gets: the stage and the pipeline's counts.

A stage's place in its pipeline is a :class:`~engineflow.state.resume.StageInfo` (part of every
checkpoint); :class:`Progress` adds the counts of the stage's engine to it.
"""

from __future__ import annotations

from typing import Any

from engineflow.state.resume import StageInfo

__all__ = ["Progress", "StageInfo"]


class Progress:
    """What a handler gets when it asks for ``pipeline``: the stage and the pipeline's counts.

    ``state.iteration`` and ``state.epoch`` restart with each stage (each stage has its own
    engine); ``pipeline.iteration`` and ``pipeline.epoch`` go on across stages.

    In a recipe::

        @ef.every_n_iterations(100)               # every 100 iterations of the pipeline
        def log(pipeline, optimizer):
            print(pipeline.stage, pipeline.iteration, optimizer.param_groups[0]["lr"])

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})  # one stage, "fit": 2 batches an epoch
        >>> @ef.on(ef.Events.EPOCH_COMPLETED, engine=fit.train)
        ... def where(pipeline):
        ...     print(pipeline)
        >>> _ = fit.run(epochs=2)
        Progress(stage='fit', iteration=2, epoch=1)
        Progress(stage='fit', iteration=4, epoch=2)
    """

    def __init__(self, info: StageInfo, engine: Any = None) -> None:
        self.info = info
        self.engine = engine  # the stage's train engine, once it is built (see follow)

    def follow(self, engine: Any) -> None:
        """Count the iterations and epochs of ``engine``, the stage's train engine (built after the
        steps that may ask for ``pipeline``)."""
        self.engine = engine

    @property
    def stage(self) -> str:
        return self.info.name

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def iteration(self) -> int:
        return self.info.iterations_before + (self.engine.state.iteration if self.engine is not None else 0)

    @property
    def epoch(self) -> int:
        return self.info.epochs_before + (self.engine.state.epoch if self.engine is not None else 0)

    def __repr__(self) -> str:
        return f"Progress(stage={self.stage!r}, iteration={self.iteration}, epoch={self.epoch})"
