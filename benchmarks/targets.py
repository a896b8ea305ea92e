"""Issue 5's targets (and issue 20's activation statistics), checked against one run's summaries.

A target whose configurations did not run (a family left out, Lightning not installed) is
reported as not checked rather than met or missed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Summaries = Mapping[str, Mapping[str, Any]]


def _median(summaries: Summaries, family: str, case: str) -> float | None:
    entry = summaries.get(family, {}).get("cases", {}).get(case)
    return None if entry is None else entry["median"]


def _ratio(family: str, case: str, base: str) -> Callable[[Summaries], float | None]:
    def value(summaries: Summaries) -> float | None:
        a, b = _median(summaries, family, case), _median(summaries, family, base)
        return None if a is None or b is None else a / b

    return value


def _difference(family: str, case: str, base: str) -> Callable[[Summaries], float | None]:
    def value(summaries: Summaries) -> float | None:
        a, b = _median(summaries, family, case), _median(summaries, family, base)
        return None if a is None or b is None else a - b

    return value


def _detail(family: str, case: str, key: str) -> Callable[[Summaries], float | None]:
    def value(summaries: Summaries) -> float | None:
        entry = summaries.get(family, {}).get("cases", {}).get(case)
        return None if entry is None else entry.get("details_median", {}).get(key)

    return value


def _paired_ratio(case: str, loop: str, base: str) -> Callable[[Summaries], float | None]:
    """Two loops of one ``paired`` case, each a ratio to the case's reference loop: their quotient."""
    def value(summaries: Summaries) -> float | None:
        a = _detail("paired", case, f"{loop}_ratio")(summaries)
        b = _detail("paired", case, f"{base}_ratio")(summaries)
        return None if a is None or b is None else a / b

    return value


def _share(extra: Callable[[Summaries], float | None],
           of: Callable[[Summaries], float | None]) -> Callable[[Summaries], float | None]:
    """``1 + extra / of``: a cost measured on its own, as a ratio to the loop it is added to."""
    def value(summaries: Summaries) -> float | None:
        a, b = extra(summaries), of(summaries)
        return None if a is None or b is None else 1 + a / b

    return value


def _plain(family: str, case: str) -> Callable[[Summaries], float | None]:
    return lambda summaries: _median(summaries, family, case)


# (what, how it is computed, limit): met when value <= limit
TARGETS: list[tuple[str, Callable[[Summaries], float | None], float]] = [
    ("overhead: engineflow no handlers / raw <= 1.10", _ratio("overhead", "engineflow", "raw"), 1.10),
    ("overhead: engineflow default handlers / raw <= 1.25", _ratio("overhead", "engineflow_recipe", "raw"), 1.25),
    ("overhead: engineflow no handlers / Lightning < 1", _ratio("overhead", "engineflow", "lightning"), 0.999),
    ("overhead: engineflow default handlers / Lightning < 1",
     _ratio("overhead", "engineflow_recipe", "lightning"), 0.999),
    ("overhead: engineflow no handlers + TensorLoader / raw DataLoader <= 0.7",
     _ratio("overhead", "engineflow_tensor", "raw"), 0.7),
    ("overhead: engineflow default handlers + TensorLoader / raw DataLoader <= 0.7",
     _ratio("overhead", "engineflow_recipe_tensor", "raw"), 0.7),
    ("compute: engineflow no handlers / raw <= 1.02", _ratio("compute", "engineflow", "raw"), 1.02),
    ("compute: engineflow default handlers / raw <= 1.02", _ratio("compute", "engineflow_recipe", "raw"), 1.02),
    ("paired in one process: engineflow no handlers / raw <= 1.10",
     _detail("paired", "engine", "engineflow_ratio"), 1.10),
    ("paired in one process: compute-bound, engineflow no handlers / raw <= 1.02",
     _detail("paired", "compute", "engineflow_ratio"), 1.02),
    ("paired in one process: compute-bound (2-s epochs), engineflow default handlers / raw <= 1.02",
     _detail("paired", "recorded", "engineflow_recipe_ratio"), 1.02),
    ("paired in one process: compute-bound (2-s epochs), engineflow default handlers / raw loop validating "
     "and checkpointing by hand <= 1.02", _paired_ratio("recorded", "engineflow_recipe", "raw_recorded"), 1.02),
    # The handlers' microseconds measured around a step that does nothing, over the cheapest training
    # loop's microseconds per iteration; the same ratio inside that training moves by a few percent.
    ("paired in one process: 20 handlers not due / 0 handlers < 1.05 (their dispatch cost over the "
     "TensorLoader training loop)", _share(_detail("paired", "dispatch", "engineflow+20_extra_us"),
                                           _detail("paired", "handlers", "engineflow_us")), 1.0499),
    ("paired in one process: 20 handlers not due / 0 handlers < 1.05 (inside that training, ±3% per round)",
     _detail("paired", "handlers", "engineflow+20_ratio"), 1.0499),
    # Two processes (gloo), each rank alternating the loops by epoch: rank 0's CPU time per iteration.
    ("ddp, 2 processes (gloo), compute-bound: engineflow fit / hand-written DDP loop <= 1.05 (paired)",
     _detail("ddp", "mlp", "engineflow_ratio"), 1.05),
    # Issue 20: activation statistics at their defaults (every leaf, read back every 50 iterations), as a
    # share of a small CNN's step: engineflow's fit with them against the same fit without, paired.
    ("toolbox: activation statistics (defaults) / the same fit without <= 1.03 (small CNN, paired)",
     _detail("toolbox", "activations", "engineflow_activations_over_engineflow_ratio"), 1.03),
    ("startup: engineflow --help < 0.5 s", _plain("startup", "help"), 0.4999),
    ("startup: engineflow runs list < 0.5 s", _plain("startup", "runs_list"), 0.4999),
    ("startup: import engineflow - import ignite.engine <= 0.1 s",
     _difference("startup", "import_engineflow", "import_ignite"), 0.1),
    ("end-to-end: digits with TensorLoader / raw script < 1",
     _ratio("end_to_end", "engineflow_tensor", "raw"), 0.999),
]


def check(summaries: Summaries) -> list[dict[str, Any]]:
    """``[{"target", "value", "limit", "met"}]``; ``met`` is None when the target could not be checked."""
    results = []
    for name, compute, limit in TARGETS:
        value = compute(summaries)
        met = None if value is None else value <= limit
        results.append({"target": name, "value": value, "limit": limit, "met": met})
    return results


def format_targets(results: list[dict[str, Any]]) -> str:
    """One line per target: met / MISSED / not checked, with the measured value."""
    lines = ["### targets (issues 5 and 20)", ""]
    for result in results:
        status = {True: "met", False: "MISSED", None: "not checked"}[result["met"]]
        value = "-" if result["value"] is None else f"{result['value']:.3f}"
        lines.append(f"- {status:<11} {result['target']}: {value}")
    return "\n".join(lines)
