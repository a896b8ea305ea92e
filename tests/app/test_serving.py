"""``engineflow serve``: real servers on 127.0.0.1 started by the tests, real HTTP requests.

One tiny run is trained once; two ``engineflow serve`` processes serve it for the whole module (started
together, so their start-ups overlap): ``fast`` batches within 50 ms; ``slow`` has a first batch that
takes 2 s (its warm-up) and waits 4 s for a batch to fill, with room for 4 queued samples, so that
deadlines, a full queue and SIGTERM's drain are seen deterministically.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'engineflow[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'engineflow[serve]')")

import engineflow as ef
from tests.conftest import REPO, invoke_cli
from tests.recipes import IMPORTS, classifier_steps

SETUP = '''
import os
import time

config = ef.config(epochs=1, lr=0.1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    model = torch.nn.Linear(4, 2)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(TensorDataset(x, y), batch_size=8),
                         "valid": DataLoader(TensorDataset(x, y), batch_size=8)})
'''
RECIPE = IMPORTS + SETUP + classifier_steps() + '''
FIRST = []

@ef.infer_step
def predict(x, model):
    if not FIRST:  # a model whose first batch is slow (as compiling one is), when the test asks for it
        FIRST.append(True)
        time.sleep(float(os.environ.get("SLOW_FIRST_BATCH", "0")))
    if (x.abs() > 1e6).any():  # an input the schema admits and the model refuses
        raise ValueError("input out of range")
    return model(x)
'''
PIPELINE = IMPORTS + SETUP + classifier_steps() + '''
def logits(x, model):
    return model(x)

def probabilities(x, model):
    return torch.softmax(model(x), dim=1)

def total(x, model):
    return model(x).sum().reshape(1)  # one number for the whole batch

stages = [ef.stage("fit", train=train, eval=evaluate, epochs=1),
          ef.stage("logits", infer=ef.infer_step(logits), loaders={"infer": "valid"}),
          ef.stage("total", infer=ef.infer_step(total), loaders={"infer": "valid"}),
          ef.stage("probabilities", infer=ef.infer_step(probabilities), loaders={"infer": "valid"})]
'''
SAMPLES = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """A real HTTP request: status, headers, the JSON body (or the text of one that is not JSON)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=sent, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, got, text = answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read().decode()
    except urllib.error.HTTPError as err:
        status, got, text = err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()
    try:
        return status, got, json.loads(text)
    except ValueError:
        return status, got, text


def together(*calls: Any) -> list[Any]:
    """Run the calls (functions of no argument) at the same moment in threads; their results in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def one(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def metric(url: str, name: str) -> float:
    _, _, text = call(f"{url}/metrics")
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


class Server:
    """An ``engineflow serve`` process on a free port of 127.0.0.1, its stderr (the access log) in a file."""

    def __init__(self, folder: Path, name: str, recipe: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"{name}.log"
        command = [sys.executable, "-m", "engineflow", "serve", str(recipe), "--runs-dir", str(folder / "runs"),
                   "--port", str(self.port), "--device", "cpu", *args]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})

    def wait(self, route: str = "/ready", timeout: float = 120) -> float:
        """Poll ``route`` until it answers 200; seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if call(self.url + route, timeout=5)[0] == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"{self.url}{route} not 200 within {timeout} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("serve")
    recipe = folder / "recipe.py"
    recipe.write_text(RECIPE)
    result = ef.run(recipe, device="cpu", runs_dir=folder / "runs", stream=io.StringIO())
    fast = Server(folder, "fast", recipe, "--max-batch-size", "8", "--max-wait-ms", "50", "--max-body-bytes", "20000")
    slow = Server(folder, "slow", recipe, "--max-batch-size", "32", "--max-wait-ms", "4000", "--max-queue", "4",
                  env={"SLOW_FIRST_BATCH": "2"})
    inputs = folder / "inputs"
    inputs.mkdir()
    for i, sample in enumerate(SAMPLES):
        np.save(inputs / f"{i}.npy", sample.numpy())
    done = invoke_cli(["eval", str(recipe), str(inputs), str(folder / "eval.pt"), "--runs-dir", str(folder / "runs")])
    assert done.exit_code == 0, done.output
    expected = torch.load(folder / "eval.pt", weights_only=True)["predictions"]
    try:
        yield {"folder": folder, "recipe": recipe, "run": result.run_id, "fast": fast, "slow": slow,
               "expected": expected}
    finally:
        fast.stop()
        slow.stop()


