"""Two processes (gloo): engineflow's data-parallel fit against a hand-written DDP loop, paired by epoch.

The case's worker process (:mod:`benchmarks.worker`) forks two ranks (three for :mod:`benchmarks.ddp3`,
which runs the same loops through :func:`run_ranks` and :func:`paired`) with ``torch.multiprocessing``
(each: one thread, gloo on 127.0.0.1 at a free port, killed by the kernel if the worker dies, a
300-s collective timeout) and returns rank 0's result. Inside every rank, on the compute-bound MLP
(784-1024-1024-10, batch 256 per process, data, model and optimizer built as
:mod:`benchmarks.workloads` builds them after ``torch.manual_seed(0)``), the loops take turns an epoch
each, rotated every block in whole rotations as in :mod:`benchmarks.paired`:

* ``raw``, the reference: the loop a user writes by hand: ``DistributedDataParallel(model)``, a
  ``DataLoader`` with a ``DistributedSampler`` (``set_epoch`` each epoch), the same
  :func:`benchmarks.loops.sgd_step` (``cross_entropy``, ``zero_grad``, ``backward``, ``step``), the
  loss summed with ``.item()`` and all-reduced once per epoch (total and count) for reporting;
* ``raw_ordered`` (the ``ddp3`` family, :mod:`benchmarks.ddp3`): the same loop with engineflow's DDP
  communication hook :func:`engineflow.execute.parallel.ordered_sum` registered on its wrapper, as
  ``train_wrappers`` registers it from 3 gloo processes on;
* ``ignite``: a plain Ignite ``Engine`` around the same step, DDP model and loader (the control:
  Ignite's loop without engineflow);
* ``engineflow``: a real fit from :func:`engineflow.execute.fit.build_fit`, as ``engineflow run
  --nproc 2`` builds it: the train engine from ``make_engine`` running a train step, the model
  wrapped by ``train_wrappers`` (``idist.auto_model``), the train loader sharded by
  ``shard_loaders`` (``ShardBatches``: a ``shards.Dealer``'s batches), the loss checked every iteration and summed over
  the ranks once per epoch by ``LossMonitor(reduce=sum_over_ranks)``, each epoch reseeded by
  ``EpochData``, the fit's own handlers (history, best epoch). No recorder, validation or checkpoint:
  the hand-written loop does none of them either.

**One model and one optimizer for all loops**, as in :mod:`benchmarks.paired`: the same weights,
optimizer state and dataset, so that the loops differ by their code only (not by which copy of
7.4 MB of weights is warm in the cache). Each loop wraps that module its own way: the hand-written
loops in a ``DistributedDataParallel`` built by hand, engineflow in the one ``train_wrappers`` builds
(``idist.auto_model`` calls ``DistributedDataParallel(model)`` with the same arguments on CPU). Two
DDP wrappers of one module are two reducers whose hooks sit on the same parameters; the one not in
use returns at once (no forward prepared it), in every loop alike. Checked (:func:`check_weights`):
training in turn through four wrappers gives the weights of training through one, on 2 ranks, and on
3 with ``ordered_sum`` on every wrapper (gloo's own sums then differ by each wrapper's first step).

Rank 0's CPU time (user + system of the process, gloo's threads included) is the headline, per
iteration; the per-block ratios ``<loop>_ratio`` (CPU), ``<loop>_wall_ratio`` and, for each other
rank r, ``<loop>_rank<r>_ratio`` are medians over blocks of the ratio to the reference epoch of the
same block. The ranks wait for each other at every all-reduce, so one rank's slow spell shows in both
clocks of the others; every rank runs the same epochs in the same order.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.paired import balanced
from benchmarks.workloads import MLP, Workload

WORLD = 2
BLOCKS = 4  # epochs of each loop per process, at least
LOOPS = ["raw", "ignite", "engineflow"]  # the first is the reference
# 32 steps of ~45 ms a rank (the MLP's step and an all-reduce of 1.9M gradients): ~1.5-s epochs.
SAMPLES = 16384
TIMEOUT_S = 300  # a collective that waits longer than this fails (a rank died)
Result = dict[str, Any]


def family(quick: bool = False) -> Family:
    mlp = replace(MLP, samples=512 if quick else SAMPLES, epochs=1)
    blocks = balanced(2 if quick else BLOCKS, LOOPS)
    per_rank = mlp.samples // WORLD // mlp.batch_size
    return Family(
        name="ddp",
        title=f"MLP 784-1024-1024-10 on {WORLD} processes (gloo, one thread each), batch {mlp.batch_size} per "
              f"process, {mlp.samples} samples: loops alternating by epoch inside every rank, {blocks} epochs "
              f"each (whole rotations), {per_rank} iterations per epoch per rank",
        unit="us/iteration",
        baseline=None,
        cases=[Case("mlp", "mlp: hand-written DDP loop (rank 0), reference",
                    worker_argv("ddp", "paired", workload=mlp.as_dict(), loops=LOOPS, blocks=blocks, world=WORLD))],
        setup={"workload": mlp.as_dict(), "world": WORLD, "backend": "gloo", "loops": LOOPS, "blocks": blocks},
        notes=["median etc.: the hand-written DDP loop's epochs on rank 0 (CPU time of the process). Below, medians "
               "over rounds of: <loop>_us (rank 0, CPU), <loop>_ratio / <loop>_extra_us (rank 0, CPU), "
               "<loop>_wall_ratio (rank 0), <loop>_rank1_ratio (rank 1, CPU), each a median over blocks against "
               "the hand-written loop's epoch of the same block. ignite = plain Ignite Engine on the same DDP "
               "model and loader; engineflow = build_fit's fit (train_wrappers, shard_loaders, "
               "LossMonitor(reduce=sum_over_ranks))."],
    )


# the worker's side: start the ranks, wait for them, return rank 0's result --------------------
def measure(case: str, *, workload: dict[str, Any], loops: list[str], blocks: int, world: int = WORLD) -> Result:
    """What :mod:`benchmarks.worker` calls: ``world`` ranks train; rank 0's timing and ratios."""
    if case != "paired":
        raise ValueError(f"unknown case {case!r}; use paired")
    return run_ranks(paired_rank, world, {"workload": workload, "loops": loops, "blocks": blocks})


