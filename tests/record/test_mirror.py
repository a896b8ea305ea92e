"""The MLflow mirror, against a real ``mlflow server`` (SQLite backend, temp dir) the tests start and stop.

The server tests are slow (the server takes ~10 s to start, once per session); they skip only when
mlflow is not installed (the lowest-versions job installs the test extra without it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from engineflow.record.outbox import Outbox
from tests.conftest import BASE_RECIPE, read_run

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'engineflow[mlflow]')")
# the server's background jobs and MLflow's usage telemetry are not what these tests exercise
QUIET = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

# BASE_RECIPE with 4 epochs and two hooks for the end-to-end tests: at the start of epoch PAUSE_EPOCH it
# writes the file PAUSED and waits while the file HOLD exists (a test stops the server or kills the run then).
PAUSING_RECIPE = BASE_RECIPE.replace("epochs=2", "epochs=4") + '''
import os, time
from pathlib import Path

@ef.on(ef.Events.EPOCH_STARTED)
def pause(state):
    hold = Path(os.environ.get("HOLD", "/nonexistent"))
    if state.epoch == int(os.environ.get("PAUSE_EPOCH", "0")) and hold.exists():
        Path(os.environ["PAUSED"]).touch()
        while hold.exists():
            time.sleep(0.05)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                   f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination", str(self.folder / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **QUIET},
                                        start_new_session=True)  # its own group: stop() ends its workers too
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with socket.socket() as sock:  # the port refuses connections from now on
            assert sock.connect_ex(("127.0.0.1", self.port)) != 0

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'engineflow[mlflow]')")
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    server = Server(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(mlflow_server: Server) -> Server:
    if mlflow_server.process is None or mlflow_server.process.poll() is not None:
        mlflow_server.start()  # a test that stopped it and failed before restarting it
    return mlflow_server


# ------------------------------------------------------------------------------------------------ helpers
def mlflow_run_of(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow" / "state.json").read_text())["run_id"]


def history(client, mlflow_run_id: str, names) -> dict[str, dict[int, float]]:
    """Every metric's points by step, the latest per step (a resumed run records an epoch again)."""
    found: dict[str, dict[int, float]] = {}
    for name in names:
        points = sorted(client.get_metric_history(mlflow_run_id, name), key=lambda m: m.timestamp)
        found[name] = {m.step: m.value for m in points}
    return found


def record_history(record: dict) -> dict[str, dict[int, float]]:
    found: dict[str, dict[int, float]] = {}
    for row in record["history"]:
        for name, value in row.items():
            if name != "epoch":
                found.setdefault(name, {})[row["epoch"]] = value
    return found


def assert_mirrors(client, run_dir: Path, status: str) -> str:
    """MLflow's run equals the run's record: params, every epoch's metrics, tags and status."""
    from engineflow.declare.configuration import flatten

    record = read_run(run_dir.parent.parent)
    run = client.get_run(mlflow_run_of(run_dir))
    assert run.info.status == status
    assert run.data.params == {k: str(v) for k, v in flatten(record["config"]).items()}
    expected = record_history(record)
    assert history(client, run.info.run_id, expected) == expected
    tags = run.data.tags
    assert tags["engineflow.run_id"] == record["id"] and tags["engineflow.experiment"] == record["experiment"]
    assert tags["engineflow.stage"] == "fit" and tags["engineflow.code_fingerprint"] == record["code"]["fingerprint"]
    assert record["mlflow"]["uri"] == client.tracking_uri
    return run.info.run_id


def pending(run_dir: Path) -> int:
    return len(Outbox(run_dir).pending())


def spawn(*args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "engineflow", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **QUIET, **env})


