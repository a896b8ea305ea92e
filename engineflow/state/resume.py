"""The shape of a full-state checkpoint: one typed record, and the only reader of its keys.

A checkpoint file holds a :class:`ResumeRecord` as a dict of tensors and plain values
(:meth:`ResumeRecord.to_dict`); :meth:`ResumeRecord.from_dict` reads it back, the layouts earlier
versions wrote included, so that no other module reads a checkpoint's keys. What it holds:

* where the fit stands: :class:`Position` (epochs completed, batches into the epoch in progress, the
  engine's iteration) and the stage's place in its pipeline (:class:`StageInfo`);
* the components' ``state_dict``s and which of their parameters train (``requires_grad``);
* what each process kept for itself (:class:`RankState`: RNG states, loss sums, train metrics);
* the best epoch, the history, the seed, how the train loader dealt out its order (``layout``);
* the checkpointer's ranking of the files it kept for their epoch's main metric (:class:`BestFiles`);
* ``parts``: the state of every other stateful piece a fit registered, by name.

Example:
    >>> record = ResumeRecord(run_id="r1", position=Position(iteration=30, epochs_completed=2, epoch_length=15))
    >>> ResumeRecord.from_dict(record.to_dict()).position.epochs_completed
    2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engineflow.errors import RecipeError
from engineflow.shards import Layout

FORMAT = 2  # 1: written before the record was typed (read by from_dict, as are its older variants)
STAGE_END = "stage-end"


@dataclass(frozen=True)
class Position:
    """Where a fit stands in its epochs (torchtnt's progress record, for one stage's engine).

    Attributes:
        iteration: iterations the stage's engine ran.
        epochs_completed: epochs it completed.
        batches_in_epoch: batches done of the epoch in progress (0 at an epoch's end).
        epoch_length: batches in a whole epoch, when the loader has a length.
        max_epochs: the epochs the fit was asked to run.
    """

    iteration: int = 0
    epochs_completed: int = 0
    batches_in_epoch: int = 0
    epoch_length: int | None = None
    max_epochs: int | None = None

    @property
    def mid_epoch(self) -> bool:
        """Whether it stands inside an epoch (not at an epoch's end)."""
        return self.batches_in_epoch > 0

    @property
    def epoch(self) -> int:
        """The epoch in progress, or the last completed one at an epoch's end (the engine's ``epoch``)."""
        return self.epochs_completed + (1 if self.mid_epoch else 0)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "epoch_length": self.epoch_length, "max_epochs": self.max_epochs,
                "epochs_completed": self.epochs_completed, "batches_in_epoch": self.batches_in_epoch}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Position:
        return cls(int(state["iteration"]), int(state["epochs_completed"]), int(state["batches_in_epoch"]),
                   state.get("epoch_length"), state.get("max_epochs"))


@dataclass(frozen=True)
class StageInfo:
    """One stage's place in its pipeline (fixed while the stage runs).

    A stage's engines count from zero, as any Ignite engine does; what is recorded for the run counts
    across the pipeline. StageInfo translates: metric names get the stage's prefix
    (``finetune/valid/accuracy``) and epochs become the pipeline's epochs. A recipe without stages
    runs one stage, "fit", with no prefix and nothing before it.

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

    def summary(self, status: str, history: Sequence[Mapping[str, Any]] = (), best: Mapping[str, Any] | None = None,
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


@dataclass(frozen=True)
class RankState:
    """What one process of a fit keeps for itself: its RNG states, its loss sums, its train
    metrics' states (None for a metric without a ``state_dict``) and the state of the parts the fit
    registered ``per_rank`` (gradients added up under DDP's ``no_sync``), by name."""

    rng: Mapping[str, Any]
    loss: Mapping[str, Any]
    train_metrics: Mapping[str, Any] = field(default_factory=dict)
    parts: Mapping[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": dict(self.rng), "loss": dict(self.loss), "train_metrics": dict(self.train_metrics),
                "rank_parts": dict(self.parts)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RankState:
        # "rank_parts" is absent before engineflow kept per-rank parts: none
        return cls(_rng(state["rng"]), _loss(state["loss"]), dict(state.get("train_metrics") or {}),
                   dict(state.get("rank_parts") or {}))


@dataclass(frozen=True)
class BestFiles:
    """The checkpointer's record of the files it keeps for their epoch's main metric.

    Attributes:
        scores: file name -> the main metric's value at its epoch.
        stage: the stage whose epochs they are (a stage's best is its own).
        mode: "max" or "min".
    """

    scores: Mapping[str, float] = field(default_factory=dict)
    stage: int = 0
    mode: str | None = None


@dataclass(frozen=True)
class ResumeRecord:
    """Everything a resume needs (see the module).

    Attributes:
        run_id: the run that wrote it.
        reason: why it was written: "epoch", "iterations", "interrupt", "time-limit" or "stage-end".
        saved_at: when (seconds since the epoch).
        position: where the fit stood.
        stage: its stage's place in the pipeline.
        finished: whether that stage had ended (a resume goes on with the next one).
        seed: the fit's seed.
        components: each stateful component's ``state_dict``, by name.
        requires_grad: which parameters of each module train.
        best: the best-epoch tracker's state (metric, mode, epoch, value).
        history: one dict of metrics per completed epoch of the stage.
        layout: how the train loader dealt out its epoch's order, or None.
        ranks: what each process kept (one entry on one process), in rank order.
        best_files: the checkpointer's ranking of the files it kept.
        parts: the state of every other stateful piece the fit registered, by name.
    """

    run_id: str = ""
    reason: str = "epoch"
    saved_at: float = 0.0
    position: Position = field(default_factory=Position)
    stage: StageInfo = field(default_factory=StageInfo)
    finished: bool = False
    seed: int = 0
    components: Mapping[str, Any] = field(default_factory=dict)
    requires_grad: Mapping[str, list[bool]] = field(default_factory=dict)
    best: Mapping[str, Any] = field(default_factory=dict)
    history: Sequence[Mapping[str, Any]] = ()
    layout: Layout | None = None
    ranks: Sequence[RankState] = ()
    best_files: BestFiles = field(default_factory=BestFiles)
    parts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        """On how many processes it was written."""
        return max(len(self.ranks), 1)

    @property
    def pipeline_iteration(self) -> int:
        """The pipeline's iteration (what checkpoint files are numbered by)."""
        return self.stage.iterations_before + self.position.iteration

    @property
    def best_mode(self) -> str:
        """How the files in :attr:`best_files` rank: the checkpointer's mode, else the tracker's."""
        return self.best_files.mode or self.best.get("mode") or "max"

    def with_reason(self, reason: str, **changes: Any) -> ResumeRecord:
        """The same record written for ``reason`` ("stage-end" marks its stage finished)."""
        return replace(self, reason=reason, finished=self.finished or reason == STAGE_END, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The record as a checkpoint file holds it (tensors and plain values only)."""
        first = self.ranks[0] if self.ranks else RankState({}, {})
        state: dict[str, Any] = {
            "format": FORMAT, "run_id": self.run_id, "reason": self.reason, "saved_at": self.saved_at,
            "engine": self.position.state_dict(), "components": dict(self.components),
            "requires_grad": {k: list(v) for k, v in self.requires_grad.items()},
            # this process's own state at the top, as one process's checkpoint always had it
            **first.state_dict(),
            "best": dict(self.best), "history": [dict(row) for row in self.history], "seed": self.seed,
            "stage": {**self.stage.state_dict(), **({"finished": True} if self.finished else {})},
            "order": self.layout.state_dict() if self.layout is not None else None,
            "best_checkpoints": dict(self.best_files.scores), "best_stage": self.best_files.stage,
            "best_mode": self.best_files.mode, "parts": dict(self.parts),
        }
        if len(self.ranks) > 1:
            state["ranks"] = [rank.state_dict() for rank in self.ranks]
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ResumeRecord:
        """Read a checkpoint's content: this version's, and every layout earlier versions wrote.

        Raises:
            RecipeError: a format this version does not read (a later engineflow's).
        """
        version = state.get("format")
        if version not in (1, FORMAT):
            raise RecipeError(f"checkpoint format {version!r} is not one this engineflow reads (it reads 1 and "
                              f"{FORMAT}); resume it with the engineflow version that wrote it")
        ranks = state.get("ranks")
        # format 1 without "ranks": one process, its state at the top
        saved = [RankState.from_state(r) for r in ranks] if ranks else [RankState.from_state(state)]
        where = state.get("stage") or {}  # absent before pipelines: one stage, "fit"
        best = dict(state.get("best") or {})
        return cls(
            run_id=state.get("run_id", ""), reason=state.get("reason", "epoch"), saved_at=state.get("saved_at", 0.0),
            position=Position.from_state(state["engine"]),
            stage=StageInfo.from_state(where) if where else StageInfo(), finished=bool(where.get("finished")),
            seed=int(state.get("seed", 0)), components=dict(state.get("components") or {}),
            # absent before engineflow kept it: every parameter as setup() made it
            requires_grad=dict(state.get("requires_grad") or {}),
            best=best, history=list(state.get("history") or ()), ranks=saved,
            layout=Layout.from_state(state["order"]) if state.get("order") is not None else None,
            best_files=best_files_of(state),
            parts=dict(state.get("parts") or {}),
        )


def best_files_of(state: Mapping[str, Any]) -> BestFiles:
    """The files a checkpoint's content ranks for their main metric, and how they rank (its mode: the
    checkpointer's, else the best-epoch tracker's).

    Reads those keys only: a checkpoint of a run that failed part-way may be asked just that.
    """
    best = state.get("best") or {}
    return BestFiles(dict(state.get("best_checkpoints") or {}), int(state.get("best_stage") or 0),
                     state.get("best_mode") or best.get("mode"))


def _loss(state: Mapping[str, Any]) -> dict[str, Any]:
    """A loss monitor's state; the single-loss layout (total, count) of early versions as today's."""
    if "totals" in state or not state:
        return dict(state)
    running, count = state["running"], state["count"]
    return {"running": running, "totals": {"loss": state["total"]} if count else {},
            "counts": {"loss": count} if count else {}, "main": "loss" if running is not None else None}


def _rng(state: Mapping[str, Any]) -> dict[str, Any]:
    """RNG states; the NumPy key as a list, also where an early version saved NumPy's uint32 array."""
    numpy = state.get("numpy")
    if numpy is None or isinstance(numpy[1], list):
        return dict(state)
    name, key, *rest = numpy
    return {**state, "numpy": (name, key.tolist(), *rest)}
