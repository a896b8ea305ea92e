"""Checkpoint: save and load time and bytes of the digits recipe's state, as engineflow writes it.

Two files, each with the engineflow API that writes it, when this version has it:

* ``weights``: the model's weights, :func:`engineflow.state.checkpoint_files.save_weights` (atomic: a
  temporary file, fsync, rename, fsync of the folder) and ``load_weights``;
* ``full_state``: everything a resume needs (weights, optimizer, engine position, RNG states,
  history...), ``engineflow.state.checkpointer.Checkpointer.save`` / ``latest`` + ``load_state_dict``, after
  one epoch of training so that the optimizer has its state;
* ``full_state_mlp``: the same for the paired family's compute-bound MLP (7.4 MB of weights), the
  checkpoint of its ``recorded`` case.

A full-state save is timed whole (when the version writes in the background, until the file is
written); ``training_thread_us`` is the part ``Checkpointer.save`` itself takes, what the training
thread waits for.

Each process times several saves and loads; a plain ``torch.save`` of the same object (no fsync,
no rename) is the baseline in the same process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Case, Family, worker_argv

RECIPE = REPO / "recipes" / "digits.py"
REPEATS = 20


def family(quick: bool = False) -> Family:
    repeats = 3 if quick else REPEATS
    cases = [
        Case("weights", "weights: save_weights (atomic, fsync)", worker_argv("checkpoint", "weights", repeats=repeats)),
        Case("full_state", "full state: Checkpointer.save (atomic, fsync)",
             worker_argv("checkpoint", "full_state", repeats=repeats)),
        # The paired family's compute-bound MLP (7.4 MB of weights): the `recorded` case's checkpoint.
        Case("full_state_mlp", "full state, benchmark MLP: Checkpointer.save",
             worker_argv("checkpoint", "full_state_mlp", repeats=repeats)),
    ]
    skipped = {case.name: why for case in cases if (why := _missing_api(case.name))}
    return Family(
        name="checkpoint",
        title=f"digits recipe, {repeats} saves and loads per process",
        unit="us/save",
        baseline=None,
        cases=[case for case in cases if case.name not in skipped],
        clock="wall",  # fsync waits on the disk, which CPU time does not see
        setup={"recipe": "recipes/digits.py", "repeats": repeats},
        skipped=skipped,
        notes=["median etc.: one save. Below, medians over rounds: load_us (reading the file and loading it into "
               "the objects), bytes of the file, torch_save_us (plain torch.save of the same object in the same "
               "process: no fsync, no rename), training_thread_us (full state: the part of a save the training "
               "thread waits for, when a background thread writes the file)."],
    )


# The definitions each case needs: found by reading the package's source (wherever a version keeps
# them), so that this runner imports nothing heavy (see harness.run_once on peak RSS), and skipped
# cleanly in versions that lack them.
_APIS = {
    "weights": ("def save_weights(", "def load_weights(", "def modules_of("),
    "full_state": ("class Checkpointer", "def save(", "def latest(", "def load_state_dict(", "def checkpoints("),
}
_APIS["full_state_mlp"] = _APIS["full_state"]


def _missing_api(case: str) -> str:
    text = "".join(path.read_text() for path in sorted((REPO / "engineflow").rglob("*.py")))
    missing = [needle for needle in _APIS[case] if needle not in text]
    return f"engineflow lacks {', '.join(missing)} in this version" if missing else ""


def measure(case: str, *, repeats: int) -> dict[str, Any]:
    """Time ``repeats`` saves and loads of one kind of file; what :mod:`benchmarks.worker` calls."""
    save, load, plain, path = _weights() if case == "weights" else _full_state(mlp=case == "full_state_mlp")
    saves, loads, plains = [], [], []
    for _ in range(repeats):
        saves.append(_timed(save))
        loads.append(_timed(load))
        plains.append(_timed(plain))
    return {"seconds": sum(w for w, _ in saves), "cpu_seconds": sum(c for _, c in saves), "iterations": repeats,
            "load_us": 1e6 * statistics.median(w for w, _ in loads), "bytes": path().stat().st_size,
            "torch_save_us": 1e6 * statistics.median(w for w, _ in plains),
            **({"training_thread_us": 1e6 * statistics.median(_submits)} if _submits else {})}


Actions = tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any], Callable[[], Path]]


def _weights() -> Actions:
    import torch

    from engineflow.declare.recipe import load_recipe
    from engineflow.state.checkpoint_files import load_weights, save_weights
    from engineflow.state.components import modules_of

    recipe = load_recipe(RECIPE)
    modules = modules_of(recipe.setup(recipe.config))
    meta = {"epoch": 1, "metrics": {"valid/accuracy": 0.5}}
    folder = _scratch()
    path = folder / "last.pt"

    def plain() -> None:
        states = {name: module.state_dict() for name, module in modules.items()}
        torch.save({"weights": states, "meta": meta}, folder / "plain.pt")

    return (lambda: save_weights(path, modules, meta), lambda: load_weights(path, modules), plain, lambda: path)


def _full_state(*, mlp: bool = False) -> Actions:
    import torch

    from benchmarks.loops import RECIPE as MLP_RECIPE
    from benchmarks.workloads import MLP
    from engineflow.execute.build import build
    from engineflow.state.checkpointer import Checkpointer, checkpoints

    if mlp:  # one short epoch of the MLP: the state is its weights, the optimizer's, the RNGs, a history row
        overrides = {"features": MLP.features, "hidden": list(MLP.hidden), "classes": MLP.classes, "samples": 1024,
                     "batch_size": MLP.batch_size, "epochs": 1}
        fit, _, _ = build(MLP_RECIPE, overrides, device="cpu")
    else:
        fit, _, _ = build(RECIPE, {"epochs": 1}, device="cpu")
    fit.run(1)  # the optimizer's momentum buffers, a history row and a best epoch are part of the state
    folder = _scratch()
    checkpointer = Checkpointer(folder, checkpoints(keep_last=1, keep_best=0), "benchmark", warn=print)
    checkpointer.handlers(fit)  # attaches it to the fit, as engineflow.run does
    saved: list[Path] = []

    def load() -> None:
        found = checkpointer.latest()
        if found is None:
            raise RuntimeError(f"Checkpointer.latest() found nothing in {folder}")
        checkpointer.load_state_dict(found[1])
        fit.load_state_dict(found[1])

    written: list[Any] = []

    def plain() -> None:
        # The object the checkpointer wrote, read back once: the baseline saves exactly the same content.
        if not written:
            written.append(torch.load(saved[-1], map_location="cpu", weights_only=False))
        torch.save(written[0], folder / "plain.pt")

    def save() -> None:
        started = time.perf_counter()
        saved.append(checkpointer.save("epoch"))
        _submits.append(time.perf_counter() - started)
        wait = getattr(checkpointer, "wait", None)  # a version that writes in the background: the whole save
        if wait is not None:
            wait()

    return (save, load, plain, lambda: saved[-1])


_folders: list[tempfile.TemporaryDirectory[str]] = []  # removed when the worker process exits
_submits: list[float] = []  # wall time of Checkpointer.save itself: what the training thread waits for


def _scratch() -> Path:
    _folders.append(tempfile.TemporaryDirectory(prefix="engineflow-bench-ckpt-"))
    return Path(_folders[-1].name)


def _timed(action: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu
