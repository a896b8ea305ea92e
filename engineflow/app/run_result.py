"""What ``ef.run`` returns: :class:`RunResult`. The run in one process (:mod:`engineflow.app.training`)
makes it and ``ef.run`` (:mod:`engineflow.app.runner`) returns it; a module of its own, so that the
training need not import the runner, which imports the training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """What a finished run reports; its record, ``run.json`` in its folder, holds the same facts.

    Attributes:
        run_id: the run's id.
        experiment: the recipe's experiment name.
        status: "completed", "failed", "interrupted" or "pruned" (a sweep's trial its pruner stopped).
        run_dir: the folder of its outputs.
        config: the resolved config values.
        seed: the seed used.
        device: the device used, e.g. "cpu".
        epochs: epochs completed.
        history: one dict of metrics per epoch.
        metrics: the last epoch's metrics.
        best: ``{"metric", "mode", "epoch", "value"}`` of the main metric.
        duration_s: wall time of the fit in seconds.
        error: the error message of a failed run.

    Example:
        >>> import io, json, tempfile
        >>> import engineflow as ef
        >>> result = ef.run("recipes/sine.py", {"epochs": 2, "samples": 64}, device="cpu",
        ...                 runs_dir=tempfile.mkdtemp(), stream=io.StringIO())
        >>> isinstance(result, ef.RunResult), result.experiment, result.error
        (True, 'sine', None)
        >>> [epoch["epoch"] for epoch in result.history], sorted(result.metrics)
        ([1, 2], ['epoch', 'train/loss', 'train/lr', 'valid/mae', 'valid/mse'])
        >>> record = json.loads((result.run_dir / "run.json").read_text())
        >>> record["id"] == result.run_id, record["status"], record["best"] == result.best
        (True, 'completed', True)
    """

    run_id: str
    experiment: str
    status: str
    run_dir: Path
    config: dict[str, Any]
    seed: int
    device: str
    epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "run_dir": str(self.run_dir)}
