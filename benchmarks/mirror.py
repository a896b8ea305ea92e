"""The MLflow mirror's cost per epoch: ``recipes/digits.py`` with and without a mirror to a real server.

    python -m benchmarks.mirror                    # 5 interleaved rounds of 20 epochs (~3 min on 2 cores)
    python -m benchmarks.mirror --rounds 1 --epochs 3

Starts ``mlflow server`` (SQLite and artifacts in a temp dir, on 127.0.0.1), then runs ``engineflow.run``
of the digits recipe in a fresh process per measurement, alternating ``mirror`` (``mlflow=URI``) and
``none`` (``mlflow=False``), the order flipped every round. Each process reports:

* ``epoch_ms``: the wall time of each epoch as its epoch line reports it (epochs 2 and later; the first
  epoch overlaps the thread's first push: the MLflow run, its params and code; reported as ``first_epoch_ms``);
* ``queue_us``: the time ``Mirror.epoch`` (the training thread's whole share of the mirror during the
  fit: one line appended to the outbox) takes, timed around the real method; ``begin_s`` and
  ``finish_s`` likewise for ``Mirror.begin`` (before the first epoch: importing MLflow's client) and
  ``Mirror.finish`` (after the last: the drain);
* ``main_cpu_s``: the CPU time of the training (main) thread over the whole ``engineflow.run``;
* ``run_s``: the wall time of the whole ``engineflow.run``, the end's drain included.

This is not a harness family: it needs a server, which the families do not start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONPATH": str(REPO)}
_EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ .*?\s(\d+(?:\.\d+)?)(ms|s)(?:\s+\*)?$")


def worker(mode: str, uri: str, epochs: int, runs_dir: str) -> dict:
    """One measured ``engineflow.run`` in this process (``python -m benchmarks.mirror --worker``)."""
    import torch

    torch.set_num_threads(1)
    import engineflow as ef
    from engineflow.record import mirror

    spent: dict[str, list[float]] = {"begin": [], "epoch": [], "finish": []}

    def timed(name):  # the real method, with a clock around it
        real = getattr(mirror.Mirror, name)

        def method(self, *args, **kwargs):
            started = time.perf_counter()
            real(self, *args, **kwargs)
            spent[name].append(time.perf_counter() - started)

        setattr(mirror.Mirror, name, method)

    for name in spent:
        timed(name)
    stream = io.StringIO()
    wall, cpu = time.perf_counter(), time.thread_time()
    ef.run(REPO / "recipes" / "digits.py", {"epochs": epochs}, device="cpu", runs_dir=runs_dir, progress=False,
           stream=stream, mlflow=uri if mode == "mirror" else False)
    run_s, main_cpu_s = time.perf_counter() - wall, time.thread_time() - cpu
    times = {}
    for line in stream.getvalue().splitlines():
        found = _EPOCH_LINE.match(line.strip())
        if found:
            times[int(found[1])] = float(found[2]) * (1 if found[3] == "ms" else 1000)
    return {"mode": mode, "first_epoch_ms": times.get(1), "epoch_ms": [times[e] for e in sorted(times) if e > 1],
            "queue_us": [s * 1e6 for s in spent["epoch"]], "begin_s": sum(spent["begin"]),
            "finish_s": sum(spent["finish"]), "main_cpu_s": main_cpu_s, "run_s": run_s,
            "pending_at_end": "entries pending" in stream.getvalue() or "still pushing" in stream.getvalue()}


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("ab")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **ENV}, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return server, uri
        except OSError:
            time.sleep(0.25)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start; see " + str(folder / "server.log"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--worker", choices=["mirror", "none"])
    parser.add_argument("--uri", default="")
    parser.add_argument("--runs-dir", default="")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.uri, args.epochs, args.runs_dir)))
        return 0
    with tempfile.TemporaryDirectory(prefix="engineflow-bench-mirror-") as scratch:
        folder = Path(scratch)
        server, uri = start_server(folder)
        samples: dict[str, list[dict]] = {"none": [], "mirror": []}
        try:
            for round_ in range(args.rounds):
                for mode in (("none", "mirror") if round_ % 2 == 0 else ("mirror", "none")):
                    done = subprocess.run([sys.executable, "-m", "benchmarks.mirror", "--worker", mode, "--uri", uri,
                                           "--epochs", str(args.epochs), "--runs-dir",
                                           str(folder / f"runs-{round_}-{mode}")],
                                          capture_output=True, text=True, env={**os.environ, **ENV}, cwd=REPO)
                    if done.returncode != 0:
                        print(done.stdout, done.stderr, file=sys.stderr)
                        return 1
                    samples[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"round {round_ + 1}/{args.rounds} {mode}: done", file=sys.stderr)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(report(samples, args))
    return 0


def report(samples: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    lines = [f"digits, {args.epochs} epochs, {args.rounds} rounds (a fresh process each, interleaved)", "",
             "| | no mirror | mirror | difference |", "|---|---|---|---|"]
    rows = {
        "epoch wall ms (epochs 2+, median of all)": lambda s: med([t for r in s for t in r["epoch_ms"]]),
        "epoch wall ms, per process medians' median": lambda s: med([med(r["epoch_ms"]) for r in s]),
        "first epoch ms (median)": lambda s: med([r["first_epoch_ms"] for r in s]),
        "Mirror.begin s (median)": lambda s: med([r.get("begin_s", 0.0) for r in s]),
        "Mirror.finish s, the drain (median)": lambda s: med([r.get("finish_s", 0.0) for r in s]),
        "training thread CPU s per run (median)": lambda s: med([r["main_cpu_s"] for r in s]),
        "engineflow.run wall s, drain included (median)": lambda s: med([r["run_s"] for r in s]),
    }
    for title, value in rows.items():
        a, b = value(samples["none"]), value(samples["mirror"])
        relative = f" ({(b / a - 1) * 100:+.1f}%)" if a else ""
        lines.append(f"| {title} | {a:.3f} | {b:.3f} | {b - a:+.3f}{relative} |")
    queue = [q for r in samples["mirror"] for q in r["queue_us"]]
    lines.append("")
    lines.append(f"Mirror.epoch on the training thread: median {med(queue):.1f} us, max {max(queue or [0]):.1f} us "
                 f"({len(queue)} calls); runs that ended with entries pending: "
                 f"{sum(r['pending_at_end'] for r in samples['mirror'])}/{len(samples['mirror'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
