"""Overhead-bound: a model so small (``Linear(32, 10)``) that the loop's own cost shows.

Raw loop, plain Ignite, engineflow with no handlers, ``engineflow.run`` with its default
handlers, Lightning, and the same with engineflow's in-memory ``TensorLoader``.
"""

from __future__ import annotations

import importlib.util

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.workloads import TINY, Workload


def training_cases(workload: Workload, loaders: tuple[str, ...]) -> tuple[list[Case], dict[str, str]]:
    """The loops of :mod:`benchmarks.loops` on ``workload``, per loader; Lightning when installed."""
    params = workload.as_dict()
    labels = {
        "raw": "raw loop",
        "ignite": "plain Ignite Engine",
        "engineflow": "engineflow, no handlers",
        "engineflow_recipe": "engineflow.run, default handlers",
        "lightning": "Lightning Trainer",
    }
    has_lightning = importlib.util.find_spec("lightning") is not None
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    for loader in loaders:
        suffix = "" if loader == "dataloader" else "_tensor"
        for loop, label in labels.items():
            name = loop + suffix
            if loop == "ignite" and loader != "dataloader":
                continue  # Ignite with TensorLoader tells nothing that engineflow's row does not
            if loop == "lightning":
                if loader != "dataloader":
                    continue
                if not has_lightning:
                    skipped[name] = "lightning is not installed (pip install lightning, an optional extra)"
                    continue
            text = f"{label} + TensorLoader" if suffix else f"{label} (DataLoader)" if loop == "raw" else label
            cases.append(Case(name, text, worker_argv("loops", loop, workload=params, loader=loader)))
    return cases, skipped


def family(quick: bool = False) -> Family:
    workload = TINY.scaled(samples=4096, epochs=1) if quick else TINY
    cases, skipped = training_cases(workload, ("dataloader", "tensor"))
    return Family(
        name="overhead",
        title=f"{workload.name} model Linear(32, 10), SGD, batch {workload.batch_size}, {workload.samples} samples, "
              f"{workload.epochs} epoch(s)",
        unit="us/iteration",
        baseline="raw",
        cases=cases,
        setup={"workload": workload.as_dict()},
        skipped=skipped,
        notes=[
            "DataLoader: DataLoader(TensorDataset(x, y), shuffle=True, num_workers=0); TensorLoader: "
            "engineflow.data.TensorLoader(x, y, shuffle=True).",
            "engineflow.run = the benchmark recipe (benchmarks/recipes/train.py) through engineflow.run with "
            "every handler it attaches by default (loss check and running average every iteration, validation "
            "with Accuracy and Loss on samples/64 every epoch, history, best epoch, epoch lines to a string, and "
            "whatever else this version writes: see the files listed below).",
            "Lightning: progress bar, logger, checkpointing and model summary off; automatic optimization.",
        ],
    )