def paired_rank(*, rank: int, world: int, workload: dict[str, Any], loops: list[str], blocks: int) -> Result:
    """One rank's part of :func:`measure` (its ``params`` as JSON gave them)."""
    return paired(Workload(**{**workload, "hidden": tuple(workload["hidden"])}), rank=rank, world=world,
                  loops=loops, blocks=blocks)


def run_ranks(target: Callable[..., Result], world: int, params: dict[str, Any]) -> Result:
    """Fork ``world`` ranks of a gloo group; each calls ``target(rank=, world=, **params)`` and rank 0's
    return value is the result. A rank that fails ends the others and raises here."""
    import torch.multiprocessing as mp

    _import_once()
    with tempfile.TemporaryDirectory(prefix="engineflow-bench-ddp-") as folder:
        out = Path(folder) / "rank0.json"
        # fork: the ranks start with their imports done (the quick check stays short); like a DataLoader
        # forking its workers, the worker has computed nothing, so no thread pool is copied half-made.
        context = mp.start_processes(_rank, args=(world, _free_port(), os.getpid(), str(out), target, params),
                                     nprocs=world, join=False, start_method="fork")
        try:
            while not context.join():  # raises when a rank failed, after ending the others
                pass
        finally:
            for process in context.processes:  # only if join raised: no rank outlives the worker
                if process.is_alive():
                    process.kill()
                    process.join()
        return json.loads(out.read_text())


