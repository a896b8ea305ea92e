"""GPU: the compute-bound MLP on CUDA with AMP, pinned memory and non-blocking copies, or data on the GPU.

A raw loop and engineflow's engine run the same step (bf16 autocast; no GradScaler needed for
bf16), fed three ways: a ``DataLoader`` with ``pin_memory=True`` and ``non_blocking`` copies
(engineflow's step copies with :func:`engineflow.declare.supervised.prepare_batch`), a ``TensorLoader``
holding the data on the GPU, and the latter with ``torch.compile``. A fourth pair, ``options``, has
engineflow's own step options do it (``@ef.train_step(precision="bf16", compile=True)`` in
``recipes/gpu_options.py``, built with ``ef.build`` and run with ``fit.run``) against the raw loop
doing the same by hand (autocast, ``torch.compile``), both fed by a ``DataLoader`` that prefetches
in worker processes into pinned memory. Each process first runs a
few untimed steps (compilation, cuDNN/cuBLAS warm-up), then times the loop between two
``torch.cuda.synchronize()``. Skipped, with a note, when ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.harness import Case, Family, child_env, worker_argv
from benchmarks.timing import Clock
from benchmarks.workloads import MLP, Workload

WARMUP_STEPS = 10
# On a GPU the MLP step is ~100x faster than on one CPU core: more data keeps the timed part long enough.
GPU_MLP = replace(MLP, name="mlp-gpu", samples=65536)
VARIANTS = {
    # name: (loader, compile)
    "pinned": ("pinned", False),
    "resident": ("resident", False),
    "compiled": ("resident", True),
    # engineflow's own step options (bf16, torch.compile) against the raw loop doing the same by hand
    "options": ("prefetch", True),
}
OPTIONS_RECIPE = Path(__file__).resolve().parent / "recipes" / "gpu_options.py"


def family(quick: bool = False) -> Family:
    workload = GPU_MLP.scaled(samples=4096, epochs=1) if quick else GPU_MLP
    labels = {"pinned": "pinned DataLoader + non_blocking", "resident": "TensorLoader on the GPU",
              "compiled": "TensorLoader on the GPU + torch.compile",
              "options": "prefetching DataLoader + bf16 + torch.compile (engineflow: its step options)"}
    cases = [
        Case(f"{loop}_{variant}", f"{'raw loop' if loop == 'raw' else 'engineflow'}, {labels[variant]}",
             worker_argv("gpu", "engineflow_options" if (loop, variant) == ("engineflow", "options") else loop,
                         workload=workload.as_dict(), loader=loader, compile=compiled))
        for variant, (loader, compiled) in VARIANTS.items()
        for loop in ("raw", "engineflow")
    ]
    result = Family(
        name="gpu",
        title=f"MLP 784-1024-1024-10 on CUDA, bf16 autocast, batch {workload.batch_size}, {workload.samples} "
              f"samples, {workload.epochs} epoch(s)",
        unit="us/iteration",
        baseline="raw_pinned",
        cases=cases,
        clock="wall",  # the GPU runs asynchronously: the process's CPU time says little
        setup={"workload": workload.as_dict(), "warmup_steps": WARMUP_STEPS},
    )
    why = _no_gpu()
    if why:
        result.skipped = {case.name: why for case in cases}
        result.cases = []
    return result


def _no_gpu() -> str:
    # Asked in a child process: importing torch here would inflate every later child's peak RSS,
    # which Linux counts from the memory a child starts with.
    check = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    code = subprocess.run([sys.executable, "-c", check], env=child_env(), capture_output=True, timeout=120).returncode
    if code == 3:
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return "" if code == 0 else f"could not ask torch whether CUDA is available (exit code {code})"


def measure(
    loop: str, *, workload: dict[str, Any], loader: str, compile: bool, device: str = "cuda"
) -> dict[str, float]:
    """Train on ``device`` with the raw loop or engineflow's engine; what :mod:`benchmarks.worker` calls."""
    import torch

    from benchmarks.workloads import make_data, make_loader, make_model, make_optimizer

    w = Workload(**{**workload, "hidden": tuple(workload["hidden"])})
    if loop == "engineflow_options":
        return _engineflow_options(w, loader, compile, device)
    torch.manual_seed(0)
    x, y, _, _ = make_data(w)
    model = make_model(w).to(device)
    optimizer = make_optimizer(model, w)
    if loader == "pinned":
        train = make_loader(x, y, kind="dataloader", batch_size=w.batch_size, shuffle=True,
                            pin_memory=device.startswith("cuda"))
    elif loader == "prefetch":
        train = make_loader(x, y, kind="prefetch", batch_size=w.batch_size, shuffle=True)
    else:
        from engineflow.data import TensorLoader

        train = TensorLoader(x, y, batch_size=w.batch_size, shuffle=True, seed=0, device=device)
    step_model = torch.compile(model) if compile else model
    if loop == "raw":
        def prepare(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    else:
        from engineflow.declare.supervised import prepare_batch

        prepare = functools.partial(prepare_batch, device=device)  # the same non_blocking copies

    def step(batch: Any) -> torch.Tensor:
        xb, yb = prepare(batch)  # a no-op for data already on the device
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(step_model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    first = next(iter(train))
    for _ in range(WARMUP_STEPS):
        step(first)
    _sync(device)
    run = _raw if loop == "raw" else _engineflow
    return run(step, train, w.epochs, device)


def _raw(step: Any, train: Iterable[Any], epochs: int, device: str) -> dict[str, float]:
    iterations = 0
    clock = Clock()
    for _ in range(epochs):
        for batch in train:
            step(batch)
            iterations += 1
    _sync(device)
    return clock.stop(iterations)


def _engineflow(step: Any, train: Iterable[Any], epochs: int, device: str) -> dict[str, float]:
    from engineflow.declare.steps import StepSpec
    from engineflow.execute.engine import make_engine

    engine = make_engine(StepSpec("train", lambda batch: {"loss": step(batch)}), {})
    clock = Clock()
    engine.run(train, max_epochs=epochs)
    _sync(device)
    return clock.stop(engine.state.iteration)


def _engineflow_options(w: Workload, loader: str, compile: bool, device: str) -> dict[str, float]:
    """``ef.build`` of ``recipes/gpu_options.py`` (``@ef.train_step(precision="bf16", compile=True)``, the
    prefetching loader), warmed up as the raw loop is, then ``fit.run``."""
    import itertools

    import engineflow as ef

    if (loader, compile) != VARIANTS["options"]:
        raise ValueError(f"engineflow_options runs the recipe's own loader and options {VARIANTS['options']}, "
                         f"not {(loader, compile)}")
    overrides = {name: getattr(w, name) for name in ("features", "classes", "samples", "batch_size", "epochs", "lr")}
    fit, _, _ = ef.build(OPTIONS_RECIPE, {**overrides, "hidden": list(w.hidden)}, device=device)
    fit.train.run(list(itertools.islice(fit.loaders["train"], WARMUP_STEPS)), max_epochs=1)
    _sync(device)
    clock = Clock()
    fit.run(epochs=w.epochs)  # the warm-up run is done: this one starts from epoch 0
    _sync(device)
    return clock.stop(fit.train.state.iteration)


def _autocast(device: str) -> AbstractContextManager[Any]:
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
