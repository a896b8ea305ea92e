"""Where a run happens: its identity, device and seed, passed explicitly (no globals).

A :class:`RunContext` is what a step or handler gets when it asks for ``run``. It already names
the rank and the stage so that distributed runs and pipelines fit in later without a global.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engineflow.errors import RecipeError

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
                f"--device {device} was asked for, but no CUDA device is visible; use --device cpu or auto"
            )
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise RecipeError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's RNGs (CPU and every CUDA device)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for engineflow itself
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
