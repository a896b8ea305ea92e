"""Compute-bound: an MLP 784-1024-1024-10 at batch 256, where the matrix products dominate."""

from __future__ import annotations

from benchmarks.harness import Family
from benchmarks.overhead import training_cases
from benchmarks.workloads import MLP


def family(quick: bool = False) -> Family:
    workload = MLP.scaled(samples=512, epochs=1) if quick else MLP
    cases, skipped = training_cases(workload, ("dataloader",))
    return Family(
        name="compute",
        title=f"MLP 784-1024-1024-10, SGD, batch {workload.batch_size}, {workload.samples} samples, "
              f"{workload.epochs} epoch(s)",
        unit="us/iteration",
        baseline="raw",
        cases=cases,
        setup={"workload": workload.as_dict()},
        skipped=skipped,
        notes=[
            "Fewer samples than the overhead-bound family keep the run short: a step takes ~30 ms on one core.",
            "engineflow.run also validates samples/64 every epoch (forward only: ~0.5% more compute than the "
            "raw loop).",
        ],
    )
