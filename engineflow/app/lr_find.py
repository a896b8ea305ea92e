"""``engineflow lr-find``: sweep a recipe's learning rate and print what the loss curve suggests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engineflow.app.report import plural
from engineflow.execute.lr_finder import LRSweep, check_sweep, lr_find
from engineflow.execute.lr_plot import need_matplotlib

# one line per rule: its name, then "suggest lr X", then how it reads the curve
RULE_LINES = {
    "valley": "fastai's default: half-way down the longest fall of the loss",
    "steep": "where the smoothed loss falls fastest against log(lr)",
    "min10": "a tenth of the lr at the lowest smoothed loss",
}
# no digits in the names: a "suggest" line holds one number, the learning rate
RULE_NAMES = {"valley": "valley", "steep": "steep", "min10": "minimum"}


def find_lr(recipe: str | Path, overrides: Mapping[str, Any], *, start: float, end: float, iterations: int,
            stage: str | None, device: str, seed: int | None, out: str | None) -> LRSweep:
    """Check the options, sweep, and write the plot to ``out`` when given."""
    check_sweep(start, end, iterations)
    if out is not None:
        need_matplotlib("lr-find --out")  # before the sweep, not after it
    sweep = lr_find(recipe, overrides, start=start, end=end, iterations=iterations, stage=stage, device=device,
                    seed=seed)
    if out is not None:
        sweep.plot(out)
    return sweep


def sweep_lines(sweep: LRSweep, recipe: str) -> list[str]:
    """What ``engineflow lr-find`` prints: the sweep, why it stopped, one line per suggestion."""
    span = f"lr {sweep.lrs[0]:.3g} to {sweep.lrs[-1]:.3g}" if sweep.lrs else "no step"
    steps = f"{plural(len(sweep.lrs), 'step')} of {sweep.steps}"
    lines = [f"swept {Path(recipe).name} (stage {sweep.stage}): {steps}, {span}; nothing recorded, the components "
             "and RNGs are as they were",
             f"stopped: {sweep.stopped}"]
    width = max(len(name) for name in RULE_NAMES.values()) + 1
    for rule, how in RULE_LINES.items():
        lr = sweep.suggestions.get(rule)
        name = f"{RULE_NAMES[rule]}:".ljust(width)
        lines.append(f"{name} suggest lr {lr:.3g}  ({how})" if lr is not None else
                     f"{name} no suggestion (too few steps before the loss diverged)")
    return lines
