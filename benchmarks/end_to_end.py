"""End-to-end: ``engineflow run recipes/digits.py`` against the same training as a raw script.

Wall time and peak RSS of the whole process: interpreter start, imports, data, 20 epochs with
validation, output. The raw script (``benchmarks/digits_raw.py``) reaches the same numbers as
the recipe. The recipe also runs with engineflow's ``TensorLoader``
(``benchmarks/recipes/digits_tensor.py`` is the recipe with only its loaders swapped); the raw
script takes ``--loader tensor`` too, for a comparison by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.harness import REPO, SCRATCH, Case, Family


def engineflow_command() -> tuple[str, ...]:
    """The installed ``engineflow`` console script beside this interpreter, else ``python -m engineflow``."""
    script = Path(sys.executable).with_name("engineflow")
    return (str(script),) if script.exists() else (sys.executable, "-m", "engineflow")


def family(quick: bool = False) -> Family:
    epochs = 1 if quick else 20
    run = (*engineflow_command(), "run")
    # A new runs folder each time: engineflow declines to repeat a completed run of the same code and config.
    options = ("--runs-dir", SCRATCH, "--device", "cpu", "--no-progress", "--set", f"epochs={epochs}")
    raw = (sys.executable, str(REPO / "benchmarks" / "digits_raw.py"), "--epochs", str(epochs))
    cases = [
        Case("raw", "raw script (DataLoader)", raw, inner=False),
        Case("engineflow", "engineflow run recipes/digits.py", (*run, "recipes/digits.py", *options), inner=False),
        Case("engineflow_tensor", "engineflow run digits + TensorLoader",
             (*run, "benchmarks/recipes/digits_tensor.py", *options), inner=False),
    ]
    return Family(
        name="end_to_end",
        title=f"digits, {epochs} epochs, whole process (wall time, peak RSS)",
        unit="s",
        baseline="raw",
        cases=cases,
        clock="wall",  # what the user waits for
        setup={"epochs": epochs, "commands": {c.name: " ".join(c.argv[1:]) for c in cases}},
        notes=["engineflow run also records the run (its folder of outputs and the runs index); the raw script "
               "prints its epoch lines only. Both train identically (same seed, split, batches and final metrics).",
               "The engineflow command ends without CPython's teardown of every module (engineflow/app/fast_exit.py), "
               "which a plain script pays: about 1 s once torch, torch._dynamo (any optimizer loads it) and "
               "scikit-learn are imported."],
    )
