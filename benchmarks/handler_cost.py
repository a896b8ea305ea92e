"""The marginal cost of handlers that are not due: 0, 5 and 20 no-ops filtered to every 100 iterations.

Handlers are declared with ``ef.every_n_iterations(100)`` and attached with
``engineflow.engine.attach_in_order``, as the recipe loader does. The engine trains the tiny
model from a ``TensorLoader``: the loop's cheapest form, so the handlers' share shows most.
"""

from __future__ import annotations

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.workloads import TINY

COUNTS = (0, 5, 20)
EVERY = 100


def family(quick: bool = False) -> Family:
    workload = TINY.scaled(samples=4096, epochs=1) if quick else TINY
    cases = [
        Case(f"handlers_{n}", f"engineflow + TensorLoader, {n} no-op handlers",
             worker_argv("loops", "engineflow", workload=workload.as_dict(), loader="tensor", handlers=n, every=EVERY))
        for n in COUNTS
    ]
    return Family(
        name="handlers",
        title=f"no-op handlers on ITERATION_COMPLETED(every={EVERY}), tiny model, TensorLoader",
        unit="us/iteration",
        baseline="handlers_0",
        cases=cases,
        setup={"workload": workload.as_dict(), "counts": list(COUNTS), "every": EVERY},
        notes=["The baseline is the cheapest loop (TensorLoader), so a handler's cost is the largest share it can "
               "be; against the DataLoader loop the same microseconds are a ~2.5x smaller share."],
    )
