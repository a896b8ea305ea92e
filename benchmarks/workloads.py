"""What every training configuration trains: the same data, model, optimizer and step.

Each measured loop (raw, Ignite, engineflow, Lightning) builds its pieces here, after
``torch.manual_seed(0)``, so they all start from the same weights and see the same batches.
torch is imported inside the builders: the runner imports this module for the sizes alone, and
it must stay small (a child process's peak RSS counts the runner's memory it was forked from).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

LOADERS = ("dataloader", "tensor", "prefetch")
# "prefetch": worker processes load the next batches into pinned memory while the device trains.
PREFETCH_WORKERS, PREFETCH_FACTOR = 2, 4


@dataclass(frozen=True)
class Workload:
    """A classification task on random in-memory data.

    Attributes:
        name: "tiny" (overhead-bound) or "mlp" (compute-bound).
        features: inputs per sample.
        hidden: widths of the hidden layers (none: a single ``Linear``).
        classes: outputs per sample.
        samples: training samples; the validation set has ``samples // 64``.
        batch_size: samples per training step.
        epochs: passes over the training set.
        lr: SGD's learning rate.
    """

    name: str
    features: int
    hidden: tuple[int, ...]
    classes: int
    samples: int
    batch_size: int
    epochs: int
    lr: float = 0.01

    @property
    def valid_samples(self) -> int:
        # Small on purpose: the default-handlers configuration validates every epoch, which the
        # raw loop does not; 1/64 of the data, forward only, is ~0.5% of the training compute.
        return max(self.samples // 64, 1)

    @property
    def iterations(self) -> int:
        """Training steps in the whole run (the last batch of an epoch may be smaller)."""
        return self.epochs * -(-self.samples // self.batch_size)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (what a worker process receives as JSON)."""
        return asdict(self)

    def scaled(self, samples: int, epochs: int) -> Workload:
        """The same model and batch size on less data (``--quick``)."""
        return replace(self, samples=min(samples, self.samples), epochs=min(epochs, self.epochs))


# The configurations: a model so small that the loop's own cost dominates, and an MLP whose
# matrix products dominate (~30 ms a step on one core, so 8k samples and 2 epochs keep a round short).
TINY = Workload("tiny", features=32, hidden=(), classes=10, samples=65536, batch_size=64, epochs=3)
MLP = Workload("mlp", features=784, hidden=(1024, 1024), classes=10, samples=8192, batch_size=256, epochs=2)


def make_data(workload: Workload, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x, y, x_valid, y_valid)``: Gaussian inputs, labels from a fixed random linear rule."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n, n_valid = workload.samples, workload.valid_samples
    x = torch.randn(n + n_valid, workload.features, generator=gen)
    rule = torch.randn(workload.features, workload.classes, generator=gen)
    y = (x @ rule).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def make_model(workload: Workload) -> nn.Module:
    """``Linear`` layers with ReLU between them; initialised from torch's global RNG."""
    from torch import nn

    widths = [workload.features, *workload.hidden, workload.classes]
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width_in, width_out))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def make_optimizer(model: nn.Module, workload: Workload) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(model.parameters(), lr=workload.lr)


def make_loader(
    x: torch.Tensor, y: torch.Tensor, *, kind: str, batch_size: int, shuffle: bool, seed: int = 0,
    pin_memory: bool = False,
) -> Iterable[Any]:
    """A ``DataLoader(TensorDataset)`` (``kind="dataloader"``), the same prefetching in worker processes
    into pinned memory (``kind="prefetch"``), or engineflow's ``TensorLoader``."""
    if kind == "prefetch":
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, num_workers=PREFETCH_WORKERS,
                          prefetch_factor=PREFETCH_FACTOR, persistent_workers=True, pin_memory=True,
                          generator=torch.Generator().manual_seed(seed))
    if kind == "dataloader":
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, num_workers=0,
                          generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory)
    if kind == "tensor":
        from engineflow.data import TensorLoader

        return TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)
    raise ValueError(f"unknown loader {kind!r}; one of {', '.join(LOADERS)}")