def _import_once() -> None:
    """Import, before the fork, what every rank imports (Ignite, engineflow's fit, and torch._dynamo,
    which an optimizer's constructor loads): ~2.5 s of imports once instead of once per rank. Nothing
    is timed here; no tensor is computed (no thread pool starts)."""
    import ignite.engine  # noqa: F401
    import torch

    import benchmarks.loops  # noqa: F401
    import engineflow.execute.fit  # noqa: F401

    torch.optim.SGD([torch.nn.Parameter(torch.empty(0))], lr=0.1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the worker died before the line above
        os._exit(1)


def _rank(rank: int, world: int, port: int, parent: int, out: str, target: Callable[..., Result],
          params: dict[str, Any]) -> None:
    """One rank: join the group, run ``target``, rank 0 writes its result."""
    _die_with_parent(parent)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        result = target(rank=rank, world=world, **params)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# inside a rank ---------------------------------------------------------------------------------
def paired(workload: Workload, *, rank: int, world: int, loops: list[str], blocks: int,
           against: tuple[tuple[str, str], ...] = (), traffic: bool = False) -> Result:
    """The loops an epoch each in turn on one model, optimizer and dataset; rank 0 returns the timing
    of the reference loop (the first) and each loop's medians over blocks (see the module).

    ``against``: pairs ``(a, b)`` of loops also compared with each other, ``<a>_over_<b>_ratio`` (rank
    0's CPU time, median over blocks). ``traffic``: ``<loop>_mb``, the megabytes rank 0's process wrote
    per iteration (sockets included: the gradients it sent), median over blocks; Linux only."""
    import statistics

    import torch
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from benchmarks import timing
    from benchmarks.workloads import make_data, make_model, make_optimizer

    torch.manual_seed(0)
    x, y, _, _ = make_data(workload)
    model = make_model(workload)
    optimizer = make_optimizer(model, workload)
    dataset = TensorDataset(x, y)
    epochs = {name: _epoch_runner(name, model, optimizer, dataset, workload, rank, world) for name in loops}

    cpu: dict[str, list[float]] = {name: [] for name in loops}
    wall: dict[str, list[float]] = {name: [] for name in loops}
    sent: dict[str, list[float]] = {name: [] for name in loops}
    reference = {"seconds": 0.0, "cpu_seconds": 0.0, "iterations": 0}
    for block in range(blocks):
        shift = block % len(loops)
        for name in loops[shift:] + loops[:shift]:
            dist.barrier()  # every rank starts the epoch together, outside the clock
            written = bytes_written() if traffic else None
            clock = timing.Clock()
            result = clock.stop(epochs[name]())
            if written is not None:
                sent[name].append((bytes_written() - written) / 1e6 / result["iterations"])
            cpu[name].append(1e6 * result["cpu_seconds"] / result["iterations"])
            wall[name].append(1e6 * result["seconds"] / result["iterations"])
            if name == loops[0]:
                reference = {key: reference[key] + result[key] for key in reference}
    others = [None] * world
    dist.all_gather_object(others, cpu)

    def ratio(values: list[float], base: list[float]) -> float:
        return statistics.median(v / b for v, b in zip(values, base, strict=True))

    base, base_wall = cpu[loops[0]], wall[loops[0]]
    details: dict[str, float] = {}
    for name in loops:
        details[f"{name}_us"] = statistics.median(cpu[name])
        details[f"{name}_wall_us"] = statistics.median(wall[name])
        if sent[name]:
            details[f"{name}_mb"] = statistics.median(sent[name])
        if name == loops[0]:
            continue
        details[f"{name}_extra_us"] = statistics.median(v - b for v, b in zip(cpu[name], base, strict=True))
        details[f"{name}_ratio"] = ratio(cpu[name], base)
        details[f"{name}_wall_ratio"] = ratio(wall[name], base_wall)
        for other in range(1, world):
            details[f"{name}_rank{other}_ratio"] = ratio(others[other][name], others[other][loops[0]])
    for a, b in against:
        details[f"{a}_over_{b}_ratio"] = ratio(cpu[a], cpu[b])
    return {**reference, **details}


def bytes_written() -> int | None:
    """What this process (every thread) has written so far, files and sockets: ``wchar`` of
    ``/proc/self/io``; None where there is no such file."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return None
    return next(int(line.split(":")[1]) for line in lines if line.startswith("wchar:"))


def _epoch_runner(name: str, model: Any, optimizer: Any, dataset: Any, workload: Workload, rank: int,
                  world: int) -> Callable[[], int]:
    """A function that trains one epoch with the loop ``name`` and returns its iterations."""
    if name in ("raw", "raw_ordered", "ignite"):
        return _hand_written(name, model, optimizer, dataset, workload, rank, world)
    if name == "engineflow":
        return _engineflow(model, optimizer, dataset, workload, rank, world)
    raise ValueError(f"unknown loop {name!r}; use raw, raw_ordered, ignite or engineflow")


def _hand_written(name: str, model: Any, optimizer: Any, dataset: Any, workload: Workload, rank: int,
                  world: int) -> Callable[[], int]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from benchmarks.loops import sgd_step

    ddp = DistributedDataParallel(model)
    if name == "raw_ordered":
        from engineflow.execute.parallel import ordered_sum

        ddp.register_comm_hook(None, ordered_sum)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=workload.batch_size, sampler=sampler, num_workers=0)
    epoch = 0
    sums = [0.0, 0]  # the epoch's loss total and batches, on this rank

    def mean_loss() -> float:
        summed = torch.tensor([sums[0], float(sums[1])], dtype=torch.float64)
        dist.all_reduce(summed)  # once per epoch: the loss of every rank's batches
        return float(summed[0] / summed[1])

    if name in ("raw", "raw_ordered"):
        def raw_epoch() -> int:
            nonlocal epoch
            epoch += 1
            sampler.set_epoch(epoch)
            sums[:] = [0.0, 0]
            for x, y in loader:
                loss = sgd_step(ddp, optimizer, x, y)
                sums[0] += loss.item()
                sums[1] += 1
            mean_loss()
            return sums[1]

        return raw_epoch

    from ignite.engine import Engine

    def update(engine: Engine, batch: tuple[Any, Any]) -> float:
        value = sgd_step(ddp, optimizer, *batch).item()
        sums[0] += value
        sums[1] += 1
        return value

    engine = Engine(update)

    def ignite_epoch() -> int:
        nonlocal epoch
        epoch += 1
        sampler.set_epoch(epoch)
        sums[:] = [0.0, 0]
        engine.run(loader, max_epochs=1)
        mean_loss()
        return engine.state.iteration

    return ignite_epoch


def _engineflow(model: Any, optimizer: Any, dataset: Any, workload: Workload, rank: int,
                world: int) -> Callable[[], int]:
    """A fit built by :func:`build_fit` from the components a recipe's ``setup`` would return, its train
    loader sharded by ``shard_loaders``, as :func:`engineflow.execute.build.build_pipeline` does."""
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.loops import sgd_step
    from engineflow.declare.configuration import Config
    from engineflow.declare.recipe import Recipe
    from engineflow.declare.steps import StepSpec
    from engineflow.execute.fit import build_fit
    from engineflow.execute.parallel import World, shard_loaders, train_loader_names
    from engineflow.execute.scope import StageScope
    from engineflow.runtime import RunContext
    from engineflow.state.resume import StageInfo

    def train_step(batch: tuple[Any, Any], model: Any, optimizer: Any) -> dict[str, Any]:
        x, y = batch
        return {"loss": sgd_step(model, optimizer, x, y)}

    recipe = Recipe(path=Path(__file__), name="ddp", module=sys.modules[__name__], config=Config({}), setup=None,
                    steps={"train": StepSpec("train", train_step)}, handlers=())
    train = DataLoader(dataset, batch_size=workload.batch_size, shuffle=True, num_workers=0,
                       generator=torch.Generator().manual_seed(0))
    loaders = shard_loaders({"train": train}, World(rank, world, "gloo"), train=train_loader_names(recipe))
    components = {"model": model, "optimizer": optimizer, "loaders": loaders}
    context = RunContext("bench-ddp", "ddp", Path(tempfile.gettempdir()), torch.device("cpu"), 0, rank=rank,
                         world_size=world)
    scope = StageScope(StageInfo(), {"cfg": Config({}), "device": context.device, "run": context}, components)
    fit = build_fit(recipe, components, scope, seed=0)

    def engineflow_epoch() -> int:
        fit.run(1)  # the engine's run restarts at epoch 1: reseeded alike every time
        return fit.train.state.iteration

    return engineflow_epoch


def check_weights(steps: int = 8, world: int = WORLD) -> None:
    """``world`` ranks training in turn through four DDP wrappers of one module end with the weights of
    training through one wrapper (``python -c "import benchmarks.ddp as d; d.check_weights(world=3)"``);
    from 3 ranks on, every wrapper sums with ``ordered_sum``, as engineflow's does."""
    import torch.multiprocessing as mp

    mp.start_processes(_check_rank, args=(world, _free_port(), steps), nprocs=world, start_method="fork")
    print("same weights")


def _check_rank(rank: int, world: int, port: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks.loops import sgd_step
    from benchmarks.workloads import make_data, make_model, make_optimizer
    from engineflow.execute.parallel import ordered_sum

    def wrap(model: Any) -> Any:
        wrapper = DistributedDataParallel(model)
        # From 3 ranks on, gloo's sums depend on the bucket layout, which each wrapper's first step
        # has alone: without the ordered sum, four wrappers differ from one by their first steps.
        if world > 2:
            wrapper.register_comm_hook(None, ordered_sum)
        return wrapper

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        small = replace(MLP, hidden=(64, 64), samples=64 * steps * world)
        x, y, _, _ = make_data(small)
        weights = []
        for wrappers in (1, 4):
            torch.manual_seed(0)
            model = make_model(small)
            optimizer = make_optimizer(model, small)
            ddps = [wrap(model) for _ in range(wrappers)]
            for step in range(steps):
                start = (step * world + rank) * 64
                sgd_step(ddps[step % wrappers], optimizer, x[start:start + 64], y[start:start + 64])
            weights.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True)), "the weights differ"
    finally:
        dist.destroy_process_group()
