"""The toolbox's options, each against the same option written by hand in a raw loop, paired in one process.

A case is one option. Its process builds one small CNN, optimizer and loader (:func:`shared`) and
trains them with four loops, an epoch each in turn, rotated every block (see
:func:`benchmarks.loops.alternate`):

* ``raw``: the loop a user writes (:func:`benchmarks.loops.sgd_step`), the reference;
* ``raw_<option>``: the same loop with the option written by hand (:data:`BY_HAND`);
* ``engineflow``: ``ef.build`` of ``benchmarks/recipes/cnn.py`` (a step calling ``backprop``), ``fit.run``;
* ``engineflow_<option>``: the same with the option: a step option set through the config, or the
  recipe with one toolbox declaration more (``cnn_ema.py``, ``cnn_activations.py``).

Besides the ratios to ``raw``, each case reports the option's own cost in each loop
(``raw_<option>_ratio``: by hand, with against without; ``engineflow_<option>_over_engineflow_ratio``)
and engineflow against the hand-written loop with the same option
(``engineflow_<option>_over_raw_<option>_ratio``), so that what the option costs is told apart
from what the engine costs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.loops import Result, alternate, sgd_step
from benchmarks.timing import Clock

RECIPES = Path(__file__).resolve().parent / "recipes"
# The options as the hand-written loops and the recipes both use them.
ACCUMULATE = 4
CLIP_NORM = 1.0
DECAY = 0.999
# engineflow's activation statistics at their defaults: every leaf, read back every 50 iterations.
EVERY, BINS, LOW, HIGH, NEAR_ZERO = 50, 50, -5.0, 5.0, 1e-3
# option -> (the recipe, its config overrides)
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "bf16": ("cnn.py", {"precision": "bf16"}),
    "accumulate": ("cnn.py", {"accumulate": ACCUMULATE}),
    "clip": ("cnn.py", {"clip_norm": CLIP_NORM}),
    "ema": ("cnn_ema.py", {}),
    "activations": ("cnn_activations.py", {}),
}


def make_cnn() -> nn.Sequential:
    """conv 16, pool, conv 32, pool, linear 64, linear 10, on 1x28x28 inputs; ten leaf layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@functools.cache
def shared(samples: int, batch_size: int, lr: float) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """This process's model, optimizer and loader (random images and labels), the same for every loop
    of a case: the raw loops train them, and the recipes' ``setup`` returns them."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(samples, 1, 28, 28), torch.randint(0, 10, (samples,))
    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    return model, optimizer, loader


def measure(option: str, *, samples: int, batch_size: int, lr: float, blocks: int) -> Result:
    """What :mod:`benchmarks.worker` calls: the four loops of ``option``, ``blocks`` epochs each."""
    if option not in OPTIONS:
        raise ValueError(f"unknown option {option!r}; one of {', '.join(OPTIONS)}")
    model, optimizer, train = shared(samples, batch_size, lr)
    recipe, overrides = OPTIONS[option]
    sizes = {"samples": samples, "batch_size": batch_size, "lr": lr}
    plain_fit, _ = _built("cnn.py", sizes)
    option_fit, tools = _built(recipe, {**sizes, **overrides})
    hand = BY_HAND[option](model, optimizer, train)
    epochs = {
        "raw": _timed(lambda: _raw_epoch(model, optimizer, train)),
        f"raw_{option}": _timed(hand),
        "engineflow": _timed(_fit_epoch(plain_fit)),
        f"engineflow_{option}": _timed(_fit_epoch(option_fit)),
    }
    variants = list(epochs)
    pairs = [(f"engineflow_{option}", "engineflow"), (f"engineflow_{option}", f"raw_{option}")]
    result = alternate(epochs, variants, blocks, pairs)
    if option == "activations":
        # what each recorded at its last read-back: one entry per leaf layer
        result["raw_activations_layers"] = len(hand.latest)  # type: ignore[attr-defined]
        result["engineflow_activations_layers"] = len(tools[0].latest)
        result["leaf_layers"] = sum(1 for m in model.modules() if next(m.children(), None) is None)
    return result


def _built(recipe: str, overrides: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    """``ef.build`` of a recipe; the fit and the recipe's toolbox declarations."""
    import engineflow as ef

    loaded = ef.load_recipe(RECIPES / recipe)
    fit, _, _ = ef.build(loaded, overrides)
    return fit, loaded.tools


