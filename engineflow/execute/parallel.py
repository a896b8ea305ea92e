"""Data parallelism on ``torch.distributed``, through Ignite's own ``ignite.distributed``.

A fit on N processes differs from a fit on one in three places, all here:

1. **Models**: the train step gets each trainable module wrapped by ``idist.auto_model``
   (``DistributedDataParallel``: rank 0's weights broadcast at construction, gradients all-reduced in
   ``backward``). Eval, infer and every handler get the plain module, so an eval step's forward is no
   collective (uneven eval shards would otherwise hang) and checkpoints hold the same keys as on one
   process.
2. **Loaders**: :func:`shard_loaders` gives each rank its share, the batches a
   :class:`~engineflow.shards.Dealer` deals out (as a ``TensorLoader`` deals its own). A train
   loader's order is one permutation of all samples, drawn from ``(seed, epoch)`` as on one
   process, padded to a multiple of the world size (every rank runs the same number of steps) and
   dealt out rank by rank, so that batch ``j`` of every rank together cover positions
   ``[j*B*W, (j+1)*B*W)`` of it. Any other loader is split without padding and without dropping:
   each sample on exactly one rank, shards that differ by one sample at most. Ignite's metrics
   all-reduce their sums when they compute, so validation and test metrics equal one process's.
3. **Sums**: :func:`sum_over_ranks` all-reduces the train losses' totals and counts, so
   ``train/loss`` is the mean over every process's batches.

Every function here that calls a collective says so; each must be called by every rank, in the
same order. Nothing engineflow runs on rank 0 alone (records, checkpoints, printing) calls one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from engineflow.errors import RecipeError
from engineflow.shards import Dealer, Dealt, Layout


@dataclass(frozen=True)
class World:
    """The processes training together: this one's ``rank``, their number and the backend."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE_PROCESS = World()


def current_world() -> World:
    """The world ``ignite.distributed`` is initialised with (one process, no backend, if none)."""
    import ignite.distributed as idist

    if idist.get_world_size() <= 1:
        return ONE_PROCESS
    return World(idist.get_rank(), idist.get_world_size(), idist.backend())


# models ----------------------------------------------------------------------------------------
def train_wrappers(components: Mapping[str, Any]) -> dict[str, Any]:
    """The components the train step gets in place of the plain ones: each module with a trainable
    parameter (alone, or in a dict of modules) wrapped by ``idist.auto_model``. Collective (DDP's
    construction broadcasts rank 0's weights): call on every rank, after anything that freezes."""
    import ignite.distributed as idist
    from ignite.utils import setup_logger

    # Ignite's documented way to quiet one of its loggers: the run's own output says it is distributed
    setup_logger("ignite.distributed.auto.auto_model", level=logging.WARNING)

    ordered = idist.backend() == "gloo" and idist.get_world_size() > 2

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        wrapped = idist.auto_model(module)
        if ordered and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, ordered_sum)
        return wrapped

    wrapped: dict[str, Any] = {}
    for name, value in components.items():
        if isinstance(value, torch.nn.Module):
            wrapped[name] = wrap(value)
        elif isinstance(value, Mapping) and value and all(isinstance(v, torch.nn.Module) for v in value.values()):
            wrapped[name] = {k: wrap(v) for k, v in value.items()}
    return wrapped


def ordered_sum(state, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook: the mean of a gradient bucket over the ranks, added up in rank order.

    gloo's all-reduce adds each element in an order set by where the element lies in its bucket, and
    DDP lays its buckets out anew after the first iteration (in the order the gradients became ready),
    so a model rebuilt by a resume reduces its first step in the layout an unbroken run used only for
    its own first step. Two addends give the same float in any order; from three on they need not. Each
    rank's bucket is gathered and added rank 0 first, whatever the layout. Collective (every rank's
    backward calls it for the same buckets, in the same order).

    Unannotated: DDP compares a hook's annotations with ``GradBucket`` and ``Future[Tensor]``
    themselves, and this module's annotations are strings."""
    import torch.distributed as dist

    world = dist.get_world_size()
    local = bucket.buffer().div_(world)
    parts = [torch.empty_like(local) for _ in range(world)]
    work = dist.all_gather(parts, local, async_op=True)

    def added(_: Any) -> torch.Tensor:
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return total

    return work.get_future().then(added)


