"""Run configurations in fresh processes, in interleaved rounds, and summarise them against a baseline.

Single runs on shared machines jump 2-3x, so one number per configuration means little. Every
round runs each configuration once, in a new process (A B C A B C ...), so a slow spell of the
machine hits all of them alike; a configuration is summarised by the median of its rounds, and
compared with its family's baseline both as a ratio of medians and as the median of per-round
(paired) ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
# One thread everywhere: the method, and what keeps two-core machines from fighting themselves.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Case:
    """One configuration: a command, run in a fresh process every round.

    Attributes:
        name: key in the results ("raw", "engineflow").
        label: what the table calls it.
        argv: the command line; ``python`` is this interpreter.
        inner: the process prints ``{"seconds", "iterations"}`` for its training loop (value:
            microseconds per iteration); otherwise the value is the whole process's wall time.
    """

    name: str
    label: str
    argv: tuple[str, ...]
    inner: bool = True


@dataclass
class Family:
    """Configurations compared with each other, one of them the baseline.

    Attributes:
        name: key in the results ("overhead").
        title: one line for the table.
        unit: "us/iteration" or "s".
        baseline: the name of the case the ratios divide by.
        cases: what runs.
        setup: what the cases share (sizes, commands), recorded in the results.
        notes: caveats printed under the table and saved with it.
        skipped: cases that could not run here, with the reason.
    """

    name: str
    title: str
    unit: str
    baseline: str
    cases: list[Case]
    setup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One process's measurement: its value, wall time, peak resident memory, and what else it reported."""

    value: float
    wall_s: float
    peak_rss_mb: float
    details: Mapping[str, Any] = field(default_factory=dict)


def worker_argv(module: str, case: str, **params: Any) -> tuple[str, ...]:
    """The command that runs ``case`` of ``benchmarks.<module>`` in :mod:`benchmarks.worker`."""
    return (sys.executable, "-m", "benchmarks.worker", module, case, json.dumps(params))


def run_once(case: Case, *, timeout: float = 600) -> Sample:
    """Run ``case`` in a new process; raise RuntimeError with its output when it fails."""
    # PYTHONPATH: the engineflow beside these benchmarks is the one measured, even from the console
    # script (whose sys.path starts in the venv's bin/) or a checkout other than the installed one.
    env = {**os.environ, **THREAD_ENV, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(case.argv, cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        status, usage = _wait(process, timeout)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(case.argv[1:])} exited with {status}:\n{tail}")
    # Kilobytes on Linux. A child starts with this process's pages, so this runner imports nothing heavy.
    peak_mb = usage.ru_maxrss / 1024
    if not case.inner:
        return Sample(wall, wall, peak_mb)
    result = json.loads(stdout.strip().splitlines()[-1])
    details = {k: v for k, v in result.items() if k not in ("seconds", "iterations")}
    return Sample(1e6 * result["seconds"] / result["iterations"], wall, peak_mb, details)


def _wait(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, Any]:
    # os.wait4 gives this child's own rusage; RUSAGE_CHILDREN would report the largest child so far.
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        if time.monotonic() > deadline:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            process.returncode = -9
            return -9, usage
        time.sleep(0.005)


def run_rounds(
    families: Sequence[Family], rounds: int, *, log: TextIO | None = None,
    runner: Callable[[Case], Sample] = run_once,
) -> tuple[dict[str, dict[str, list[Sample]]], dict[str, dict[str, str]]]:
    """Every case of every family once per round, in the same order each round.

    Returns:
        ``(samples, errors)``: samples by family and case; the error of each case that failed
        (a failed case is not retried in later rounds).
    """
    samples: dict[str, dict[str, list[Sample]]] = {f.name: {c.name: [] for c in f.cases} for f in families}
    errors: dict[str, dict[str, str]] = {f.name: {} for f in families}
    for round_index in range(rounds):
        for family in families:
            for case in family.cases:
                if case.name in errors[family.name]:
                    continue
                try:
                    sample = runner(case)
                except (RuntimeError, json.JSONDecodeError, KeyError, IndexError) as err:
                    errors[family.name][case.name] = str(err)
                    _log(log, f"round {round_index + 1}/{rounds} {family.name}/{case.name}: FAILED\n{err}")
                    continue
                samples[family.name][case.name].append(sample)
                _log(log, f"round {round_index + 1}/{rounds} {family.name}/{case.name}: "
                          f"{sample.value:.4g} {family.unit} ({sample.wall_s:.1f}s)")
    return samples, errors


def _log(log: TextIO | None, text: str) -> None:
    if log is not None:
        print(text, file=log, flush=True)


def summarise(family: Family, samples: Mapping[str, list[Sample]], errors: Mapping[str, str]) -> dict[str, Any]:
    """Median, min and max per case, and ratios to the baseline (of medians, and paired by round)."""
    base = [s.value for s in samples.get(family.baseline, [])]
    cases: dict[str, Any] = {}
    for case in family.cases:
        values = [s.value for s in samples.get(case.name, [])]
        if not values:
            continue
        median = statistics.median(values)
        entry: dict[str, Any] = {
            "label": case.label,
            "values": [round(v, 4) for v in values],
            "median": median,
            "min": min(values),
            "max": max(values),
            "wall_s": statistics.median(s.wall_s for s in samples[case.name]),
            "peak_rss_mb": statistics.median(s.peak_rss_mb for s in samples[case.name]),
        }
        if samples[case.name][-1].details:
            entry["details"] = dict(samples[case.name][-1].details)
        if base:
            paired = [v / b for v, b in zip(values, base, strict=False)]
            entry["ratio"] = median / statistics.median(base)
            entry["paired_ratio"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
        cases[case.name] = entry
    return {
        "title": family.title,
        "unit": family.unit,
        "baseline": family.baseline,
        "setup": family.setup,
        "notes": family.notes,
        "skipped": family.skipped,
        "errors": dict(errors),
        "cases": cases,
    }


def format_table(name: str, summary: Mapping[str, Any], rounds: int) -> str:
    """A fixed-width table of one family's summary (Markdown-compatible)."""
    unit = summary["unit"]
    lines = [f"### {name}: {summary['title']}", "",
             f"{rounds} round(s); {unit}; ratio = median / median of `{summary['baseline']}`; "
             "paired = median (min-max) of per-round ratios", "",
             f"| {'configuration':<44} | {'median':>9} | {'min':>9} | {'max':>9} | {'ratio':>6} | "
             f"{'paired':>17} | {'RSS MB':>6} |",
             f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 19}|{'-' * 8}|"]
    digits = 1 if unit == "us/iteration" else 3
    for case in summary["cases"].values():
        ratio = f"{case['ratio']:.3f}" if "ratio" in case else "-"
        paired = case.get("paired_ratio")
        paired_text = f"{paired['median']:.3f} ({paired['min']:.2f}-{paired['max']:.2f})" if paired else "-"
        lines.append(f"| {case['label']:<44} | {case['median']:>9.{digits}f} | {case['min']:>9.{digits}f} | "
                     f"{case['max']:>9.{digits}f} | {ratio:>6} | {paired_text:>17} | {case['peak_rss_mb']:>6.0f} |")
    lines.append("")
    lines += [f"- skipped `{case}`: {why}" for case, why in summary["skipped"].items()]
    lines += [f"- FAILED `{case}`: {why.splitlines()[0]}" for case, why in summary["errors"].items()]
    lines += [f"- `{name}` wrote: {', '.join(case['details']['outputs'])}"
              for name, case in summary["cases"].items() if case.get("details", {}).get("outputs")]
    lines += [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines)
