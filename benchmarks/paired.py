"""Paired in one process: the loop's own cost and the handlers' marginal cost, a few microseconds each.

Separate processes on a shared machine differ by more than these costs, so each process here runs
several loops on the same model, optimizer and loader, one epoch each in turn (rotated every block),
and reports medians of per-block differences and ratios (see :func:`benchmarks.loops.paired`):

* ``engine``: raw loop, plain Ignite ``Engine``, engineflow's engine with no handlers, on the
  overhead-bound model and the standard ``DataLoader``;
* ``handlers``: engineflow's engine with 0, 5 and 20 no-op handlers declared with
  ``ef.every_n_iterations(100)`` and attached with ``attach_in_order`` as the recipe loader does,
  on a ``TensorLoader`` (the cheapest loop, where a handler's share is largest);
* ``dispatch``: the same engines and handlers around a step that does nothing, on no data: what
  is left per iteration is Ignite's loop and engineflow's dispatch, whose few microseconds the
  ``handlers`` case cannot resolve from its training's noise (a few percent per round);
* ``compute``: the compute-bound MLP, one epoch each of the raw loop, plain Ignite and
  engineflow's engine (the loop's own cost);
* ``recorded``: the compute-bound MLP on twice the samples (2-s epochs), one epoch each of the raw
  loop, a whole ``engineflow.run`` with its default handlers (validation and a full-state
  checkpoint every epoch), and the raw loop doing that validation and a checkpoint by hand. What
  the default handlers cost is fixed per epoch (``<loop>_extra_ms_epoch``), so its ratio depends
  on the epoch's length: this case reports both.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.workloads import MLP, TINY

EVERY = 100
BLOCKS = 4  # epochs of each loop per process, at least
ENGINES = ["raw", "ignite", "engineflow"]
HANDLERS = ["engineflow", "engineflow+5", "engineflow+20"]
COMPUTE = ["raw", "ignite", "engineflow"]
RECORDED = ["raw", "engineflow_recipe", "raw_recorded"]
# The per-epoch duties (validation, a 7.4 MB checkpoint, records: ~20 ms) are ~2% of MLP's 1-s
# epoch of 8192 samples and ~1% of a 2-s epoch; the data is 65536 samples (8-s epochs).
RECORDED_SAMPLES = 16384
# A step that does nothing leaves ~3-7 us per iteration (Ignite's loop, the handlers): 65536
# iterations are a 0.2-0.5 s epoch, 12 blocks ~15-20 s per process.
DISPATCH_ITERATIONS = 65536


def balanced(blocks: int, variants: list[str]) -> int:
    """At least ``blocks``, rounded up to a whole number of rotations: each loop then takes each
    place in a block equally often (an epoch's place, e.g. after which loop, can cost a few us)."""
    return -(-blocks // len(variants)) * len(variants)


def family(quick: bool = False) -> Family:
    # One epoch of the overhead-bound workload per block (1024 iterations).
    workload = TINY.scaled(samples=4096 if quick else TINY.samples, epochs=1)
    blocks = 2 if quick else BLOCKS
    params = {"workload": workload.as_dict(), "blocks": blocks, "every": EVERY}
    mlp = MLP.scaled(samples=512 if quick else MLP.samples, epochs=1)
    longer = replace(mlp, samples=512 if quick else RECORDED_SAMPLES)
    dispatch_iterations = 4096 if quick else DISPATCH_ITERATIONS
    cases = [
        Case("engine", "engine: raw loop (DataLoader), the reference",
             worker_argv("loops", "paired", variants=ENGINES, loader="dataloader",
                         **{**params, "blocks": balanced(blocks, ENGINES)})),
        # 5% of this ~240 us loop is 12 us: three times the blocks (its epochs take 0.25 s) to resolve it.
        Case("handlers", "handlers: engineflow + TensorLoader, 0 handlers",
             worker_argv("loops", "paired", variants=HANDLERS, loader="tensor",
                         **{**params, "blocks": balanced(3 * blocks, HANDLERS)})),
        Case("dispatch", "dispatch: engineflow, step doing nothing, 0 handlers",
             worker_argv("loops", "dispatch", variants=HANDLERS, every=EVERY,
                         iterations=dispatch_iterations, blocks=balanced(3 * blocks, HANDLERS))),
        Case("compute", "compute: raw loop (DataLoader), the reference",
             worker_argv("loops", "paired", variants=COMPUTE, loader="dataloader",
                         **{**params, "workload": mlp.as_dict(), "blocks": balanced(blocks, COMPUTE)})),
        Case("recorded", "recorded: raw loop (DataLoader), the reference",
             worker_argv("loops", "paired", variants=RECORDED, loader="dataloader",
                         **{**params, "workload": longer.as_dict(), "blocks": balanced(blocks, RECORDED)})),
    ]
    return Family(
        name="paired",
        title=f"loops alternating by epoch inside one process, {blocks} or more epochs each (whole rotations): "
              f"{workload.samples // workload.batch_size} iterations per epoch (engine, handlers), "
              f"{dispatch_iterations} (dispatch), "
              f"{mlp.samples // mlp.batch_size} (compute), {longer.samples // longer.batch_size} (recorded)",
        unit="us/iteration",
        baseline=None,
        cases=cases,
        setup={"workload": workload.as_dict(), "blocks": blocks, "every": EVERY, "engine": ENGINES,
               "handlers": HANDLERS, "dispatch_iterations": dispatch_iterations,
               "compute": COMPUTE, "compute_workload": mlp.as_dict(), "recorded": RECORDED,
               "recorded_workload": longer.as_dict()},
        notes=["median etc.: the reference loop of each process. Below, medians over rounds: <loop>_us, and "
               "<loop>_extra_us / <loop>_ratio against the reference epoch of the same block; "
               "<loop>_extra_ms_epoch = <loop>_extra_us per epoch, in ms (CPU)."],
    )
