"""The marginal cost of handlers that are not due: 5 and 20 no-ops filtered to every 100 iterations.

Handlers are declared with ``ef.every_n_iterations(100)`` and attached with
``engineflow.engine.attach_in_order``, as the recipe loader does. A few microseconds are below
what separate processes can resolve on a shared machine, so each process alternates epochs of an
engine with the handlers and one without (0 handlers), on the same model and ``TensorLoader``
(the loop's cheapest form, where a handler's share is largest), and reports the paired difference.
"""

from __future__ import annotations

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.workloads import TINY

COUNTS = (5, 20)
EVERY = 100
BLOCKS = 4  # epochs per engine in each process


def family(quick: bool = False) -> Family:
    workload = TINY.scaled(samples=4096, epochs=1) if quick else TINY.scaled(samples=TINY.samples, epochs=1)
    blocks = 2 if quick else BLOCKS
    cases = [
        Case(f"handlers_{n}", f"engineflow + TensorLoader, {n} no-op handlers",
             worker_argv("loops", "engineflow_paired", workload=workload.as_dict(), loader="tensor", handlers=n,
                         every=EVERY, blocks=blocks))
        for n in COUNTS
    ]
    return Family(
        name="handlers",
        title=f"no-op handlers on ITERATION_COMPLETED(every={EVERY}) against none, in the same process",
        unit="us/iteration",
        baseline=None,
        cases=cases,
        setup={"workload": workload.as_dict(), "counts": list(COUNTS), "every": EVERY, "blocks": blocks},
        notes=["median etc.: the engine with the handlers. Below: the same process's engine without handlers "
               "(baseline_us), the median paired difference (extra_us) and ratio (paired_ratio), as medians over "
               "rounds. Against the DataLoader loop the same microseconds are a ~2x smaller share."],
    )
