"""``python -m benchmarks``: run the benchmark families, print their tables, write the results as JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import environment
from benchmarks.harness import Family, format_table, run_rounds, summarise
from benchmarks.targets import check, format_targets

# family name -> module; the order is the order within each round
FAMILIES = {
    "overhead": "benchmarks.overhead",
    "compute": "benchmarks.compute",
    "paired": "benchmarks.paired",
    "ddp": "benchmarks.ddp",
    "ddp3": "benchmarks.ddp3",
    "end_to_end": "benchmarks.end_to_end",
    "startup": "benchmarks.startup",
    "launch": "benchmarks.launch",
    "checkpoint": "benchmarks.checkpoint",
    "gpu": "benchmarks.gpu",
    "toolbox": "benchmarks.toolbox",
}
UNAVAILABLE = {
    "full_state_checkpoint": "engineflow saves model weights only (no optimizer, engine position or loader order), "
                             "so the checkpoint family measures the weights file; a full-state save/load for resuming "
                             "is measured once it exists",
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: checks that everything runs")
    parser.add_argument("--only", default=None, metavar="F1,F2",
                        help=f"families to run (default all): {', '.join(FAMILIES)}")
    parser.add_argument("--cases", default=None, metavar="C1,C2",
                        help="keep only these configurations of the chosen families (e.g. raw,engineflow)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="where the JSON goes")
    parser.add_argument("--quiet", action="store_true", help="no per-process progress lines on stderr")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    names = list(FAMILIES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                     f"choose from {', '.join(FAMILIES)}")
    args.families = names
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns 1 when a configuration failed, else 0."""
    args = parse_args(argv)
    families: list[Family] = [importlib.import_module(FAMILIES[n]).family(quick=args.quick) for n in args.families]
    if args.cases is not None:
        keep = {c.strip() for c in args.cases.split(",")}
        for family in families:
            family.cases = [c for c in family.cases if c.name in keep]
            family.skipped = {name: why for name, why in family.skipped.items() if name in keep}
    count = sum(len(f.cases) for f in families)
    print(f"{count} configurations x {args.rounds} round(s), each in a fresh process", file=sys.stderr)
    started = time.monotonic()
    samples, errors = run_rounds(families, args.rounds, log=None if args.quiet else sys.stderr)
    summaries = {f.name: summarise(f, samples[f.name], errors[f.name]) for f in families}
    targets = check(summaries)
    results: dict[str, Any] = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.monotonic() - started, 1),
        "settings": {"rounds": args.rounds, "quick": args.quick, "families": args.families, "cases": args.cases,
                     "order": "interleaved: each round runs every configuration once, in a fresh process",
                     "threads": 1},
        "machine": environment.describe(),
        "families": summaries,
        "unavailable": UNAVAILABLE,
        "targets": targets,
    }
    for name, summary in summaries.items():
        print(format_table(name, summary, args.rounds), end="\n\n")
    print(format_targets(targets))
    _write(args.output, results)
    print(f"\nresults: {args.output}", file=sys.stderr)
    return 1 if any(errors.values()) else 0


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    path.write_text(text + "\n")
    if path.parent == RESULTS:  # keep every run beside latest.json, for tracking over time
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"{stamp}{'-quick' if results['settings']['quick'] else ''}.json").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
