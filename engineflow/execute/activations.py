"""Activation statistics: per layer, the mean, std, share of near-zero values and a histogram of its
outputs in training iterations, added up on the outputs' device and read back every N iterations into
the fit's board (TensorBoard) and the run folder's ``activations.jsonl``.

Which iterations count: of every ``every`` iterations of a stage, the last ``window`` (default 1: the
iteration of the read-back alone, so that the hooks cost nothing in the others). The hooks are on
their layers only during those iterations' train steps: from ``ITERATION_STARTED`` to the start of
``ITERATION_COMPLETED``, never during validation; a layer called several times in a step counts
every call. On several processes, rank 0's activations are recorded and the other ranks run no hook.

``activations.jsonl`` has one JSON object per layer and read-back::

    {"stage": "fit", "iteration": 50, "layer": "0", "count": 2048, "mean": 0.01, "std": 0.98,
     "near_zero": 0.002, "range": [-5.0, 5.0], "histogram": [0, 3, ...]}

``iteration`` counts across a pipeline's stages (as TensorBoard's steps); ``histogram`` has the counts
of equal bins over ``range``, the values outside it counted in the first or last bin. A resumed run
appends the read-backs of the iterations it trains again; :func:`read_activations` keeps the last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError
from engineflow.execute.forward_hooks import HookSet, LayerChoice, check_choice, lifetime, select_layers
from engineflow.files import append_text

if TYPE_CHECKING:
    from engineflow.execute.fit import Fit

DATA_FILE = "activations.jsonl"


class LayerStats:
    """What one layer's outputs add up to since the last read-back, on their device: the number of
    values (on the host), their sum, sum of squares and near-zero count, and the histogram's counts."""

    def __init__(self, bins: int, low: float, high: float, near_zero: float) -> None:
        self.bins, self.low, self.high, self.near_zero = bins, low, high, near_zero
        self.count = 0
        self.sums: torch.Tensor | None = None  # float64: sum, sum of squares, near-zero count, then the bins

    def add(self, output: Any) -> None:
        """Add a layer's output: a floating tensor, or the first element of a tuple or list (others are skipped)."""
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.numel() == 0:
            return
        flat = output.detach().reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        # all on the device, nothing read back: a host sync per step would stall a GPU
        near = flat.abs().lt_(self.near_zero).sum(dtype=torch.float64)
        head = torch.stack((flat.sum().double(), torch.dot(flat, flat).double(), near))
        # bincount, not histc: several times faster on a CPU, and deterministic on CUDA; NaN goes to an
        # extra bin that is dropped
        scaled = flat.sub(self.low).mul_(self.bins / (self.high - self.low)).clamp_(0, self.bins - 1)
        index = scaled.nan_to_num_(nan=self.bins).to(torch.int32)
        counts = torch.bincount(index, minlength=self.bins + 1)[:self.bins]
        added = torch.cat((head, counts.double()))
        self.sums = added if self.sums is None else self.sums.add_(added)
        self.count += flat.numel()

    def reset(self) -> None:
        self.count, self.sums = 0, None

    def summary(self, values: list[float]) -> dict[str, Any]:
        """The statistics from the read-back ``values`` of :attr:`sums`."""
        n = self.count
        mean = values[0] / n
        variance = max(values[1] / n - mean * mean, 0.0)
        return {"count": n, "mean": mean, "std": math.sqrt(variance), "near_zero": values[2] / n,
                "range": [self.low, self.high], "histogram": [round(v) for v in values[3:]]}