# loaders ---------------------------------------------------------------------------------------
class ShardBatches(Sampler[list[int]]):
    """One rank's batches of a ``DataLoader``'s samples: ``dealer``'s positions of each epoch's
    order (a permutation drawn from ``generator`` when ``shuffle``, else ``0..n-1``, the same on
    every rank), as sample indices.

    :meth:`start_at` makes the next pass resume the epoch in progress after that many positions of
    its order, each remaining position once (a resume on another number of processes).
    """

    def __init__(self, dealer: Dealer, *, shuffle: bool, generator: torch.Generator | None = None) -> None:
        self.dealer, self.shuffle = dealer, shuffle
        self.generator = generator if generator is not None or not shuffle else torch.Generator()
        self._next = 0  # the offset of the next pass
        self._offset = 0  # the offset of the pass in progress

    def order(self) -> list[int]:
        """The epoch's order of every sample, the same on every rank (draws from the generator)."""
        if self.shuffle:
            return torch.randperm(self.dealer.samples, generator=self.generator).tolist()
        return list(range(self.dealer.samples))

    def __iter__(self) -> Iterator[list[int]]:
        self._offset, self._next = self._next, 0
        order = self.order()
        for positions in self.dealer.batches(self._offset):
            yield [order[p] for p in positions]

    def __len__(self) -> int:
        return self.dealer.count(self._next)

    def layout(self) -> Layout:
        """The :class:`~engineflow.shards.Layout` of the pass in progress."""
        return self.dealer.layout("shard", self._offset)

    def start_at(self, position: int) -> None:
        """Make the next pass continue the epoch in progress after ``position`` positions of its order."""
        self._next = position


def shard_loaders(loaders: Mapping[str, Any], world: World, *, train: Iterable[str]) -> dict[str, Any]:
    """Each loader as this rank's share (see the module): those named in ``train`` padded and in
    their epoch's order, the others split exactly. One process: the loaders themselves."""
    if not world.distributed:
        return dict(loaders)
    train = set(train)
    return {name: shard_loader(loader, world, pad=name in train, name=name) for name, loader in loaders.items()}


def shard_loader(loader: Any, world: World, *, pad: bool, name: str = "") -> Any:
    """This rank's share of one loader: a ``DataLoader`` rebuilt around :class:`ShardBatches`,
    a :class:`~engineflow.data.TensorLoader` told its shard. A loader already sharded by the recipe
    (a ``DistributedSampler``) is kept as it is; anything else is a RecipeError."""
    from torch.utils.data.distributed import DistributedSampler

    from engineflow.data import TensorLoader

    if isinstance(loader, TensorLoader):
        loader.shard(world.rank, world.size, pad=pad)
        return loader
    if not isinstance(loader, DataLoader):
        raise RecipeError(f"loader {name!r} is a {type(loader).__name__}; on several processes engineflow shards "
                          "DataLoaders and ef.data.TensorLoaders. Shard it yourself (each rank its share, run.rank "
                          "of run.world_size) and return a DataLoader with a DistributedSampler")
    sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else None
    if isinstance(loader.sampler, DistributedSampler) or isinstance(sampler, DistributedSampler):
        return loader
    if not isinstance(sampler, (RandomSampler, SequentialSampler)):
        raise RecipeError(f"loader {name!r} has a sampler of its own ({type(sampler or loader.sampler).__name__}); "
                          "engineflow shards loaders with shuffle=True or False. Give it a DistributedSampler")
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(sampler.data_source)):
        raise RecipeError(f"loader {name!r} samples with replacement or a set number of samples; engineflow "
                          "cannot shard it exactly. Give it a DistributedSampler")
    shuffle = isinstance(sampler, RandomSampler)
    generator = sampler.generator if shuffle else None
    dealer = Dealer(len(loader.dataset), loader.batch_size, world.size, world.rank, loader.drop_last, pad)
    batches = ShardBatches(dealer, shuffle=shuffle, generator=generator if generator is not None else loader.generator)
    options: dict[str, Any] = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                   pin_memory=loader.pin_memory, timeout=loader.timeout,
                                   worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                                   persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(loader.dataset, batch_sampler=batches, **options)


def order_layout(loader: Any) -> Layout | None:
    """How a train loader deals out its epoch's order, for a checkpoint; None for a loader
    engineflow cannot position by sample (a plain DataLoader on one process, a recipe's own
    DistributedSampler)."""
    dealt = _dealt(loader)
    return dealt.layout() if dealt is not None else None