def test_predictions_equal_engineflow_eval_as_json_raw_npy_and_concurrent_requests(served):
    fast, expected = served["fast"], served["expected"]
    fast.wait()
    status, _, answer = call(f"{fast.url}/predict", {"instances": SAMPLES.tolist()})
    assert status == 200
    assert torch.allclose(torch.tensor(answer["predictions"]), expected, atol=1e-6, rtol=0)
    status, _, answer = call(f"{fast.url}/predict", {"inputs": SAMPLES[0].tolist()})
    assert status == 200 and torch.allclose(torch.tensor(answer["predictions"]), expected[0], atol=1e-6, rtol=0)
    raw = io.BytesIO()
    np.save(raw, SAMPLES[1].numpy())
    status, _, answer = call(f"{fast.url}/predict", raw=raw.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert status == 200 and torch.allclose(torch.tensor(answer["predictions"]), expected[1], atol=1e-6, rtol=0)

    batches_before = metric(fast.url, "engineflow_serve_batch_size_count")
    answers = together(*(lambda i=i: call(f"{fast.url}/predict", {"inputs": SAMPLES[i].tolist()})
                         for i in range(6)))
    for i, (status, _, answer) in enumerate(answers):
        assert status == 200 and torch.allclose(torch.tensor(answer["predictions"]), expected[i], atol=1e-6, rtol=0)
    # six concurrent requests within one 50 ms window share batches
    assert metric(fast.url, "engineflow_serve_batch_size_count") - batches_before < 6


def test_inputs_that_do_not_fit_are_422_naming_what_was_wrong(served):
    fast = served["fast"]
    fast.wait()
    cases = [
        ({"inputs": [1.0, 2.0, 3.0]}, None, "inputs has shape [3]; this model takes [4] (float32) per sample"),
        ({"instances": [[0, 0, 0, 0], [1, 2]]}, None, "instances[1] has shape [2]"),
        ({"inputs": ["a", "b", "c", "d"]}, None, "inputs holds something other than numbers"),
        ({"inputs": [[1, 2], [3]]}, None, "nested lists have different lengths"),
        ({"samples": [1, 2, 3, 4]}, None, '"inputs" (one sample) or "instances"'),
        ({"instances": []}, None, '"instances" must be a non-empty list'),
        ({"inputs": [0, 0, 0, 0]}, {"X-Timeout-Ms": "soon"}, "X-Timeout-Ms must be a positive number"),
    ]
    for body, headers, message in cases:
        status, _, answer = call(f"{fast.url}/predict", body, headers=headers)
        assert (status, message in answer["error"]) == (422, True), (body, answer)
    status, _, answer = call(f"{fast.url}/predict", raw=b"{not json")
    assert status == 422 and "the body is not JSON" in answer["error"]
    status, _, answer = call(f"{fast.url}/predict", raw=b"\x00\x01", headers={"Content-Type": "application/x-npy"})
    assert status == 422 and "could not be read as .npy" in answer["error"]
    status, _, answer = call(f"{fast.url}/predict", raw=b"x", headers={"Content-Type": "application/zip"})
    assert status == 422 and "content type 'application/zip' cannot be read" in answer["error"]


def test_a_body_over_the_limit_is_413(served):
    fast = served["fast"]
    fast.wait()
    status, _, answer = call(f"{fast.url}/predict", {"instances": [[0.5, 0.5, 0.5, 0.5]] * 1000})  # ~25 kB
    assert status == 413 and "larger than 20000 bytes" in answer["error"]


def test_one_bad_request_in_a_batch_fails_alone(served):
    fast, expected = served["fast"], served["expected"]
    fast.wait()
    bad = [1e7, 0.0, 0.0, 0.0]  # fits the schema; the infer step raises on it
    answers = together(lambda: call(f"{fast.url}/predict", {"instances": [SAMPLES[0].tolist(), bad]}),
                       lambda: call(f"{fast.url}/predict", {"inputs": SAMPLES[2].tolist()}),
                       lambda: call(f"{fast.url}/predict", {"instances": [SAMPLES[3].tolist(), SAMPLES[4].tolist()]}))
    (status, _, failed), (ok_1, _, one), (ok_2, _, two) = answers
    assert status == 422 and failed["error"] == "the infer step failed on instances[1]: ValueError: input out of range"
    assert (ok_1, ok_2) == (200, 200)
    assert torch.allclose(torch.tensor(one["predictions"]), expected[2], atol=1e-6, rtol=0)
    assert torch.allclose(torch.tensor(two["predictions"]), expected[3:5], atol=1e-6, rtol=0)


def test_health_metrics_and_the_access_log(served):
    fast = served["fast"]
    fast.wait()
    status, _, answer = call(f"{fast.url}/health")
    assert (status, answer) == (200, {"status": "alive", "run": served["run"]})
    call(f"{fast.url}/predict", {"inputs": [1.0]})
    _, headers, text = call(f"{fast.url}/metrics")
    assert headers["content-type"].startswith("text/plain")
    for name in ('engineflow_serve_requests_total{path="/predict",status="422"}', "engineflow_serve_queue_depth 0.0",
                 "engineflow_serve_batch_size_bucket", 'engineflow_serve_request_seconds_bucket{le="0.001",path='):
        assert name in text
    log = fast.log.read_text()
    assert f"serving run {served['run']} (the latest completed run of recipe)\nlistening on {fast.url}: infer step " \
           "predict, input [4] (float32) per sample; batches of up to 8 or 50 ms; 1 worker\n" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["path"] == "/predict" and line["status"] == 422]
    assert refused and set(refused[0]) == {"time", "client", "method", "path", "status", "ms", "items", "pid"}
    assert refused[0]["method"] == "POST" and refused[0]["client"].startswith("127.0.0.1:")


