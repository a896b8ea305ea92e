"""The full training state of a fit, and the data order that makes a resume exact.

Exactness rests on two rules:

1. **Each epoch starts from RNG states that depend only on ``(seed, epoch)``.** :class:`EpochData`
   reseeds Python's, NumPy's and torch's global RNGs, and every torch ``Generator`` a DataLoader
   holds (its own and its sampler's), just before it creates the epoch's iterator. A resumed run
   therefore draws the same shuffle order and the same worker seeds as the original.
2. **Mid-epoch, the rest comes from the checkpoint.** A resume creates the epoch's iterator as
   above, skips the batches already trained on (loaders with their own ``state_dict``, like
   :class:`~engineflow.data.TensorLoader`, position themselves instead), then restores the RNG
   states saved at the checkpoint, so dropout continues where it stopped.

Everything in the state is plain tensors and Python values: ``torch.save`` round-trips it
exactly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

_SEED_MOD = 2**63 - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch`` (1-based) in a run seeded with ``seed``: stable across processes."""
    digest = hashlib.sha256(f"engineflow:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MOD


def rng_state() -> dict[str, Any]:
    """The global RNG states: Python, NumPy (when installed), torch CPU and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        # Its key as a list of ints, not the uint32 array get_state returns: a checkpoint then holds
        # only values that torch.load(weights_only=True) builds without allowing any NumPy type.
        name, key, *rest = np.random.get_state()
        state["numpy"] = (name, key.tolist(), *rest)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (also the NumPy key as an array, as earlier versions saved it)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators that decide a DataLoader's order and worker seeds."""
    found = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def seed_epoch(seed: int, epoch: int, loader: Any) -> None:
    """Rule 1: every RNG the epoch will use starts from ``(seed, epoch)``."""
    value = epoch_seed(seed, epoch)
    random.seed(value)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(value % 2**32)
    _seed_torch(value)
    for index, generator in enumerate(loader_generators(loader)):
        generator.manual_seed((value + index + 1) % _SEED_MOD)


def _seed_torch(value: int) -> None:
    """``torch.manual_seed`` (CPU and every accelerator), without its cost on machines with none:
    there it queues a seeding call per device type, each with a captured stack, for nothing."""
    if torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available():
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)


class EpochData:
    """The train loader as the train engine sees it: reseeded per epoch, resumable mid-epoch.

    Args:
        loader: the recipe's train loader (any re-iterable with a length).
        seed: the run's seed.
        epoch: returns the epoch in progress (the engine's ``state.epoch``).
    """

    def __init__(self, loader: Iterable[Any], seed: int, epoch: Callable[[], int]) -> None:
        self.loader = loader
        self.seed = seed
        self.epoch = epoch
        self._skip = 0
        self._after_skip: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def positions_itself(self) -> bool:
        """True for loaders that save their own position (their ``state_dict`` is in checkpoints)."""
        return is_stateful(self.loader)

    def resume_at(self, batches_done: int, after_skip: Callable[[], None]) -> None:
        """Make the next pass skip ``batches_done`` batches, then call ``after_skip``."""
        self._skip = 0 if self.positions_itself else batches_done
        self._after_skip = after_skip

    def __iter__(self) -> Iterator[Any]:
        # Lazy: Ignite makes the next epoch's iterator early when an epoch ends by EndEpoch (inside
        # the old epoch), so seeding happens at the first batch, inside the epoch it serves.
        return _FirstBatchStarts(self._start)

    def _start(self) -> Iterator[Any]:
        seed_epoch(self.seed, self.epoch(), self.loader)
        iterator = iter(self.loader)
        for _ in range(self._skip):
            next(iterator)
        self._skip = 0
        if self._after_skip is not None:
            after, self._after_skip = self._after_skip, None
            after()
        return iterator


class _FirstBatchStarts:
    """An iterator that makes the real one when the first batch is asked for."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self._start: Callable[[], Iterator[Any]] | None = start
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _FirstBatchStarts:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            assert self._start is not None  # set until the first call
            self._iterator, self._start = self._start(), None
        return next(self._iterator)


def find_components(components: Mapping[str, Any], keep: Callable[[Any], bool]) -> dict[str, Any]:
    """The components ``keep`` accepts, by name; a dict of components (a GAN's models, the loaders)
    gives ``name.key`` entries."""
    found: dict[str, Any] = {}
    for name, value in components.items():
        if keep(value):
            found[name] = value
        elif isinstance(value, Mapping):
            found.update({f"{name}.{k}": v for k, v in value.items() if keep(v)})
    return found


def stateful_components(components: Mapping[str, Any]) -> dict[str, Any]:
    """Every component with ``state_dict``/``load_state_dict``, by name (``loaders.train``...).

    That is how a recipe registers its own stateful objects: return them from ``setup``.
    """
    return find_components(components, is_stateful)


def is_stateful(value: Any) -> bool:
    """Whether ``value`` can be checkpointed: it has ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))
