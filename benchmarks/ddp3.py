"""Three processes (gloo): what engineflow's ordered gradient sum costs over gloo's all-reduce.

From 3 gloo processes on, :func:`engineflow.execute.parallel.train_wrappers` registers the DDP
communication hook :func:`engineflow.execute.parallel.ordered_sum` on every DDP model: each rank's
gradient bucket is all-gathered and added up rank 0 first, so that the sums do not depend on DDP's
bucket layout (exact resume). This family runs :mod:`benchmarks.ddp`'s paired epochs on 3 ranks,
with a fourth loop that isolates the hook:

* ``raw``, the reference: the hand-written DDP loop, gloo's all-reduce (DDP's default);
* ``raw_ordered``: the same loop with ``ordered_sum`` registered on its wrapper (the hook's cost);
* ``ignite``: plain Ignite around the same step and DDP model, all-reduce (the control);
* ``engineflow``: the fit from ``build_fit``, whose ``train_wrappers`` registers the hook itself.

``engineflow_over_raw_ordered_ratio`` compares engineflow with the hooked loop (what is left is
engineflow's own loop), and ``<loop>_mb`` is what rank 0 wrote per iteration (its share of the
gradients' traffic). After the epochs, every rank steps two DDP wrappers of a ``Linear(n, 1)``,
``n`` the MLP's parameter count (one gradient bucket of the MLP's size, as DDP lays the MLP out
after its first step), whose forward and backward are a dot product: one with DDP's all-reduce,
one with ``ordered_sum``, alternately (``bucket_<way>_us``, ``_wall_us``, ``_mb``: rank 0's CPU
time, wall time and bytes written per step; ``bucket_ordered_ratio``, per pair of steps).

Three one-thread ranks on a machine with fewer than three cores share the cores: each rank's CPU
time per step moves little, its wall time waits for the rank that is off a core.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks import ddp
from benchmarks.harness import Case, Family, worker_argv
from benchmarks.paired import balanced
from benchmarks.workloads import MLP, Workload

WORLD = 3
BLOCKS = 4  # epochs of each loop per process, at least
LOOPS = ["raw", "raw_ordered", "ignite", "engineflow"]  # the first is the reference
AGAINST = (("engineflow", "raw_ordered"),)
# 32 steps of batch 256 a rank, as in the 2-process family; a multiple of 3 x 256 (no padding).
SAMPLES = 24576
BUCKET_STEPS = 20  # steps of each reduction, alternating


def family(quick: bool = False) -> Family:
    # --quick checks that the code runs: one step a rank of a small MLP keeps it to the process's start.
    mlp = replace(MLP, hidden=(64, 64), samples=WORLD * MLP.batch_size) if quick else replace(MLP, samples=SAMPLES)
    mlp = replace(mlp, epochs=1)
    blocks = balanced(1 if quick else BLOCKS, LOOPS)
    bucket_steps = 1 if quick else BUCKET_STEPS
    per_rank = mlp.samples // WORLD // mlp.batch_size
    widths = "-".join(str(width) for width in (mlp.features, *mlp.hidden, mlp.classes))
    return Family(
        name="ddp3",
        title=f"MLP {widths} on {WORLD} processes (gloo, one thread each), batch {mlp.batch_size} per "
              f"process, {mlp.samples} samples: loops alternating by epoch inside every rank, {blocks} epochs "
              f"each (whole rotations), {per_rank} iterations per epoch per rank; then {bucket_steps} steps "
              f"of each reduction of one MLP-sized bucket",
        unit="us/iteration",
        baseline=None,
        cases=[Case("mlp", "mlp: hand-written DDP loop (rank 0), reference",
                    worker_argv("ddp3", "paired", workload=mlp.as_dict(), loops=LOOPS, blocks=blocks, world=WORLD,
                                bucket_steps=bucket_steps))],
        setup={"workload": mlp.as_dict(), "world": WORLD, "backend": "gloo", "loops": LOOPS, "blocks": blocks,
               "bucket_steps": bucket_steps},
        notes=["median etc.: the hand-written DDP loop's epochs on rank 0 (CPU time of the process). Below, as in "
               "ddp, with rank1 and rank2 ratios; raw_ordered = the hand-written loop with engineflow's ordered_sum "
               "hook; engineflow_over_raw_ordered_ratio = engineflow against that loop; <loop>_mb = MB rank 0 "
               "wrote per iteration; bucket_<way>_us / _wall_us / _mb = one DDP step of a Linear(n, 1) with the "
               "MLP's n parameters (one bucket), allreduce (DDP's default) or ordered (ordered_sum), rank 0.",
               "3 ranks of one thread: on fewer than 3 cores they share them (wall time waits for the rank off "
               "a core; CPU time per step moves less)."],
    )


def measure(case: str, *, workload: dict[str, Any], loops: list[str], blocks: int, world: int,
            bucket_steps: int) -> ddp.Result:
    """What :mod:`benchmarks.worker` calls: ``world`` ranks train, then reduce one bucket both ways."""
    if case != "paired":
        raise ValueError(f"unknown case {case!r}; use paired")
    return ddp.run_ranks(_rank_work, world, {"workload": workload, "loops": loops, "blocks": blocks,
                                             "bucket_steps": bucket_steps})


def _rank_work(*, rank: int, world: int, workload: dict[str, Any], loops: list[str], blocks: int,
               bucket_steps: int) -> ddp.Result:
    from benchmarks.workloads import make_model

    work = Workload(**{**workload, "hidden": tuple(workload["hidden"])})
    result = ddp.paired(work, rank=rank, world=world, loops=loops, blocks=blocks, against=AGAINST, traffic=True)
    size = sum(p.numel() for p in make_model(work).parameters())
    return {**result, **bucket_reductions(size, steps=bucket_steps)}


def bucket_reductions(size: int, *, steps: int) -> dict[str, float]:
    """This rank's CPU time, wall time (us) and megabytes written per DDP step of a ``Linear(size, 1)``
    without bias, all-reduced by DDP (``allreduce``) and by ``ordered_sum`` (``ordered``), ``steps``
    of each in alternating order. Collective: every rank calls it."""
    import statistics

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks import timing
    from engineflow.execute.parallel import ordered_sum

    x = torch.ones(1, size)
    ways = {"allreduce": DistributedDataParallel(torch.nn.Linear(size, 1, bias=False)),
            "ordered": DistributedDataParallel(torch.nn.Linear(size, 1, bias=False))}
    ways["ordered"].register_comm_hook(None, ordered_sum)
    for wrapper in ways.values():  # DDP lays its bucket out anew after the first step
        for _ in range(2):
            wrapper(x).sum().backward()
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    sent: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for step in range(steps):
        for name in names if step % 2 == 0 else names[::-1]:
            wrapper = ways[name]
            wrapper.module.weight.grad = None  # nothing accumulated: the step is the same every time
            dist.barrier()
            written = ddp.bytes_written()
            clock = timing.Clock()
            wrapper(x).sum().backward()  # returns when DDP's reduction of the bucket is done
            result = clock.stop(1)
            if written is not None:
                sent[name].append((ddp.bytes_written() - written) / 1e6)
            cpu[name].append(1e6 * result["cpu_seconds"])
            wall[name].append(1e6 * result["seconds"])
    details: dict[str, float] = {}
    for name in names:
        details[f"bucket_{name}_us"] = statistics.median(cpu[name])
        details[f"bucket_{name}_wall_us"] = statistics.median(wall[name])
        if sent[name]:
            details[f"bucket_{name}_mb"] = statistics.median(sent[name])
    pairs = list(zip(cpu["ordered"], cpu["allreduce"], strict=True))
    details["bucket_ordered_extra_us"] = statistics.median(a - b for a, b in pairs)
    details["bucket_ordered_ratio"] = statistics.median(a / b for a, b in pairs)
    details["bucket_ordered_wall_ratio"] = statistics.median(
        a / b for a, b in zip(wall["ordered"], wall["allreduce"], strict=True))
    return details
