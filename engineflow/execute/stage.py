"""Where a stage stands in its pipeline: its name, and the epochs and iterations of the stages before it.

A stage's engines count from zero, as any Ignite engine does; what is recorded for the run counts
across the pipeline. :class:`StageInfo` translates: metric names get the stage's prefix
(``finetune/valid/accuracy``) and epochs become the pipeline's epochs. A recipe without stages
runs one stage, "fit", with no prefix and nothing before it, so its records are as they always were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageInfo:
    """One stage's place in its pipeline (fixed while the stage runs).

    Attributes:
        name: the stage's name ("fit" for a recipe without stages).
        index: its position, from 0.
        kind: "train", "test" or "infer".
        prefix: put before its metric names: ``"<name>/"`` in a pipeline, ``""`` without stages.
        epochs_before: epochs the stages before it completed.
        iterations_before: iterations the stages before it ran.
        done: what each stage before it recorded (:meth:`summary` dicts), in order.
    """

    name: str = "fit"
    index: int = 0
    kind: str = "train"
    prefix: str = ""
    epochs_before: int = 0
    iterations_before: int = 0
    done: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)

    def metric(self, name: str) -> str:
        """A metric's name in the run's records."""
        return self.prefix + name

    def row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A row of the stage's history as the run records it: pipeline epoch, prefixed names.

        Example:
            >>> StageInfo("finetune", 1, prefix="finetune/", epochs_before=5).row({"epoch": 2, "valid/acc": 0.9})
            {'epoch': 7, 'finetune/valid/acc': 0.9}
        """
        out = {self.prefix + k: v for k, v in row.items() if k != "epoch"}
        return {"epoch": self.epochs_before + row["epoch"], **out} if "epoch" in row else out

    def summary(self, status: str, history: list[Mapping[str, Any]] = (), best: Mapping[str, Any] | None = None,
                iterations: int = 0) -> dict[str, Any]:
        """The stage as the run records it: ``name``, ``kind``, ``status``, ``epochs`` (completed in
        the stage), ``best`` (its epoch counted in the stage, its metric prefixed), ``metrics`` (the
        last epoch's), and for the stages after it ``history``, ``iterations`` and ``epochs_before``."""
        if best is not None and best.get("metric"):
            best = {**best, "metric": self.metric(best["metric"])}
        metrics = self.row(history[-1]) if history else {}
        metrics.pop("epoch", None)
        return {"name": self.name, "kind": self.kind, "status": status, "epochs": len(history),
                "best": dict(best) if best is not None else None, "metrics": metrics,
                "history": [self.row(row) for row in history], "iterations": iterations,
                "epochs_before": self.epochs_before}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "kind": self.kind, "prefix": self.prefix,
                "epochs_before": self.epochs_before, "iterations_before": self.iterations_before,
                "done": [dict(d) for d in self.done]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StageInfo:
        return cls(state["name"], state["index"], state.get("kind", "train"), state["prefix"],
                   state["epochs_before"], state["iterations_before"], tuple(state.get("done", ())))


class Progress:
    """What a handler gets when it asks for ``pipeline``: the stage and the pipeline's counts.

    ``state.iteration`` and ``state.epoch`` restart with each stage (each stage has its own
    engine); ``pipeline.iteration`` and ``pipeline.epoch`` go on across stages.

    Example::

        @ef.every_n_iterations(100)               # every 100 iterations of the pipeline
        def log(pipeline, optimizer):
            print(pipeline.stage, pipeline.iteration, optimizer.param_groups[0]["lr"])
    """

    def __init__(self, info: StageInfo, engine: Any = None) -> None:
        self.info = info
        self.engine = engine  # the stage's train engine, set once it is built

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