def _fit_epoch(fit: Any) -> Callable[[], int]:
    def epoch() -> int:
        fit.run(epochs=1)  # a finished run starts again from epoch 0: one epoch each call
        return fit.train.state.iteration

    return epoch


def _timed(epoch: Callable[[], int]) -> Callable[[], Result]:
    def run() -> Result:
        clock = Clock()
        return clock.stop(epoch())

    return run


def _raw_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any]) -> int:
    iterations = 0
    for x, y in train:
        sgd_step(model, optimizer, x, y)
        iterations += 1
    return iterations


# The options as a user writes them in the raw loop: each returns the function that trains one epoch.

def _bf16_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any]) -> Callable[[], int]:
    def epoch() -> int:
        iterations = 0
        for x, y in train:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # forward and loss; backward outside, as torch advises
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iterations += 1
        return iterations

    return epoch


def _accumulate_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer,
                        train: Iterable[Any]) -> Callable[[], int]:
    def epoch() -> int:
        last = len(train)  # type: ignore[arg-type]
        optimizer.zero_grad()
        iterations = 0
        for x, y in train:
            iterations += 1
            loss = F.cross_entropy(model(x), y) / ACCUMULATE
            loss.backward()
            if iterations % ACCUMULATE == 0 or iterations == last:
                optimizer.step()
                optimizer.zero_grad()
        return iterations

    return epoch


def _clip_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any]) -> Callable[[], int]:
    def epoch() -> int:
        iterations = 0
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            iterations += 1
        return iterations

    return epoch


def _ema_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any]) -> Callable[[], int]:
    weights = [t for t in model.state_dict().values() if t.is_floating_point()]
    average = [t.detach().clone() for t in weights]

    def epoch() -> int:
        iterations = 0
        for x, y in train:
            sgd_step(model, optimizer, x, y)
            with torch.no_grad():
                for a, w in zip(average, weights, strict=True):
                    a.lerp_(w, 1 - DECAY)
            iterations += 1
        return iterations

    return epoch


class StatsByHand:
    """Forward hooks on every leaf layer for every ``EVERY``-th iteration's step, computing what
    engineflow's activation statistics compute (mean, std, near-zero share, a clamped 50-bin histogram),
    read back at once."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any]) -> None:
        self.model, self.optimizer, self.train = model, optimizer, train
        self.leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
        self.latest: dict[str, list[float]] = {}

    def __call__(self) -> int:
        iterations = 0
        for x, y in self.train:
            iterations += 1
            if iterations % EVERY:
                sgd_step(self.model, self.optimizer, x, y)
                continue
            stats: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_hook(functools.partial(self.record, stats, name)) for name, m in self.leaves]
            sgd_step(self.model, self.optimizer, x, y)
            for handle in handles:
                handle.remove()
            self.latest = dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))
        return iterations

    @staticmethod
    def record(stats: dict[str, torch.Tensor], name: str, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        a = output.detach().float().reshape(-1)
        head = torch.stack((a.mean(), a.std(correction=0), (a.abs() < NEAR_ZERO).float().mean()))
        stats[name] = torch.cat((head, torch.histc(a.clamp(LOW, HIGH), BINS, LOW, HIGH)))


BY_HAND: dict[str, Callable[[nn.Module, torch.optim.Optimizer, Iterable[Any]], Callable[[], int]]] = {
    "bf16": _bf16_by_hand,
    "accumulate": _accumulate_by_hand,
    "clip": _clip_by_hand,
    "ema": _ema_by_hand,
    "activations": StatsByHand,
}
