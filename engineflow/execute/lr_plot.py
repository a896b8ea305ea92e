"""An LR sweep's loss against the learning rate (log axis), each suggestion marked and labelled.

Drawn on a matplotlib ``Figure`` of its own, without pyplot: no backend is chosen and no global
state of matplotlib changes (a notebook's plots are left alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from engineflow.errors import RecipeError

MARKERS = {"valley": "o", "steep": "v", "min10": "s"}
TAIL = 5  # points at the end left out of the y range (fastai's plot drops them)
LABELS = {"valley": "valley", "steep": "steep", "min10": "minimum/10"}


def need_matplotlib(what: str) -> None:
    """A RecipeError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RecipeError(f"{what} needs matplotlib: pip install 'engineflow[plot]'") from None


def plot_sweep(lrs: Sequence[float], losses: Sequence[float], raw_losses: Sequence[float],
               suggestions: Mapping[str, float | None], out: str | Path, *, title: str = "LR sweep") -> Path:
    """Write the plot of a sweep to ``out`` (its suffix picks the format: .png, .svg, .pdf); returns the path."""
    need_matplotlib("plotting an LR sweep")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.plot(lrs, raw_losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, losses, color="C0", label="smoothed loss")
    logs = [math.log10(lr) for lr in lrs]
    for index, (name, lr) in enumerate(suggestions.items(), start=1):
        if lr is None or not lrs:
            continue
        at = _interpolate(math.log10(lr), logs, losses)
        ax.axvline(lr, color=f"C{index}", linestyle=":", linewidth=1)
        ax.plot([lr], [at], marker=MARKERS.get(name, "o"), color=f"C{index}", linestyle="none",
                label=f"{LABELS.get(name, name)}: {lr:.3g}")
    if losses:
        # the last few points, where the loss diverges, would squash the rest of the curve
        shown = losses[:max(len(losses) - TAIL, 1)]
        low, high = min(losses), max(shown)
        pad = 0.1 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path)
    return path


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """``ys`` at ``x`` along the polyline through ``(xs, ys)``, held flat beyond its ends."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]