class ActivationStats:
    """Activation statistics of some layers during training; made by
    :func:`engineflow.hooks.activation_stats`, which documents the arguments.

    Attributes:
        latest: the last read-back, by layer name: ``count``, ``mean``, ``std``, ``near_zero``, ``range``
            and ``histogram`` (as a line of ``activations.jsonl`` has them).
    """

    __engineflow_tool__ = True

    def __init__(self, modules: LayerChoice = None, *, every: int = 50, window: int = 1, bins: int = 50,
                 range: tuple[float, float] = (-5.0, 5.0), near_zero: float = 1e-3, stage: str | None = None,
                 name: str = "activation_stats") -> None:
        where = "ef.hooks.activation_stats"
        check_choice(modules, where)
        for label, value, low in (("every", every, 1), ("bins", bins, 1), ("window", window, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RecipeError(f"{where}: {label}= takes a whole number >= {low}, got {value!r}")
        if window > every:
            raise RecipeError(f"{where}: window={window} is more than every={every}; the window is the last "
                              "iterations before each read-back")
        if (len(range) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in range)
                or range[0] >= range[1]):
            raise RecipeError(f"{where}: range= takes (low, high), two finite numbers with low < high; got {range!r}")
        if not isinstance(near_zero, (int, float)) or not near_zero >= 0:
            raise RecipeError(f"{where}: near_zero= takes a number >= 0, got {near_zero!r}")
        self.modules, self.every, self.window, self.bins = modules, every, window, bins
        self.range = (float(range[0]), float(range[1]))
        self.near_zero, self.stage, self.name, self.where = float(near_zero), stage, name, where
        self.latest: dict[str, dict[str, Any]] = {}

    def records(self, iteration: int) -> bool:
        """Whether the stage's ``iteration`` (counted from 1) is in a window."""
        return (iteration - 1) % self.every >= self.every - self.window

    def attach(self, fit: Fit) -> list[HandlerSpec]:
        """The handlers that record ``fit``'s chosen layers (none on a rank other than 0)."""
        if fit.rank != 0:
            return []
        return _Recording(self, fit, select_layers(fit.components, self.modules, self.where)).specs()


class _Recording:
    """One fit's statistics: its layers' sums, their hooks, and where the read-backs go."""

    def __init__(self, tool: ActivationStats, fit: Fit, layers: Mapping[str, torch.nn.Module]) -> None:
        self.tool, self.fit = tool, fit
        low, high = tool.range
        self.stats = {name: LayerStats(tool.bins, low, high, tool.near_zero) for name in layers}
        self.hooks = HookSet(layers, self._hook)
        self.path: Path | None = None

    def _hook(self, name: str) -> Any:
        stats = self.stats[name]

        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            stats.add(output)

        return record

    def specs(self) -> list[HandlerSpec]:
        hooks = self.hooks
        return [
            HandlerSpec(self.started, Events.STARTED, "train", orders.HOOKS, -1),
            HandlerSpec(self.iteration_started, Events.ITERATION_STARTED, "train", orders.HOOKS, -1, raw=True),
            HandlerSpec(hooks.remove, Events.ITERATION_COMPLETED, "train", orders.HOOKS, -1, raw=True),
            HandlerSpec(hooks.remove, Events.EPOCH_COMPLETED, "train", orders.HOOKS, -1, raw=True),
            HandlerSpec(self.read_back, Events.ITERATION_COMPLETED, "train", orders.ACTIVATION_STATS, -1, raw=True),
            *lifetime(hooks, attach_at_start=False),
        ]

    def started(self, run: Any) -> None:
        """A run of the fit starts (a resume too): the window starts afresh; a recorded run writes the data file."""
        for stats in self.stats.values():
            stats.reset()
        self.path = Path(run.run_dir) / DATA_FILE if self.fit.board.open else None

    def iteration_started(self, engine: Any) -> None:
        if self.tool.records(engine.state.iteration):
            self.hooks.attach()
        else:  # still on after a skipped batch, whose ITERATION_COMPLETED handlers did not run
            self.hooks.remove()

    def read_back(self, engine: Any) -> None:
        iteration = engine.state.iteration
        if iteration % self.tool.every:
            return
        counted = {name: s for name, s in self.stats.items() if s.sums is not None}
        if not counted:
            return
        values = _to_host([s.sums for s in counted.values()])
        latest = {name: stats.summary(row) for (name, stats), row in zip(counted.items(), values, strict=True)}
        for stats in counted.values():
            stats.reset()
        self.tool.latest = latest
        self._show(latest, iteration)

    def _show(self, latest: Mapping[str, dict[str, Any]], iteration: int) -> None:
        board, stage = self.fit.board, self.fit.stage
        low, high = self.tool.range
        edges = torch.linspace(low, high, self.tool.bins + 1).tolist()
        for name, line in latest.items():
            for key in ("mean", "std", "near_zero"):
                board.scalar(f"activations/{name}/{key}", line[key], iteration)
            board.histogram_bins(f"activations/{name}", edges, line["histogram"], iteration)
        if self.path is not None:
            at = {"stage": stage.name, "iteration": stage.iterations_before + iteration}
            append_text(self.path, "".join(json.dumps({**at, "layer": name, **line}) + "\n"
                                           for name, line in latest.items()))


def _to_host(tensors: list[torch.Tensor]) -> list[list[float]]:
    """The tensors' values, read back with one transfer per device."""
    rows: list[list[float] | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        for index, row in zip(indices, torch.stack([tensors[i] for i in indices]).tolist(), strict=True):
            rows[index] = row
    return rows  # type: ignore[return-value]


def read_activations(run_dir: Path) -> list[dict[str, Any]]:
    """The read-backs in a run folder's ``activations.jsonl``, by iteration, layers in their order; for an iteration
    trained again after a resume, the last; lines that are not whole JSON objects are skipped.

    Returns an empty list for a run without the file.
    """
    path = Path(run_dir) / DATA_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines: dict[tuple[int, str], dict[str, Any]] = {}
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and {"iteration", "layer", "mean", "std", "histogram"} <= line.keys():
            lines[(line["iteration"], line["layer"])] = line
    return sorted(lines.values(), key=lambda line: line["iteration"])  # stable: each layer keeps its place
