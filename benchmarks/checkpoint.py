"""Checkpoint: save and load time and bytes of the digits recipe's weights, as engineflow writes them.

engineflow saves weights with :func:`engineflow.checkpoint.save_weights` (atomic: a temporary
file, fsync, rename, fsync of the folder) and reads them with ``load_weights``. Each process
builds the recipe's components with its own ``setup`` and times several saves and loads; a plain
``torch.save`` of the same state (no fsync, no rename) is the baseline in the same process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Case, Family, worker_argv

RECIPE = REPO / "recipes" / "digits.py"
REPEATS = 20


def family(quick: bool = False) -> Family:
    repeats = 3 if quick else REPEATS
    result = Family(
        name="checkpoint",
        title=f"digits recipe weights, {repeats} saves and loads per process",
        unit="us/save",
        baseline=None,
        cases=[Case("weights", "engineflow save_weights (atomic, fsync)",
                    worker_argv("checkpoint", "weights", repeats=repeats))],
        clock="wall",  # fsync waits on the disk, which CPU time does not see
        setup={"recipe": "recipes/digits.py", "repeats": repeats},
        notes=["Below: load_us (load_weights), bytes of the file, torch_save_us (plain torch.save of the same "
               "state in the same process), medians over rounds. engineflow saves weights only: the optimizer, "
               "engine position and loader order are not in the file yet, so a 'full state' checkpoint cannot "
               "be measured."],
    )
    if not _has_weights_api():
        result.skipped = {"weights": "engineflow.checkpoint has no save_weights/load_weights in this version"}
        result.cases = []
    return result


def _has_weights_api() -> bool:
    # Read, not imported: this runner imports nothing heavy (see harness.run_once on peak RSS).
    source = REPO / "engineflow" / "checkpoint.py"
    return source.is_file() and all(f"def {name}(" in source.read_text() for name in ("save_weights", "load_weights",
                                                                                       "modules_of"))


def measure(case: str, *, repeats: int) -> dict[str, Any]:
    """Time ``repeats`` saves and loads of the digits recipe's weights; what :mod:`benchmarks.worker` calls."""
    import torch

    from engineflow.checkpoint import load_weights, modules_of, save_weights
    from engineflow.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    modules = modules_of(recipe.setup(recipe.config))
    meta = {"epoch": 1, "metrics": {"valid/accuracy": 0.5}}
    saves, loads, plain = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        path, plain_path = Path(folder) / "last.pt", Path(folder) / "plain.pt"
        for _ in range(repeats):
            saves.append(_timed(lambda: save_weights(path, modules, meta)))
            loads.append(_timed(lambda: load_weights(path, modules)))
            states = {name: module.state_dict() for name, module in modules.items()}
            plain.append(_timed(lambda: torch.save({"weights": states, "meta": meta}, plain_path)))  # noqa: B023
        size = path.stat().st_size
    return {"seconds": sum(w for w, _ in saves), "cpu_seconds": sum(c for _, c in saves), "iterations": repeats,
            "load_us": 1e6 * statistics.median(w for w, _ in loads), "bytes": size,
            "torch_save_us": 1e6 * statistics.median(w for w, _ in plain)}


def _timed(action: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu
