"""Start-up of a data-parallel run: ``engineflow run --nproc 4`` against ``torchrun``, one small run each.

Every case is a whole command in a fresh process, every round: four processes start, the recipe
trains one epoch of 2048 samples on gloo, the run is recorded, and all end. ``torchrun`` (the
reference) starts four fresh interpreters; engineflow's launcher, on Linux and the CPU, forks them
from one process that imported torch, Ignite and engineflow once (``engineflow.app.workers``); with
``ENGINEFLOW_FORK_WORKERS=0`` it spawns four fresh interpreters as torchrun does. One process
(``--nproc 1``) is the floor. Not run with ``--quick``: each case costs several processes' imports.
"""

from __future__ import annotations

import sys

from benchmarks.end_to_end import engineflow_command
from benchmarks.harness import REPO, SCRATCH, Case, Family

WORLD = 4
RECIPE = REPO / "benchmarks" / "recipes" / "train.py"
# a small run: start-up is what is measured
OPTIONS = ("--runs-dir", SCRATCH, "--device", "cpu", "--no-progress", "--set", "epochs=1", "--set", "samples=2048")


def family(quick: bool = False) -> Family:
    run = (*engineflow_command(), "run", str(RECIPE), *OPTIONS)
    cases = [
        Case("torchrun", f"torchrun, {WORLD} processes", (
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
            "-m", "engineflow", "run", str(RECIPE), *OPTIONS), inner=False),
        Case("forked", f"engineflow --nproc {WORLD} (forked)", (*run, "--nproc", str(WORLD), "--oversubscribe"),
             inner=False),
        Case("spawned", f"engineflow --nproc {WORLD}, ENGINEFLOW_FORK_WORKERS=0", (
            "env", "ENGINEFLOW_FORK_WORKERS=0", *run, "--nproc", str(WORLD), "--oversubscribe"), inner=False),
        Case("one", "engineflow, one process", run, inner=False),
    ]
    skipped: dict[str, str] = {}
    if quick:
        skipped = {case.name: "not run with --quick: each case is several processes' imports" for case in cases}
        cases = []
    elif not sys.platform.startswith("linux"):
        skipped["forked"] = "workers are forked on Linux only"
        cases = [case for case in cases if case.name != "forked"]
    return Family(
        name="launch",
        title=f"a small data-parallel run on {WORLD} processes, start to end (whole command, wall)",
        unit="s",
        baseline="torchrun",
        cases=cases,
        clock="wall",  # what the user waits for
        setup={"world": WORLD, "recipe": str(RECIPE.relative_to(REPO)), "options": list(OPTIONS)},
        skipped=skipped,
        notes=["CPU time counts every process of the command (the forking process and the workers it reaps)."],
    )