def wait_for(condition, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------- with a real server
@pytest.mark.slow
def test_mirror_equals_the_run_record_and_the_cli_uri_wins(server, cli, write_recipe, tmp_path):
    # the recipe names a server nobody runs; --mlflow names the real one and wins
    recipe = write_recipe(BASE_RECIPE.replace("epochs=2", "epochs=3") + '\nmlflow = "http://127.0.0.1:9"\n')
    result = cli("run", str(recipe), "--mlflow", server.uri)
    assert result.exit_code == 0, result.output
    assert "mirroring to MLflow at " + server.uri in result.output and "MLflow: mirrored to" in result.output
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    client = server.client()
    mlflow_id = assert_mirrors(client, run_dir, "FINISHED")
    assert pending(run_dir) == 0
    assert {a.path for a in client.list_artifacts(mlflow_id, "code/files")} == {"code/files/recipe.py"}
    assert [a.path for a in client.list_artifacts(mlflow_id, "checkpoints")] == ["checkpoints/best.pt"]
    synced = cli("runs", "sync", "--runs-dir", str(tmp_path / "runs"))
    assert synced.exit_code == 0 and "up to date" in synced.output


@pytest.mark.slow
def test_pushing_again_duplicates_nothing(server, cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE)
    assert cli("run", str(recipe), "--mlflow", server.uri).exit_code == 0
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    box = Outbox(run_dir)
    entries = len(box.pending(0))
    # a pusher that died before saving how far it got, or lost its state entirely: everything goes again
    box.save_state({**box.state(), "pushed": 0})
    first = cli("runs", "sync", "--runs-dir", str(tmp_path / "runs"))
    assert first.exit_code == 0 and f"pushed {entries} entries" in first.output, first.output
    box.state_path.unlink()
    again = cli("runs", "sync", run_dir.name, "--runs-dir", str(tmp_path / "runs"))
    assert again.exit_code == 0 and f"pushed {entries} entries" in again.output, again.output
    client = server.client()
    assert mlflow_run_of(run_dir) == assert_mirrors(client, run_dir, "FINISHED")
    experiment = client.get_experiment_by_name("recipe")
    same = client.search_runs([experiment.experiment_id], f"tags.`engineflow.run_id` = '{run_dir.name}'")
    assert len(same) == 1, "a lost state finds the MLflow run by its tag instead of making another"
    for name in ("train/loss", "valid/accuracy"):
        assert [m.step for m in client.get_metric_history(same[0].info.run_id, name)] == [1, 2]


@pytest.mark.slow
def test_a_failed_run_is_failed_in_mlflow(server, cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE.replace("epochs=2", "epochs=3").replace(
        "def train(batch, model, optimizer):",
        "def train(batch, model, optimizer, state):\n    if state.epoch == 2:\n        raise RuntimeError('boom')"))
    result = cli("run", str(recipe), "--mlflow", server.uri)
    assert result.exit_code == 1, result.output
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    assert read_run(tmp_path / "runs")["status"] == "failed"
    assert_mirrors(server.client(), run_dir, "FAILED")


@pytest.mark.slow
def test_training_goes_on_while_the_server_is_down_and_sync_completes_the_mirror(server, tmp_path):
    (tmp_path / "recipe.py").write_text(PAUSING_RECIPE)
    hold, paused = tmp_path / "hold", tmp_path / "paused"
    hold.touch()
    proc = spawn("run", "recipe.py", "--mlflow", server.uri, "--device", "cpu", cwd=tmp_path, HOLD=str(hold),
                 PAUSED=str(paused), PAUSE_EPOCH="2")
    try:
        wait_for(paused.exists, 120, "epoch 2")
        (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
        # between two requests, as a server mostly is (one that dies mid-request has MLflow's client
        # retry that request, in the background thread, and the run's end waits DRAIN_S at most)
        wait_for(lambda: pending(run_dir) == 0, 60, "the mirror to catch up")
        server.stop()
        resumed_at = time.monotonic()
        hold.unlink()
        output, _ = proc.communicate(timeout=120)
        ended_in = time.monotonic() - resumed_at
        assert proc.returncode == 0, output
        assert "entries pending" in output and "engineflow runs sync" in output, output
        record = read_run(tmp_path / "runs")
        assert record["status"] == "completed" and record["epochs"] == 4
        # 3 tiny epochs, the weights and the record: the mirror did not make training wait for the server
        assert ended_in < 8, f"training took {ended_in:.1f} s after the server stopped"
        assert pending(run_dir) > 0
        down = subprocess.run([sys.executable, "-m", "engineflow", "runs", "sync"], cwd=tmp_path, text=True,
                              capture_output=True, env={**os.environ, **QUIET}, timeout=60)
        assert down.returncode == 1 and f"could not reach {server.uri}" in down.stdout, down.stdout + down.stderr
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        server.start()
    up = subprocess.run([sys.executable, "-m", "engineflow", "runs", "sync"], cwd=tmp_path, text=True,
                        capture_output=True, env={**os.environ, **QUIET}, timeout=120)
    assert up.returncode == 0 and "pushed" in up.stdout, up.stdout + up.stderr
    assert pending(run_dir) == 0
    assert_mirrors(server.client(), run_dir, "FINISHED")


@pytest.mark.slow
def test_a_killed_run_is_killed_in_mlflow_and_resume_continues_the_same_mlflow_run(server, cli, tmp_path):
    (tmp_path / "recipe.py").write_text(PAUSING_RECIPE)
    hold, paused = tmp_path / "hold", tmp_path / "paused"
    hold.touch()
    proc = spawn("run", "recipe.py", "--mlflow", server.uri, "--device", "cpu", cwd=tmp_path, HOLD=str(hold),
                 PAUSED=str(paused), PAUSE_EPOCH="3")
    try:
        wait_for(paused.exists, 120, "epoch 3")
        (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
        wait_for(lambda: pending(run_dir) == 0 and (run_dir / "mlflow" / "state.json").exists(), 60,
                 "the first two epochs in MLflow")
        client = server.client()
        mlflow_id = mlflow_run_of(run_dir)
        assert client.get_run(mlflow_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert client.get_run(mlflow_id).info.status == "RUNNING", "nothing told MLflow yet"
    listed = cli("runs", "list", "--runs-dir", str(tmp_path / "runs"))
    assert listed.exit_code == 0 and "interrupted" in listed.output
    assert client.get_run(mlflow_id).info.status == "KILLED"
    assert_mirrors(client, run_dir, "KILLED")

    hold.unlink()
    resumed = cli("run", str(tmp_path / "recipe.py"), "--resume", "last", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert mlflow_run_of(run_dir) == mlflow_id
    assert_mirrors(client, run_dir, "FINISHED")
    run = client.get_run(mlflow_id)
    assert run.data.tags["engineflow.resumes"] == "1"
    assert sorted(history(client, mlflow_id, ["valid/accuracy"])["valid/accuracy"]) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- without a server
@needs_mlflow
def test_an_unreachable_server_never_fails_training_and_sync_says_why(cli, write_recipe, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    recipe = write_recipe(BASE_RECIPE + f"\nmlflow = {uri!r}\n")
    started = time.monotonic()
    result = cli("run", str(recipe))
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30
    assert "entries pending (could not reach" in result.output
    record = read_run(tmp_path / "runs")
    assert record["status"] == "completed" and record["mlflow"] == {"uri": uri}
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    ops = [entry["op"] for entry, _ in Outbox(run_dir).pending()]
    assert ops == ["start", "params", "artifacts", "metrics", "metrics", "artifacts", "tags", "status"]
    synced = cli("runs", "sync", "--runs-dir", str(tmp_path / "runs"))
    assert synced.exit_code == 1
    assert synced.output.startswith(f"{run_dir.name}: could not reach {uri}: ") and "8 entries pending" in synced.output


@needs_mlflow
def test_a_run_found_dead_gets_killed_queued_once(cli, write_recipe, tmp_path):
    from engineflow.record.runs import update_record
    from engineflow.record.store import RunStore

    uri = f"http://127.0.0.1:{free_port()}"
    assert cli("run", str(write_recipe(BASE_RECIPE)), "--mlflow", uri).exit_code == 0
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with RunStore.open(tmp_path / "runs") as store:  # as if the process had been SIGKILLed mid-run
        update_record(store, store.get_run(run_dir.name),
                      {"status": "running", "pid": dead.pid, "hostname": socket.gethostname()})
    for _ in range(2):
        assert cli("runs", "list", "--runs-dir", str(tmp_path / "runs")).exit_code == 0
    statuses = [entry["status"] for entry, _ in Outbox(run_dir).pending(0) if entry["op"] == "status"]
    assert statuses == ["FINISHED", "KILLED"]


@needs_mlflow
def test_a_run_first_mirrored_when_resumed_brings_its_earlier_epochs(cli, write_recipe, tmp_path):
    fail = tmp_path / "fail"
    fail.touch()
    recipe = write_recipe(BASE_RECIPE.replace("epochs=2", "epochs=3").replace(
        "def train(batch, model, optimizer):",
        f"def train(batch, model, optimizer, state):\n    if state.epoch == 2 and __import__('os').path.exists("
        f"{str(fail)!r}):\n        raise RuntimeError('boom')"))
    assert cli("run", str(recipe)).exit_code == 1
    fail.unlink()
    uri = f"http://127.0.0.1:{free_port()}"
    assert cli("run", str(recipe), "--resume", "last", "--mlflow", uri).exit_code == 0
    (run_dir,) = (tmp_path / "runs" / "recipe").iterdir()
    entries = [entry for entry, _ in Outbox(run_dir).pending()]
    assert [e["step"] for e in entries if e["op"] == "metrics"] == [1, 2, 3]
    assert entries[0]["op"] == "start" and entries[-1] == {**entries[-1], "op": "status", "status": "FINISHED"}
    assert read_run(tmp_path / "runs")["mlflow"] == {"uri": uri}


def test_the_setting_and_the_flags_are_checked_before_anything_is_recorded(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE + "\nmlflow = 5\n")
    result = cli("run", str(recipe))
    assert result.exit_code == 2 and "'mlflow' must be an MLflow tracking URI" in result.output
    both = cli("run", str(recipe), "--mlflow", "http://127.0.0.1:1", "--no-mlflow")
    assert both.exit_code == 2 and "exclude each other" in both.output
    plain = write_recipe(BASE_RECIPE, name="plain.py")
    for bad in ("not a uri", "localhost:5000", "http://", "./mlruns"):
        result = cli("run", str(plain), "--mlflow", bad)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (f"error: --mlflow {bad!r} is not an MLflow tracking URI: give a server's "
                                         "http://HOST:PORT (or https://), a file:///path, a database such as "
                                         "sqlite:///mlflow.db, or databricks")
    named = cli("run", str(write_recipe(BASE_RECIPE + '\nmlflow = "mlflow server"\n', name="named.py")))
    assert named.exit_code == 2 and "named.py: 'mlflow' 'mlflow server' is not an MLflow tracking URI" in named.output
    assert not list((tmp_path / "runs").glob("*/*/run.json"))  # nothing recorded
    off = cli("run", str(recipe), "--no-mlflow")  # the recipe's setting is not even read
    assert off.exit_code == 0, off.output
    assert "mlflow" not in read_run(tmp_path / "runs")
    assert not list((tmp_path / "runs" / "recipe").glob("*/mlflow"))


def test_without_mlflow_installed_a_mirror_is_a_clear_error(cli, write_recipe, tmp_path, monkeypatch):
    import engineflow.record.mirror as mirror

    monkeypatch.setattr(mirror.importlib.util, "find_spec", lambda name: None)
    result = cli("run", str(write_recipe(BASE_RECIPE)), "--mlflow", "http://127.0.0.1:1")
    assert result.exit_code == 2 and "pip install 'engineflow[mlflow]'" in result.output
    assert not (tmp_path / "runs" / "recipe").exists()


def test_outbox_skips_a_torn_line_and_appends_after_it(tmp_path):
    box = Outbox(tmp_path)
    box.open("http://a")
    box.append({"op": "metrics", "step": 1, "time": 1, "values": {"loss": 1.0}})
    with box.path.open("a") as out:
        out.write('{"op": "metr')  # a process killed mid-append
    assert [e["step"] for e, _ in box.pending()] == [1], "a line without its newline is not there yet"
    assert box.open("http://a") is False
    box.append({"op": "metrics", "step": 2, "time": 2, "values": {"loss": 0.5}})
    assert [e["step"] for e, _ in box.pending()] == [1, 2]
    first_end = box.pending()[0][1]
    assert [e["step"] for e, _ in box.pending(first_end)] == [2]
    box.save_state({**box.state(), "pushed": first_end})
    assert box.open("http://b") is True, "another server gets the whole outbox"
    assert box.state()["pushed"] == 0


def test_sync_of_a_run_that_does_not_mirror_says_so(cli, write_recipe, tmp_path):
    assert cli("run", str(write_recipe(BASE_RECIPE))).exit_code == 0
    runs_dir = str(tmp_path / "runs")
    everything = cli("runs", "sync", "--runs-dir", runs_dir)
    assert everything.exit_code == 0 and everything.output.strip() == "no run mirrors to MLflow"
    one = cli("runs", "sync", "last", "--runs-dir", runs_dir)
    assert one.exit_code == 2 and "does not mirror to MLflow" in one.output


def test_the_library_and_the_commands_that_mirror_nothing_never_import_mlflow(tmp_path):
    commands = ("import sys; from click.testing import CliRunner; import engineflow; "
                "from engineflow.app.cli import main; CliRunner().invoke(main, ['--help']); "
                f"r = CliRunner().invoke(main, ['runs', 'list', '--runs-dir', {str(tmp_path)!r}]); "
                f"q = CliRunner().invoke(main, ['runs', 'sync', '--runs-dir', {str(tmp_path)!r}]); "
                "print(r.exit_code, q.exit_code, 'mlflow' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", commands], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0", "False", "False"], "runs list and runs sync of nothing mirrored load neither"
    library = "import sys, engineflow.app.runner, engineflow.record.mirror; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", library], capture_output=True, text=True,
                          check=True).stdout.split() == ["False"]
