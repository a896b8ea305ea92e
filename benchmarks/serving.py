"""``engineflow serve`` under load: a bounded, self-stopping client on 127.0.0.1 (issue 21).

    python -m benchmarks.serving                 # ~2 min on 2 cores
    python -m benchmarks.serving --seconds 3     # shorter phases

Trains ``benchmarks/recipes/serve_mlp.py`` twice in a temporary runs folder (the 784-4096-4096-4096-10
MLP, and ``hidden=16``: a small model where HTTP dominates), then for each model starts the real
``engineflow serve`` command (``OMP_NUM_THREADS=1``: the model on one core, the client on the other)
with batching (``--max-batch-size 32 --max-wait-ms 5``) and with ``--max-batch-size 1``, and measures:

* start-up: from starting the command to ``/ready`` answering 200;
* concurrency 16 (16 client threads, one request in flight each, persistent connections, one sample a
  request as JSON) for ``--seconds``: requests/s, p50/p99 latency as the client sees it;
* where a request's time goes: the server's own time per request (``/metrics``: arrival to answer), the
  infer step's time per batch and per item, the mean batch size, JSON decoding + schema check + encoding
  of one request (the real ``Schema.tensor`` and ``to_json``, timed in this process), and the rest
  (HTTP in uvicorn and the client, the kernel's loopback);
* the batching server at 2x the load (32 clients, ``--max-queue 16``): 429s, and its RSS before and after;
* 1,000 clients that send a request and disconnect at once: then the queue is empty and a request answers.

Every phase stops itself after ``--seconds``; the client talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "benchmarks" / "recipes" / "serve_mlp.py"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The real ``engineflow serve`` command on a free port; its access log to a file."""

    def __init__(self, runs: Path, run_id: str, *args: str) -> None:
        self.port = free_port()
        self.log = runs / f"serve-{self.port}.log"
        started = time.perf_counter()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engineflow", "serve", str(RECIPE), "--run", run_id, "--runs-dir", str(runs),
                 "--port", str(self.port), "--device", "cpu", *args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
        while get(self.port, "/ready")[0] != 200:
            if self.process.poll() is not None:
                raise SystemExit(f"engineflow serve ended: {self.log.read_text()}")
            time.sleep(0.01)
        self.startup_s = time.perf_counter() - started

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for line in get(self.port, "/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    except OSError:
        return 0, ""


def load(port: int, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each with one request in flight on its own connection, until ``seconds`` pass."""
    end = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    codes: list[dict[int, int]] = [{} for _ in range(clients)]
    headers = {"Content-Type": "application/json"}

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < end:
            started = time.perf_counter()
            connection.request("POST", "/predict", body, headers)
            answer = connection.getresponse()
            answer.read()
            codes[index][answer.status] = codes[index].get(answer.status, 0) + 1
            if answer.status == 200:
                latencies[index].append(time.perf_counter() - started)
            if answer.will_close:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    ok = sorted(x for each in latencies for x in each)
    total: dict[int, int] = {}
    for each in codes:
        for code, count in each.items():
            total[code] = total.get(code, 0) + count
    return {"req_s": len(ok) / took, "p50_ms": 1000 * ok[len(ok) // 2] if ok else None,
            "p99_ms": 1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else None,
            "mean_ms": 1000 * statistics.fmean(ok) if ok else None, "codes": total}


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The server's share of a request from its /metrics counters over one phase."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    requests = delta('engineflow_serve_request_seconds_count{path="/predict"}')
    batches = delta("engineflow_serve_batch_seconds_count")
    items = delta("engineflow_serve_batch_size_sum")
    return {"server_ms": 1000 * delta('engineflow_serve_request_seconds_sum{path="/predict"}') / max(requests, 1),
            "batch_ms": 1000 * delta("engineflow_serve_batch_seconds_sum") / max(batches, 1),
            "infer_ms_per_item": 1000 * delta("engineflow_serve_batch_seconds_sum") / max(items, 1),
            "mean_batch": items / max(batches, 1)}


def json_cost_ms(sample: list[float]) -> float:
    """JSON decoding, the schema check and the answer's encoding of one request: the server's real code."""
    import torch

    from engineflow.app.served import Schema, to_json

    schema, body = Schema((784,), torch.float32), json.dumps({"inputs": sample}).encode()
    answer = torch.zeros(10)
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        schema.tensor(json.loads(body)["inputs"], "inputs")
        json.dumps({"predictions": to_json(answer)})
    return 1000 * (time.perf_counter() - started) / rounds


def disconnects(port: int, body: bytes, count: int) -> float:
    """``count`` clients that send a whole request and close at once; seconds taken."""
    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    started = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
    return time.perf_counter() - started


def gone(server: Server, body: bytes) -> dict[str, Any]:
    """1,000 clients that disconnect at once; what the server did with them, then whether it still answers."""
    def count(found: dict[str, float], code: int) -> float:
        return found.get(f'engineflow_serve_requests_total{{path="/predict",status="{code}"}}', 0.0)

    before = server.metrics()
    took = disconnects(server.port, body, 1000)
    time.sleep(0.5)
    after = server.metrics()
    return {"seconds": took, "queue_depth_after": after["engineflow_serve_queue_depth"],
            **{f"answered_{code}": count(after, code) - count(before, code) for code in (200, 429, 499)},
            "then_status": load(server.port, body, 1, 0.2)["codes"], "rss_after_mb": server.rss_mb()}


def train(runs: Path, hidden: int) -> str:
    import engineflow as ef

    return ef.run(RECIPE, {"hidden": hidden}, device="cpu", runs_dir=runs, stream=io.StringIO()).run_id


def measure(runs: Path, run_id: str, body: bytes, seconds: float, extra: bool) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, args in (("batched", ("--max-batch-size", "32", "--max-wait-ms", "5", "--max-queue", "16")),
                       ("unbatched", ("--max-batch-size", "1", "--max-queue", "16"))):
        server = Server(runs, run_id, *args)
        try:
            load(server.port, body, 16, min(1.0, seconds))  # warm the connections and the allocator
            before = server.metrics()
            result = load(server.port, body, 16, seconds)
            result.update(breakdown(before, server.metrics()), startup_s=server.startup_s)
            if extra and name == "batched":
                rss_before = server.rss_mb()
                result["overload"] = load(server.port, body, 32, seconds)
                result["overload"]["rss_before_mb"], result["overload"]["rss_after_mb"] = rss_before, server.rss_mb()
                result["disconnects"] = [gone(server, body) for _ in range(2)]  # twice: a leak would grow again
        finally:
            server.stop()
        found[name] = result
    return found


def markdown(results: dict[str, Any]) -> str:
    """The README's table of one run's results."""
    json_ms = results["json_ms_per_request"]
    rows = ["| concurrency 16, one sample a request | " + " | ".join(
        f"{model}: {name}" for model in MODELS if model in results for name in ("batched", "unbatched")) + " |",
            "|---|" + "---|" * sum(2 for model in MODELS if model in results)]
    cells: dict[str, list[str]] = {key: [] for key in ROWS}
    for model in MODELS:
        for name in ("batched", "unbatched"):
            if model not in results:
                continue
            r = results[model][name]
            queue = r["server_ms"] - r["batch_ms"] - json_ms
            cells["requests/s"].append(f"{r['req_s']:.0f}")
            cells["p50 / p99 latency (ms)"].append(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}")
            cells["mean batch (samples)"].append(f"{r['mean_batch']:.1f}")
            per = f"{r['batch_ms']:.2f} / {r['infer_ms_per_item']:.2f}"
            cells["infer step: per batch / per sample (ms)"].append(per)
            cells["in the server, arrival to answer (ms)"].append(f"{r['server_ms']:.2f}")
            cells["of which JSON in and out, schema check (ms)"].append(f"{json_ms:.2f}")
            cells["of which waiting for a batch to start (ms)"].append(f"{queue:.2f}")
            outside = r["mean_ms"] - r["server_ms"]
            cells["outside: HTTP in uvicorn and the client, loopback (ms)"].append(f"{outside:.2f}")
            cells["start-up to /ready (s)"].append(f"{r['startup_s']:.1f}")
    rows += [f"| {key} | " + " | ".join(values) + " |" for key, values in cells.items()]
    first = next(model for model in MODELS if model in results)
    batched = results[first]["batched"]
    if "overload" in batched:
        over, gone_1, gone_2 = batched["overload"], *batched["disconnects"]
        rows += ["", f"{first}, batched, `--max-queue 16`, 32 clients: {over['req_s']:.0f} requests/s answered 200 "
                 f"(p99 {over['p99_ms']:.1f} ms), status counts {over['codes']}; RSS {over['rss_before_mb']:.0f} MB "
                 f"before, {over['rss_after_mb']:.0f} MB after. 1,000 clients that sent a request and disconnected, "
                 "twice: " + "; ".join(
                     f"{g['answered_499']:.0f} taken out of the queue (499), {g['answered_200']:.0f} answered before "
                     f"the disconnect was seen, {g['answered_429']:.0f} refused (429); queue depth then "
                     f"{g['queue_depth_after']:.0f}, the next requests {g['then_status']}, "
                     f"RSS {g['rss_after_mb']:.0f} MB"
                     for g in (gone_1, gone_2)) + "."]
    return "\n".join(rows)


MODELS = ("mlp_4096", "mlp_16")
ROWS = ("requests/s", "p50 / p99 latency (ms)", "mean batch (samples)", "infer step: per batch / per sample (ms)",
        "in the server, arrival to answer (ms)", "of which JSON in and out, schema check (ms)",
        "of which waiting for a batch to start (ms)", "outside: HTTP in uvicorn and the client, loopback (ms)",
        "start-up to /ready (s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each load phase.")
    parser.add_argument("--output", type=Path, default=None, help="Write the results as JSON here too.")
    parser.add_argument("--models", default="mlp_4096,mlp_16", help="Which models (mlp_4096, mlp_16).")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    sample = torch.randn(784, generator=torch.Generator().manual_seed(0)).tolist()
    body = json.dumps({"inputs": sample}).encode()
    results: dict[str, Any] = {"json_ms_per_request": json_cost_ms(sample)}
    with tempfile.TemporaryDirectory(prefix="engineflow-serving-bench-") as folder:
        runs = Path(folder)
        for model, hidden in (("mlp_4096", 4096), ("mlp_16", 16)):
            if model not in args.models.split(","):
                continue
            print(f"{model}: training", file=sys.stderr, flush=True)
            run_id = train(runs, hidden)
            print(f"{model}: serving", file=sys.stderr, flush=True)
            results[model] = measure(runs, run_id, body, args.seconds, extra=model == args.models.split(",")[0])
    text = json.dumps(results, indent=2)
    print(text)
    print(markdown(results))
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
