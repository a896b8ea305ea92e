"""Run configurations in fresh processes, in interleaved rounds, and summarise them against a baseline.

Single runs on shared machines jump 2-3x, so one number per configuration means little. Every
round runs each configuration once, in a new process (A B C A B C ...), so a slow spell of the
machine hits all of them alike; a configuration is summarised by the median of its rounds, and
compared with its family's baseline both as a ratio of medians and as the median of per-round
(paired) ratios.

Two clocks are kept for every sample: wall time, and the CPU time the process itself used. On a
shared machine the second barely moves when other processes compete for the cores, so it is the
headline for single-threaded CPU training; wall time is the headline where the user waits for the
whole process (start-up, end-to-end) or for a GPU.
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
# In a case's command, replaced by a new empty folder for each run (e.g. a --runs-dir, so that no run
# finds an earlier one's outputs).
SCRATCH = "{scratch}"
# One thread everywhere: the method, and what keeps two-core machines from fighting themselves.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Case:
    """One configuration: a command, run in a fresh process every round.

    Attributes:
        name: key in the results ("raw", "engineflow").
        label: what the table calls it.
        argv: the command line; ``python`` is this interpreter; ``{scratch}`` becomes a new empty
            folder for each run.
        inner: the process prints ``{"seconds", "cpu_seconds", "iterations"}`` for its training loop
            (values: microseconds per iteration); otherwise the values are the whole process's.
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
        baseline: the name of the case the ratios divide by (None: no ratios).
        cases: what runs.
        clock: the headline clock, "cpu" or "wall" (both are recorded).
        setup: what the cases share (sizes, commands), recorded in the results.
        notes: caveats printed under the table and saved with it.
        skipped: cases that could not run here, with the reason.
    """

    name: str
    title: str
    unit: str
    baseline: str | None
    cases: list[Case]
    clock: str = "cpu"
    setup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One process's measurement in its family's unit, by both clocks, and what else it reported.

    Attributes:
        wall: wall time (per iteration for training loops).
        cpu: CPU time of the process, user + system (per iteration for training loops).
        process_s: wall time of the whole process, start to exit.
        peak_rss_mb: the process's peak resident memory.
        details: other values the process reported (e.g. the files a run wrote).
    """

    wall: float
    cpu: float
    process_s: float
    peak_rss_mb: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def value(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall


def worker_argv(module: str, case: str, **params: Any) -> tuple[str, ...]:
    """The command that runs ``case`` of ``benchmarks.<module>`` in :mod:`benchmarks.worker`."""
    return (sys.executable, "-m", "benchmarks.worker", module, case, json.dumps(params))


def child_env() -> dict[str, str]:
    """The environment of every measured process."""
    # PYTHONPATH: the engineflow beside these benchmarks is the one measured, even from the console
    # script (whose sys.path starts in the venv's bin/) or a checkout other than the installed one.
    return {**os.environ, **THREAD_ENV, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def run_once(case: Case, *, timeout: float = 600) -> Sample:
    """Run ``case`` in a new process; raise RuntimeError with its output when it fails."""
    with (tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err,
          tempfile.TemporaryDirectory(prefix="engineflow-bench-") as scratch):
        argv = [arg.replace(SCRATCH, scratch) for arg in case.argv]
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
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
        return Sample(wall, usage.ru_utime + usage.ru_stime, wall, peak_mb)
    result = json.loads(stdout.strip().splitlines()[-1])
    per_iteration = 1e6 / result["iterations"]
    timings = ("seconds", "cpu_seconds", "thread_cpu_seconds", "iterations")
    details = {k: v for k, v in result.items() if k not in timings}
    return Sample(result["seconds"] * per_iteration, result["cpu_seconds"] * per_iteration, wall, peak_mb, details)


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
                          f"{sample.value(family.clock):.4g} {family.unit} ({family.clock}; "
                          f"process {sample.process_s:.1f}s)")
    return samples, errors


def _log(log: TextIO | None, text: str) -> None:
    if log is not None:
        print(text, file=log, flush=True)


def _stats(values: list[float], base: list[float]) -> dict[str, Any]:
    entry: dict[str, Any] = {"values": [round(v, 4) for v in values], "median": statistics.median(values),
                             "min": min(values), "max": max(values)}
    if base:
        # Paired: round r of a case against round r of the baseline, run minutes apart at most.
        paired = [v / b for v, b in zip(values, base, strict=False)]
        entry["ratio"] = entry["median"] / statistics.median(base)
        entry["paired_ratio"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
    return entry


def summarise(family: Family, samples: Mapping[str, list[Sample]], errors: Mapping[str, str]) -> dict[str, Any]:
    """Per case and clock: median, min, max, ratio of medians to the baseline, paired ratios.

    The headline clock's numbers are also at the top level of each case (``median``, ``ratio``...).
    """
    base = samples.get(family.baseline, []) if family.baseline else []
    cases: dict[str, Any] = {}
    for case in family.cases:
        runs = samples.get(case.name, [])
        if not runs:
            continue
        clocks = {clock: _stats([s.value(clock) for s in runs], [s.value(clock) for s in base])
                  for clock in ("cpu", "wall")}
        entry: dict[str, Any] = {
            "label": case.label,
            **clocks[family.clock],
            **clocks,
            "process_s": statistics.median(s.process_s for s in runs),
            "peak_rss_mb": statistics.median(s.peak_rss_mb for s in runs),
        }
        if runs[-1].details:
            entry["details"] = dict(runs[-1].details)
            numbers = [k for k, v in runs[-1].details.items() if isinstance(v, (int, float))]
            entry["details_median"] = {k: statistics.median(s.details[k] for s in runs) for k in numbers}
            entry["details_rounds"] = {k: [s.details[k] for s in runs] for k in numbers}
        cases[case.name] = entry
    return {
        "title": family.title,
        "unit": family.unit,
        "clock": family.clock,
        "baseline": family.baseline,
        "setup": family.setup,
        "notes": family.notes,
        "skipped": family.skipped,
        "errors": dict(errors),
        "cases": cases,
    }


def format_table(name: str, summary: Mapping[str, Any], rounds: int) -> str:
    """A Markdown table of one family's summary: the headline clock in full, the other's median and ratio."""
    unit, clock = summary["unit"], summary["clock"]
    other = "wall" if clock == "cpu" else "cpu"
    lines = [f"### {name}: {summary['title']}", "",
             f"{rounds} round(s); {clock} {unit}; ratio = median / median of `{summary['baseline'] or '-'}`; "
             f"paired = median (min-max) of per-round ratios; then the {other} clock's median and ratio", "",
             f"| {'configuration':<48} | {'median':>9} | {'min':>9} | {'max':>9} | {'ratio':>6} | "
             f"{'paired':>17} | {other + ' median':>11} | {other + ' ratio':>10} | {'RSS MB':>6} |",
             f"|{'-' * 50}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 19}|{'-' * 13}|{'-' * 12}|{'-' * 8}|"]
    digits = 1 if unit.startswith("us") else 3
    for case in summary["cases"].values():
        ratio = f"{case['ratio']:.3f}" if "ratio" in case else "-"
        paired = case.get("paired_ratio")
        paired_text = f"{paired['median']:.3f} ({paired['min']:.2f}-{paired['max']:.2f})" if paired else "-"
        second = case[other]
        second_ratio = f"{second['ratio']:.3f}" if "ratio" in second else "-"
        lines.append(f"| {case['label']:<48} | {case['median']:>9.{digits}f} | {case['min']:>9.{digits}f} | "
                     f"{case['max']:>9.{digits}f} | {ratio:>6} | {paired_text:>17} | "
                     f"{second['median']:>11.{digits}f} | {second_ratio:>10} | {case['peak_rss_mb']:>6.0f} |")
    lines.append("")
    lines += [f"- skipped `{case}`: {why}" for case, why in summary["skipped"].items()]
    lines += [f"- FAILED `{case}`: {why.splitlines()[0]}" for case, why in summary["errors"].items()]
    lines += [f"- `{name}` wrote: {', '.join(case['details']['outputs'])}"
              for name, case in summary["cases"].items() if case.get("details", {}).get("outputs")]
    lines += [f"- `{name}`: " + ", ".join(f"{k} {_number(v)}{_spread(case, k)}"
                                          for k, v in case["details_median"].items())
              for name, case in summary["cases"].items() if case.get("details_median")]
    lines += [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines)


def _spread(case: dict[str, Any], key: str) -> str:
    """" (min-max)" over rounds for the ratios, which a single round can move by a few percent."""
    rounds = case.get("details_rounds", {}).get(key, [])
    if not key.endswith("_ratio") or len(rounds) < 2:
        return ""
    return f" ({min(rounds):.3f}-{max(rounds):.3f})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"
