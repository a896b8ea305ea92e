"""Random number generators: their states, and the seeds each epoch starts from.

Together with :mod:`engineflow.state.position` this is what makes a resume exact.

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
import os
import random
from collections.abc import Mapping
from typing import Any

import torch

_SEED_MOD = 2**63 - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch`` (1-based) in a run seeded with ``seed``: stable across processes."""
    digest = hashlib.sha256(f"engineflow:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MOD


def rank_seed(value: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNGs in an epoch seeded with ``value``."""
    digest = hashlib.sha256(f"engineflow:{value}:rank:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MOD


def stage_seed(seed: int, index: int) -> int:
    """The seed of stage ``index`` (from 0) of a pipeline seeded with ``seed``: its ``prepare`` and
    its epochs' seeds start from it, so no two stages draw the same numbers.

    Example:
        >>> stage_seed(0, 1) == stage_seed(0, 1) != stage_seed(0, 2)
        True
    """
    digest = hashlib.sha256(f"engineflow:{seed}:stage:{index}".encode()).digest()
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
    """Restore what :func:`rng_state` captured (NumPy takes its key as a list or as an array)."""
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


def seed_epoch(seed: int, epoch: int, loader: Any, rank: int = 0) -> None:
    """Rule 1: every RNG the epoch will use starts from ``(seed, epoch)``.

    On several processes the loader's generators (the epoch's order) start from it on every rank;
    the global RNGs (dropout, augmentation) of rank ``r > 0`` from ``(seed, epoch, r)``, so ranks
    do not draw the same masks for different samples. Rank 0 draws what one process draws.
    """
    value = epoch_seed(seed, epoch)
    seed_rngs(value if rank == 0 else rank_seed(value, rank))
    for index, generator in enumerate(loader_generators(loader)):
        generator.manual_seed((value + index + 1) % _SEED_MOD)


def seed_rngs(value: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global RNGs from ``value`` (any size);
    unlike :func:`seed_everything`, nothing outside the RNGs (no environment variable)."""
    random.seed(value)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(value % 2**32)
    _seed_torch(value)


def _seed_torch(value: int) -> None:
    """``torch.manual_seed`` (CPU and every accelerator), without its cost on machines with none:
    there it queues a seeding call per device type, each with a captured stack, for nothing."""
    if torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available():
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's RNGs (CPU and every CUDA device)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed % 2**32)  # the range Python accepts
    try:
        import numpy as np
    except ImportError:  # numpy is optional for engineflow itself
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
