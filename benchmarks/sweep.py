"""What a sweep costs and what its pruning saves (``engineflow sweep``, issue 22).

    python -m benchmarks.sweep                       # every part (~10 min on 2 cores)
    python -m benchmarks.sweep --only overhead --rounds 3
    python -m benchmarks.sweep --only digits --seeds 0,1,2 --trials 12

Parts, each process fresh, one torch thread:

* ``overhead``: the sweep's own cost per trial. ``ef.sweep`` and a hand-written Optuna loop
  (``study.optimize`` whose objective calls ``ef.run`` with the trial's values and returns the best
  value) run the same trials of ``benchmarks/recipes/sweep_tiny.py`` (one short epoch, so that what
  is around the training dominates), in turn, in fresh processes. The recipe notes the time of each
  run's first iteration and of its end; **start** is the time from the sweep's call (or the end of the
  previous trial) to the first iteration, **between** the time from a run's end to the next run's first
  iteration, both medians over the trials.
* ``storage``: ``--jobs J`` local workers (J = 2 and 4) on one study, with Optuna's RDB storage on
  SQLite and with its journal file: the wall time of the sweep and whether every trial finished.
* ``digits``: ``engineflow sweep recipes/digits.py --trials N`` for several sweep seeds, with the median
  pruner and with none: the best value, the epochs trained in all, against the recipe's default config
  (``engineflow run recipes/digits.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "benchmarks" / "recipes" / "sweep_tiny.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _times(path: Path) -> list[tuple[str, float]]:
    return [(kind, float(t)) for kind, t in (line.split() for line in path.read_text().splitlines())]


def overhead_worker(mode: str, trials: int) -> dict:
    """One measured sweep of ``trials`` trials in this process: ``engineflow`` or ``optuna`` (the hand loop)."""
    import torch

    torch.set_num_threads(1)
    import optuna

    import engineflow as ef

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp())
    marks = folder / "marks.txt"
    os.environ["EF_BENCH_MARKS"] = str(marks)
    started = time.perf_counter()
    cpu = time.process_time()
    if mode == "engineflow":
        ef.sweep(TINY, trials, runs_dir=folder / "runs", device="cpu", stream=io.StringIO(), pruner="none")
    else:
        study = optuna.create_study(storage=f"sqlite:///{folder / 'hand.db'}", direction="maximize")

        def objective(trial: optuna.Trial) -> float:
            values = {"lr": trial.suggest_float("lr", 1e-3, 0.5, log=True),
                      "hidden": trial.suggest_categorical("hidden", [16, 32])}
            result = ef.run(TINY, values, device="cpu", runs_dir=folder / "runs", stream=io.StringIO(), force=True)
            return result.best["value"]

        study.optimize(objective, n_trials=trials)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu
    marks_read = _times(marks)
    firsts = [t for kind, t in marks_read if kind == "first"]
    ends = [t for kind, t in marks_read if kind == "end"]
    between = [b - a for a, b in zip(ends, firsts[1:], strict=False)]
    return {"mode": mode, "trials": trials, "total_s": total, "cpu_s": cpu, "start_s": firsts[0] - started,
            "between_ms": statistics.median(between) * 1000, "train_ms": statistics.median(
                (e - f) * 1000 for f, e in zip(firsts, ends, strict=False))}


def _fresh(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--worker", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead(rounds: int, trials: int) -> None:
    results: dict[str, list[dict]] = {"engineflow": [], "optuna": []}
    for r in range(rounds):
        for mode in (("engineflow", "optuna") if r % 2 == 0 else ("optuna", "engineflow")):
            results[mode].append(_fresh("overhead", mode, str(trials)))
    print(f"### overhead: {trials} trials of benchmarks/recipes/sweep_tiny.py, {rounds} rounds (median)")
    print("| loop | start to first iteration (s) | run end to next first iteration (ms) | training (ms/trial) "
          "| total (s) | CPU (s) |")
    print("|---|---|---|---|---|---|")
    for mode, rows in results.items():
        def med(key: str, rows: list[dict] = rows) -> float:
            return statistics.median(row[key] for row in rows)
        label = "ef.sweep" if mode == "engineflow" else "hand-written Optuna loop calling ef.run"
        print(f"| {label} | {med('start_s'):.2f} | {med('between_ms'):.0f} | {med('train_ms'):.0f} | "
              f"{med('total_s'):.2f} | {med('cpu_s'):.2f} |")


def storage(trials: int) -> None:
    print(f"### storage: {trials} trials of sweep_tiny.py by --jobs J workers")
    print("| storage | J | wall (s) | finished trials |")
    print("|---|---|---|---|")
    for jobs in (2, 4):
        for kind in ("sqlite", "journal"):
            folder = Path(tempfile.mkdtemp())
            url = f"sqlite:///{folder / 's.db'}" if kind == "sqlite" else f"journal:///{folder / 's.log'}"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "engineflow", "sweep", str(TINY), "--trials", str(trials),
                                   "--jobs", str(jobs), "--storage", url, "--runs-dir", str(folder / "runs"),
                                   "--pruner", "none", "--device", "cpu"], env={**ENV, "EF_BENCH_MARKS": os.devnull},
                                  capture_output=True, text=True)
            wall = time.perf_counter() - started
            shown = subprocess.run([sys.executable, "-m", "engineflow", "sweep", "show", "--json", "--storage", url],
                                   env=ENV, capture_output=True, text=True)
            finished = (sum(t["state"] != "running" for t in json.loads(shown.stdout)["trials"])
                        if shown.returncode == 0 else f"error: {shown.stderr.strip()[-200:]}")
            note = "" if done.returncode == 0 else f" (exit {done.returncode}: {done.stderr.strip()[-200:]})"
            print(f"| {kind} | {jobs} | {wall:.1f}{note} | {finished} |")


def digits(seeds: list[int], trials: int) -> None:
    folder = Path(tempfile.mkdtemp())
    default = subprocess.run([sys.executable, "-m", "engineflow", "run", "recipes/digits.py", "--runs-dir",
                              str(folder / "default"), "--device", "cpu", "--no-progress"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, check=True)
    line = next(x for x in default.stdout.splitlines() if x.startswith("best epoch"))
    print(f"### digits: the default config: {line}")
    print(f"### digits: engineflow sweep recipes/digits.py --trials {trials}")
    print("| seed | pruner | best valid/accuracy | best trial's params | pruned trials | epochs trained | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for seed in seeds:
        for pruner in ("median", "none"):
            runs = folder / f"{pruner}-{seed}"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "engineflow", "sweep", "recipes/digits.py", "--trials", str(trials),
                            "--seed", str(seed), "--pruner", pruner, "--runs-dir", str(runs), "--device", "cpu"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - started
            shown = json.loads(subprocess.run([sys.executable, "-m", "engineflow", "sweep", "show", "--json",
                                               "--runs-dir", str(runs)], cwd=REPO, env=ENV, capture_output=True,
                                              text=True, check=True).stdout)
            best = shown["best"]
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in best["params"].items())
            pruned = sum(t["state"] == "pruned" for t in shown["trials"])
            epochs = sum(t["epochs"] for t in shown["trials"])
            print(f"| {seed} | {pruner} | {best['value']:.4f} | {params} | {pruned} | {epochs} | {wall:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="*")
    parser.add_argument("--only", default="overhead,storage,digits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--tiny-trials", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(overhead_worker(args.worker[1], int(args.worker[2]))))
        return
    parts = args.only.split(",")
    if "overhead" in parts:
        overhead(args.rounds, args.tiny_trials)
    if "storage" in parts:
        storage(args.tiny_trials * 2)
    if "digits" in parts:
        digits([int(s) for s in args.seeds.split(",")], args.trials)


if __name__ == "__main__":
    main()
