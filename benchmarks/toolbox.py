"""Toolbox: each of issue 20's options against the same option written by hand in a raw loop, paired.

One process per option (``bf16``, ``accumulate``, ``clip``, ``ema``, ``activations``), each running four
loops in turn on one small CNN (see :mod:`benchmarks.toolbox_loops`): the raw loop, the raw loop with
the option by hand, engineflow's fit, and engineflow's fit with the option. On CPU, one thread.
"""

from __future__ import annotations

from benchmarks.harness import Case, Family, worker_argv
from benchmarks.paired import balanced

# 100 steps of batch 32 (about 1 s on one core): two read-backs of the activation statistics a
# block, and whole groups of 4 for the accumulation.
SAMPLES, BATCH_SIZE = 3200, 32
# --quick: 50 steps of batch 8 (one read-back a block), a few seconds a case
QUICK_SAMPLES, QUICK_BATCH_SIZE = 400, 8
LR = 0.01
BLOCKS = 8  # epochs of each loop per process (two rotations of the four loops)
LOOPS = 4
LABELS = {
    "bf16": "bf16 autocast",
    "accumulate": "gradient accumulation over 4 batches",
    "clip": "clip_grad_norm_ to 1.0",
    "ema": "EMA of the weights, decay 0.999",
    "activations": "activation statistics, every leaf, every 50 iterations",
}


def family(quick: bool = False) -> Family:
    samples, batch_size = (QUICK_SAMPLES, QUICK_BATCH_SIZE) if quick else (SAMPLES, BATCH_SIZE)
    blocks = balanced(LOOPS if quick else BLOCKS, ["raw", "raw_option", "engineflow", "engineflow_option"])
    params = {"samples": samples, "batch_size": batch_size, "lr": LR, "blocks": blocks}
    cases = [Case(option, f"{option}: raw loop (DataLoader), the reference",
                  worker_argv("toolbox_loops", option, **params)) for option in LABELS]
    return Family(
        name="toolbox",
        title=f"toolbox options on a small CNN (conv 16, pool, conv 32, pool, linear 64, linear 10; 1x28x28, batch "
              f"{batch_size}), four loops alternating by epoch inside one process, {blocks} epochs each of "
              f"{samples // batch_size} iterations",
        unit="us/iteration",
        baseline=None,
        cases=cases,
        setup={"samples": samples, "batch_size": batch_size, "lr": LR, "blocks": blocks, "options": LABELS},
        notes=["median etc.: the raw loop of each process. Below, medians over rounds of medians over blocks: "
               "raw_<o>_ratio = the option by hand / the raw loop; engineflow_ratio = engineflow's fit without "
               "the option / the raw loop; engineflow_<o>_over_engineflow_ratio = the option's cost in "
               "engineflow; engineflow_<o>_over_raw_<o>_ratio = engineflow / the raw loop, both with the option."],
    )
