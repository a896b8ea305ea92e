"""Where a run happens: its identity, device and seed, passed explicitly (no globals).

A :class:`RunContext` is what a step or handler gets when it asks for ``run``. It already names
the rank and the stage so that distributed runs and pipelines fit in later without a global.
"""

from __future__ import annotations

import contextvars
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engineflow.errors import RecipeError
from engineflow.naming import option

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunContext:
    """Identity and placement of one run.

    Attributes:
        run_id: unique id, sortable by start time.
        experiment: the recipe's experiment name.
        run_dir: the folder of this run's outputs.
        device: the torch device the run uses.
        seed: the seed every RNG was set from.
        check: True for a ``--check`` smoke run.
        stage: the stage of a pipeline ("fit" for a single recipe).
        rank: this process's rank (0 when not distributed).
        world_size: how many processes train together.
        runs_dir: the runs folder the run is recorded in (None for an unrecorded build), e.g. for
            ``ef.load_run("last", runs_dir=run.runs_dir, experiment="pretrain")`` in ``setup``.
        precision: the precision every train stage trains in (``--precision``: "32", "bf16" or
            "fp16"); None: each step's own (see :func:`engineflow.train_step`).

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64}, seed=3)  # built, not recorded
        >>> ctx.run_id, ctx.experiment, ctx.seed, ctx.stage, ctx.rank, ctx.world_size, ctx.runs_dir
        ('interactive', 'sine', 3, 'fit', 0, 1, None)
        >>> @ef.on(ef.Events.COMPLETED, engine=fit.train)
        ... def done(run):                        # what a step or handler gets when it asks for run
        ...     print(run.experiment, run.device)
        >>> _ = fit.run(epochs=1)
        sine cpu
    """

    run_id: str
    experiment: str
    run_dir: Path
    device: torch.device
    seed: int
    check: bool = False
    stage: str = "fit"
    rank: int = 0
    world_size: int = 1
    runs_dir: Path | None = None
    precision: str | None = None


# Runs this process is training or loading now: ef.load_run never resolves to one of them (a setup()
# that loads "last" must not load the run it is building, nor recurse into itself).
_in_use: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("engineflow_runs_in_use", default=())


@contextmanager
def using_run(run_id: str) -> Iterator[None]:
    """Mark ``run_id`` as being trained or loaded by this process while the block runs."""
    token = _in_use.set((*_in_use.get(), run_id))
    try:
        yield
    finally:
        _in_use.reset(token)


def runs_in_use() -> tuple[str, ...]:
    """The ids of the runs this process is training or loading now (see :func:`using_run`)."""
    return _in_use.get()


def new_run_id() -> str:
    """``20261123-084512-3fa2``: start time, then random bits so parallel runs never collide."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is a RecipeError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(
                f"{option('device', device)} was asked for, but no CUDA device is visible; use "
                f"{option('device', 'cpu')} or {option('device', 'auto')}"
            )
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise RecipeError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block when ``enabled`` (``--deterministic``):
    CUDA's kernels that add in a different order on every call (atomics in ``index_add``, scatter,
    cuDNN convolutions' backward) are replaced by deterministic ones, or raise. cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` for that; it is set to ``:4096:8`` unless already set. Both are as
    they were after the block.

    Example:
        >>> with deterministic_algorithms(True):
        ...     torch.are_deterministic_algorithms_enabled()
        True
        >>> torch.are_deterministic_algorithms_enabled()
        False
    """
    if not enabled:
        yield
        return
    import os

    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