def test_ready_only_after_the_warm_up_batch(served):
    slow = served["slow"]
    slow.wait("/health")
    status, headers, answer = call(f"{slow.url}/ready")  # its first batch takes 2 s
    assert status == 503 and headers["retry-after"] == "1"
    status, _, answer = call(f"{slow.url}/predict", {"inputs": [0, 0, 0, 0]})
    assert status == 503 and "warm-up" in answer["error"]
    slow.wait("/ready")
    assert call(f"{slow.url}/ready")[:3:2] == (200, {"status": "ready", "run": served["run"]})


def test_a_deadline_is_504_and_its_item_leaves_the_queue(served):
    slow = served["slow"]
    slow.wait()
    status, _, answer = call(f"{slow.url}/predict", {"inputs": [0, 0, 0, 0]}, headers={"X-Timeout-Ms": "200"})
    assert status == 504 and "no answer within 200 ms" in answer["error"]
    assert metric(slow.url, "engineflow_serve_queue_depth") == 0


def test_a_client_that_disconnects_leaves_the_queue_at_once(served):
    slow = served["slow"]
    slow.wait()
    body = json.dumps({"inputs": [0, 0, 0, 0]}).encode()
    with socket.create_connection(("127.0.0.1", slow.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while metric(slow.url, "engineflow_serve_queue_depth") < 1:  # it would wait 4 s for company
            time.sleep(0.02)
    start = time.monotonic()
    while metric(slow.url, "engineflow_serve_queue_depth") > 0:
        assert time.monotonic() - start < 3, "the item of a client that left stayed queued"
        time.sleep(0.02)
    assert metric(slow.url, 'engineflow_serve_requests_total{path="/predict",status="499"}') == 1


def test_a_full_queue_is_429_and_sigterm_answers_every_accepted_request(served):
    slow, expected = served["slow"], served["expected"]
    slow.wait()
    accepted: list[Any] = []
    senders = [threading.Thread(target=lambda i=i: accepted.append(
        (i, call(f"{slow.url}/predict", {"instances": SAMPLES[2 * i:2 * i + 2].tolist()})))) for i in range(2)]
    for sender in senders:
        sender.start()
    while metric(slow.url, "engineflow_serve_queue_depth") < 4:  # they wait 4 s for company
        time.sleep(0.02)
    status, headers, answer = call(f"{slow.url}/predict", {"inputs": [0, 0, 0, 0]})
    assert status == 429 and headers["retry-after"] == "1" and "the queue holds 4 of 4 items" in answer["error"]
    slow.process.send_signal(signal.SIGTERM)
    for sender in senders:
        sender.join(30)
    assert slow.process.wait(30) == 0
    assert sorted(i for i, _ in accepted) == [0, 1]
    for i, (status, _, answer) in accepted:
        assert status == 200
        assert torch.allclose(torch.tensor(answer["predictions"]), expected[2 * i:2 * i + 2], atol=1e-6, rtol=0)


def test_a_pipeline_serves_its_inference_stage_and_stage_picks_another(tmp_path):
    recipe = tmp_path / "pipeline.py"
    recipe.write_text(PIPELINE)
    runs = tmp_path / "runs"
    ef.run(recipe, device="cpu", runs_dir=runs, stream=io.StringIO())
    model = ef.load_run("last", runs_dir=runs).model
    with torch.no_grad():
        logits = model(SAMPLES)
    for stage, want in ((None, torch.softmax(logits, dim=1)), ("logits", logits)):
        server = ef.serve(recipe, runs_dir=runs, stage=stage, port=0, block=False, access_log=False, device="cpu")
        try:
            server.wait_ready()
            assert server.step == f"{stage or 'probabilities'} of stage {stage or 'probabilities'}"
            status, _, answer = call(f"{server.url}/predict", {"instances": SAMPLES.tolist()})
        finally:
            server.stop()
        assert status == 200 and torch.allclose(torch.tensor(answer["predictions"]), want, atol=1e-6, rtol=0)
    server = ef.serve(recipe, runs_dir=runs, stage="total", port=0, block=False, access_log=False, device="cpu")
    try:
        with pytest.raises(ef.RecipeError, match="the warm-up batch failed: RecipeError: infer step total of stage "
                                                 "total returned Tensor for a batch of 32"):
            server.wait_ready()
        status, _, answer = call(f"{server.url}/ready")
        assert status == 503 and answer["error"].startswith("the warm-up batch failed")
    finally:
        server.stop()
    done = invoke_cli(["serve", str(recipe), "--runs-dir", str(runs), "--stage", "fit", "--port", "0"])
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "stage 'fit' of pipeline.py has no infer step; serve an inference stage (logits, total, probabilities) or add "
        "ef.stage(..., infer=step)")


def test_the_readme_example_of_ef_serve_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    start = readme.index("From Python, `ef.serve(recipe, ...)`")
    code = re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"ef": ef}
    exec(compile(code.replace('"recipes/sine.py"', repr(str(REPO / "recipes/sine.py"))), "README.md", "exec"),
         namespace)
    server = namespace["server"]
    assert server.url.startswith("http://127.0.0.1:") and not server._thread.is_alive()
    assert (tmp_path / "runs" / "sine").is_dir()


@pytest.mark.slow
def test_workers_processes_answer_behind_one_port(served):
    server = Server(served["folder"], "workers", served["recipe"], "--workers", "2")
    try:
        server.wait()
        answers = together(*(lambda i=i: call(f"{server.url}/predict", {"inputs": SAMPLES[i].tolist()})
                             for i in range(6)))
        for i, (status, _, answer) in enumerate(answers):
            assert status == 200
            assert torch.allclose(torch.tensor(answer["predictions"]), served["expected"][i], atol=1e-6, rtol=0)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_without_the_serve_extra_serve_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the extra were not installed
    done = invoke_cli(["serve", "recipe.py"])
    assert done.exit_code == 2
    assert done.stderr.strip() == "error: serve needs the serve extra (uvicorn is missing): " \
                                  "pip install 'engineflow[serve]'"