def positioned(loader: Any, layout: Layout) -> Any:
    """``loader`` able to resume a pass laid out as ``layout``: on one process, a DataLoader that
    was sharded on several (``kind`` "shard") is sharded again, as the one share of one process,
    so that its epoch's order is the one the processes drew."""
    if layout.kind == "shard" and isinstance(loader, DataLoader) and _dealt(loader) is None:
        return shard_loader(loader, ONE_PROCESS, pad=True, name="train")
    return loader


def resume_order(loader: Any, position: int) -> None:
    """Make the next pass of ``loader`` continue the epoch in progress after ``position`` positions
    of its order; a loader :func:`order_layout` has no layout for re-runs its pass as it is."""
    dealt = _dealt(loader)
    if dealt is not None:
        dealt.start_at(position)


def _dealt(loader: Any) -> Dealt | None:
    """What deals out ``loader``'s batches by position: a ``TensorLoader`` itself, a sharded
    ``DataLoader``'s batch sampler; None for any other loader."""
    for candidate in (loader, getattr(loader, "batch_sampler", None)):
        if isinstance(candidate, Dealt):
            return candidate
    return None


def train_loader_names(recipe: Any) -> set[str]:
    """The loaders a recipe trains on: ``train``, and what each train stage names its train loader."""
    names = {"train"}
    for stage in getattr(recipe, "stages", ()):
        if stage.kind == "train" and stage.loaders:
            names.add(stage.loaders.get("train", "train"))
    return names


# state saved by another number of processes ------------------------------------------------------
_REDUCE = {"SUM": lambda a, b: a + b, "PRODUCT": lambda a, b: a * b,
           "MAX": lambda a, b: torch.maximum(a, b) if isinstance(a, torch.Tensor) else max(a, b),
           "MIN": lambda a, b: torch.minimum(a, b) if isinstance(a, torch.Tensor) else min(a, b)}


def regrouped_metric_state(metric: Any, saved: Mapping[str, Any] | None, rank: int,
                           world_size: int) -> tuple[dict[str, Any] | None, bool]:
    """An Ignite metric's ``state_dict`` saved by N processes (its list of per-rank states), for rank
    ``rank`` of ``world_size`` processes: ``(state to load or None, whether every saved rank counts)``.

    Rank ``r`` takes saved rank ``r``'s state; a rank with no namesake keeps its reset state. The
    states of saved ranks beyond ``world_size`` are added into rank 0's with the reductions its
    ``compute`` all-reduces them with (``sync_all_reduce``), so the metric still counts every batch
    of the epoch; a metric whose state cannot be added so (other attributes that differ between
    ranks, nested metrics) keeps the first ``world_size`` ranks' states only (False).
    """
    from engineflow.ignite_internals import PER_RANK_KEY, synced_attributes

    if saved is None:
        return None, True
    states = list(saved[PER_RANK_KEY])
    mine = dict(states[rank]) if rank < len(states) else None
    extra = states[world_size:]
    complete = True
    if rank == 0 and extra:
        ops = synced_attributes(metric) or {}
        for other in extra:
            if any(key not in ops and not _same(value, other[key]) for key, value in mine.items()) \
                    or any(key in ops and not isinstance(mine[key], (int, float, torch.Tensor)) for key in mine):
                complete = False
                break
        else:
            for other in extra:
                mine = {key: _REDUCE[ops[key]](value, other[key]) if key in ops else value
                        for key, value in mine.items()}
    if mine is None:
        return None, complete
    return {PER_RANK_KEY: [mine if r == rank else None for r in range(world_size)]}, complete


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b, strict=True)))
    return bool(a == b)


# collectives -----------------------------------------------------------------------------------
def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` summed over every rank, key by key (float64). Collective; every rank must hold
    the same keys."""
    import ignite.distributed as idist

    keys = sorted(values)
    if not keys:
        return {}
    total = idist.all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))


def max_over_ranks(flags: list[int]) -> list[int]:
    """Each flag's maximum over every rank. Collective."""
    import ignite.distributed as idist

    return [int(v) for v in idist.all_reduce(torch.tensor(flags, dtype=torch.int64), op="MAX").tolist()]


def broadcast_from_first(tensors: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors``, in place. Collective; every rank must pass
    tensors of the same shapes, in the same order."""
    import torch.distributed as dist

    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` as it is (any picklable value, a tensor of any length too), in rank
    order. Collective."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def share_json(value: Any, world: World) -> Any:
    """Rank 0's ``value`` (plain JSON data) on every rank; the others pass None. Collective."""
    import ignite.distributed as idist

    if not world.distributed:
        return value
    text = idist.broadcast(json.dumps(value) if world.rank == 0 else "", src=0)
    return json.loads(text)
