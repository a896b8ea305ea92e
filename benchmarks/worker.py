"""Run one configuration in this (fresh) process and print its timing as one JSON line.

    python -m benchmarks.worker MODULE CASE PARAMS_JSON

``benchmarks.<MODULE>.measure(CASE, **PARAMS)`` trains and returns ``{"seconds", "iterations"}``.
Only this module and the measured one are imported before the case asks for more, so a raw loop
never pays for importing Ignite.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> None:
    module_name, case, params = argv
    import torch

    # The method: one intra-op thread, whatever OMP_NUM_THREADS says.
    torch.set_num_threads(1)
    module = importlib.import_module(f"benchmarks.{module_name}")
    result = module.measure(case, **json.loads(params))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
