"""The main metric and the best epoch it picks."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse", "perplexity", "distance")
# short names that would match inside other words ("fid" in "confidence"): whole words of the name only
_LOWER_IS_BETTER_WORDS = ("mmd", "fid", "nll", "kl", "l1", "l2", "wer", "cer", "mape", "bce", "huber")


def infer_mode(metric: str) -> str:
    """"min" for names that read as losses, errors or distances, else "max".

    Example:
        >>> [infer_mode(m) for m in ("valid/loss", "valid/mse", "valid/mmd", "valid/kl_div", "valid/confidence")]
        ['min', 'min', 'min', 'min', 'max']
    """
    leaf = metric.rsplit("/", 1)[-1].lower()
    words = re.split(r"[^a-z0-9]+", leaf)
    return "min" if any(w in leaf for w in _LOWER_IS_BETTER) or any(w in words for w in _LOWER_IS_BETTER_WORDS) \
        else "max"


@dataclass
class Best:
    """Tracks the best value of the main metric over epochs; checkpointable.

    Example:
        >>> best = Best("valid/accuracy", "max")
        >>> best.update(1, 0.8), best.update(2, 0.7), best.update(3, 0.9)
        (True, False, True)
        >>> best.epoch, best.value
        (3, 0.9)
    """

    metric: str
    mode: str = "max"
    epoch: int | None = None
    value: float | None = None

    def is_better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        return better(value, self.value, self.mode)

    def update(self, epoch: int, value: float) -> bool:
        """Record ``value`` for ``epoch``; True when it is a new best."""
        if not self.is_better(value):
            return False
        self.epoch, self.value = epoch, float(value)
        return True

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "epoch": self.epoch, "value": self.value}

    def state_dict(self) -> dict[str, Any]:
        return self.as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metric, self.mode = state["metric"], state["mode"]
        self.epoch, self.value = state["epoch"], state["value"]


def better(value: float, than: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``than`` (None: nothing yet) in ``mode``; NaN beats nothing.

    Example:
        >>> better(0.9, 0.8, "max"), better(0.9, 0.8, "min"), better(float("nan"), None, "max")
        (True, False, False)
    """
    if math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value > than if mode == "max" else value < than


def ranked(scores: Mapping[K, float], mode: str) -> list[K]:
    """The keys of ``scores``, best first as :class:`Best` ranks them (NaN last).

    Example:
        >>> ranked({"a": 0.5, "b": float("nan"), "c": 0.9}, "max"), ranked({"a": 0.5, "c": 0.9}, "min")
        (['c', 'a', 'b'], ['a', 'c'])
    """
    sign = 1.0 if mode == "max" else -1.0
    return sorted(scores, key=lambda key: (math.isnan(scores[key]), -sign * scores[key] if not math.isnan(scores[key])
                                           else 0.0))
