"""Faults around the records: a full disk, a read-only or missing runs folder, a finish that fails,
a process killed during setup(). Real filesystems where this machine lets the tests mount them (a
small tmpfs, a read-only bind mount), else the process's file size limit (RLIMIT_FSIZE) and modes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engineflow.record.store import DB_NAME, RunStore
from engineflow.state.checkpoint_files import verify
from tests.conftest import BASE_RECIPE, REPO, read_run

TEST_LOADER = ('"valid": DataLoader(data, batch_size=cfg.batch_size)})',
               '"valid": DataLoader(data, batch_size=cfg.batch_size), "test": DataLoader(data, batch_size=4)})')


def as_json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def mount(*args: str) -> bool:
    """Run mount(8); False when this process may not (not root, no CAP_SYS_ADMIN, no mount command)."""
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


class SmallDisk:
    """A folder with little room: a real 2 MiB tmpfs when this process may mount one, else a plain
    folder whose ``engineflow`` subprocesses get a 2 MiB file size limit (RLIMIT_FSIZE).

    ``fill()`` leaves no room at all, ``free()`` gives room back.
    """

    SIZE = 2 << 20

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.mounted = mount("-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(folder))
        self.limit: int | None = None if self.mounted else self.SIZE

    def fill(self) -> None:
        if not self.mounted:
            self.limit = 1
            return
        with (self.folder / "filler").open("wb", buffering=0) as out, contextlib.suppress(OSError):
            while True:
                out.write(b"x" * 65536)

    def free(self) -> None:
        if self.mounted:
            (self.folder / "filler").unlink(missing_ok=True)
            assert mount("-o", "remount,size=64m", str(self.folder))
        self.limit = None

    def engineflow(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The ``engineflow`` command in a subprocess, with the file size limit when there is one."""
        limit = self.limit

        def limited() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        return subprocess.run([sys.executable, "-m", "engineflow", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300, preexec_fn=limited,
                              env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **(env or {})})


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    if disk.mounted:
        unmount(disk.folder)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def recorded_run(runs: Path, run_id: str, **fields: Any) -> dict[str, Any]:
    """A run as the runner records it: its folder with run.json, and its row in the index."""
    folder = runs / "recipe" / run_id
    folder.mkdir(parents=True)
    record = {"id": run_id, "experiment": "recipe", "status": "completed", "started_at": f"2026-11-23T08:{run_id}",
              "config": {"lr": 0.1}, "metrics": {}, "best": {}, "run_dir": str(folder), "code": {},
              "artifacts": {}, "resumes": [], "pid": None, "hostname": socket.gethostname(), **fields}
    (folder / "run.json").write_text(json.dumps(record, indent=2))
    (folder / "metrics.jsonl").touch()
    with RunStore.open(runs) as store:
        store.upsert_run(record)
    return record


# ------------------------------------------------------------------------------------------- item 10
def test_a_config_value_tensorboard_cannot_hold_is_written_as_text(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE)
    result = cli("run", str(recipe), "--check", "--set", "epochs=99999999999999999999")
    assert result.exit_code == 0, result.output
    record = read_run(tmp_path / "runs")
    assert record["status"] == "completed" and record["error"] is None
    run_dir = Path(record["run_dir"])
    assert record["artifacts"] == {"weights_best": "checkpoints/best.pt", "weights_last": "checkpoints/last.pt"}
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tb" / "hparams"))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["epochs"].string_value == "99999999999999999999" and hparams["lr"].number_value == 0.1


def test_a_weights_file_that_cannot_be_written_fails_the_run_and_its_mirror_hears_it(cli, write_recipe, tmp_path):
    # the run's end cannot write last.pt (a folder is in its place); MLflow's server is down, its outbox says
    # (where the mlflow extra is installed: the lowest-versions job runs without it)
    mirrored = importlib.util.find_spec("mlflow") is not None
    recipe = write_recipe(BASE_RECIPE + ('\nmlflow = "http://127.0.0.1:9"\n' if mirrored else "") + '''
from pathlib import Path

@ef.on(ef.Events.COMPLETED)
def block_last_pt(run):
    if Path(__file__).with_name("block").exists():
        (run.run_dir / "checkpoints" / "last.pt").mkdir(parents=True)
''')
    (tmp_path / "block").touch()
    result = cli("run", str(recipe))
    assert result.exit_code == 1
    last_pt = tmp_path / "runs" / "recipe"
    errors = [line for line in result.stderr.splitlines() if not line.startswith("MLflow")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {last_pt}"), result.stderr
    assert errors[0].endswith("checkpoints/last.pt: Is a directory")
    record = read_run(tmp_path / "runs")
    assert record["status"] == "failed" and record["error"] == "WriteError: " + errors[0].removeprefix("error: ")
    assert record["artifacts"] == {"weights_best": "checkpoints/best.pt"}, "best.pt is still exported"
    shown = as_json(cli("runs", "show", "last", "--runs-dir", str(tmp_path / "runs"), "--json"))
    assert shown["status"] == "failed" and shown["error"] == record["error"]
    if mirrored:
        lines = (Path(record["run_dir"]) / "mlflow" / "outbox.jsonl").read_text().splitlines()
        statuses = [entry["status"] for entry in map(json.loads, lines) if entry["op"] == "status"]
        assert statuses == ["FAILED"]

    (tmp_path / "block").unlink()
    (Path(record["run_dir"]) / "checkpoints" / "last.pt").rmdir()
    resumed = cli("run", str(recipe), "--resume", "last")
    assert resumed.exit_code == 0, resumed.output
    record = read_run(tmp_path / "runs")
    assert record["status"] == "completed" and record["error"] is None
    assert (Path(record["run_dir"]) / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------------------- item 14
DISK_RECIPE = BASE_RECIPE.replace("epochs=2", "epochs=3").replace(
    "    model = torch.nn.Linear(4, 2)\n",
    "    model = torch.nn.Linear(4, 2)\n    model.register_buffer('ballast', torch.zeros(1))\n") + '''

@ef.on(ef.Events.EPOCH_COMPLETED, order=-50)
def grow(state, model):
    if state.epoch == 2:  # from now on a checkpoint takes 4 MiB: more than the disk has
        model.ballast = torch.zeros(1 << 20)
'''


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_resume_completes_once_space_is_back(small_disk, write_recipe,
                                                                                          cli):
    recipe = write_recipe(DISK_RECIPE)
    runs = small_disk.folder
    done = small_disk.engineflow("run", str(recipe), "--runs-dir", str(runs), cwd=recipe.parent)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()  # no traceback, no atexit report
    record = read_run(runs)
    state = Path(record["run_dir"]) / "checkpoints" / "state"
    assert line.startswith(f"error: No space left on device while writing {state / 'state-000000006.pt'}"), line
    assert record["status"] == "failed" and record["error"] == "DiskFullError: " + line.removeprefix("error: ")
    assert record["pid"] is None and record["ended_at"] is not None
    assert [p for p in runs.rglob("*") if ".tmp" in p.name] == [], "no temporary file left"
    assert [p.name for p in sorted(state.glob("state-*"))] == ["state-000000003.pt", "state-000000003.pt.xxh3"]
    assert verify(state / "state-000000003.pt") is None, "the epoch-1 checkpoint is intact"
    shown = as_json(cli("runs", "show", "last", "--runs-dir", str(runs), "--json"))
    assert shown["status"] == "failed" and shown["error"] == record["error"]

    small_disk.free()
    resumed = small_disk.engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last",
                                    cwd=recipe.parent)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from checkpoint state-000000003.pt" in resumed.stdout
    record = read_run(runs)
    assert record["status"] == "completed" and record["error"] is None
    assert [row["epoch"] for row in record["history"]] == [1, 2, 3]
    for name in ("best.pt", "last.pt"):
        assert (Path(record["run_dir"]) / "checkpoints" / name).is_file()


# ------------------------------------------------------------------------------------------- item 15
def test_runs_list_on_a_full_disk_lists_the_runs(small_disk, cli):
    runs = small_disk.folder
    recorded_run(runs, "20261123-080000-done")
    recorded_run(runs, "20261123-090000-dead", status="running", pid=dead_pid())
    small_disk.fill()
    if small_disk.mounted:
        listed = cli("runs", "list", "--runs-dir", str(runs), "--json")
        assert listed.exit_code == 0, listed.output
        output = listed.stdout
    else:
        done = small_disk.engineflow("runs", "list", "--runs-dir", str(runs), "--json", cwd=runs)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        output = done.stdout
    assert [(r["id"], r["status"]) for r in json.loads(output)] == [
        ("20261123-090000-dead", "interrupted"), ("20261123-080000-done", "completed")]
    small_disk.free()
    assert [p for p in runs.rglob("*") if ".tmp" in p.name] == []
    shown = as_json(cli("runs", "show", "20261123-090000-dead", "--runs-dir", str(runs), "--json"))
    assert shown["status"] == "interrupted"


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` seen read-only: a read-only bind mount where this process may make one, else
    (not root) the folder with its write permissions taken away."""
    view = folder.with_name(folder.name + "-ro")
    view.mkdir()
    if mount("--bind", str(folder), str(view)):
        try:
            assert mount("-o", "remount,bind,ro", str(view))
            yield view
        finally:
            unmount(view)
        return
    if os.geteuid() == 0:
        pytest.skip("root without permission to mount: no way to make a folder read-only for this process")
    view.rmdir()
    modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~0o222)
    try:
        yield folder
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_a_read_only_runs_folder_lists_shows_and_tests_without_writing(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE.replace(*TEST_LOADER))
    runs = tmp_path / "runs"
    assert cli("run", str(recipe)).exit_code == 0
    (trained,) = as_json(cli("runs", "list", "--runs-dir", str(runs), "--json"))
    recorded_run(runs, "20261123-090000-dead", status="running", pid=dead_pid())
    db_before = (runs / DB_NAME).read_bytes()
    with read_only(runs) as view:
        listed = as_json(cli("runs", "list", "--runs-dir", str(view), "--json"))
        assert [(r["id"], r["status"]) for r in listed] == [(trained["id"], "completed"),
                                                            ("20261123-090000-dead", "interrupted")]
        shown = as_json(cli("runs", "show", trained["id"], "--runs-dir", str(view), "--json"))
        assert shown["history"] and shown["status"] == "completed"
        tested = cli("test", str(recipe), "--runs-dir", str(view), "--json")
        assert tested.exit_code == 0, tested.output
        result = json.loads(tested.stdout)
        assert result["run"] == trained["id"] and set(result["metrics"]) == {"test/accuracy"}
        assert result["stored"] is False
        assert tested.stderr.startswith(f"note: the metrics were not stored with run {trained['id']}: ")
    assert (runs / DB_NAME).read_bytes() == db_before
    with RunStore.open(runs) as store:
        assert store.get_run("20261123-090000-dead")["status"] == "interrupted"  # as seen: still stale
        assert "test/accuracy" not in store.get_run(trained["id"])["metrics"]


def test_runs_list_of_a_folder_that_does_not_exist_creates_nothing(cli, tmp_path):
    missing = tmp_path / "no-such-runs"
    listed = cli("runs", "list", "--runs-dir", str(missing))
    assert listed.exit_code == 0
    assert listed.stderr == f"no runs: the runs folder {missing} does not exist (--runs-dir or " \
                            "$ENGINEFLOW_RUNS_DIR names another)\n"
    listed = cli("runs", "list", "--runs-dir", str(missing), "--json")
    assert listed.exit_code == 0 and listed.stdout == "[]\n" and listed.stderr == ""
    shown = cli("runs", "show", "last", "--runs-dir", str(missing))
    assert shown.exit_code == 2 and shown.stderr == f"error: no runs: the runs folder {missing} does not exist " \
                                                     "(--runs-dir or $ENGINEFLOW_RUNS_DIR names another)\n"
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert as_json(cli("runs", "list", "--runs-dir", str(empty), "--json")) == []
    assert list(empty.iterdir()) == [], "reading creates no index"


# ------------------------------------------------------------------------------------------- item 17
SETUP_STUCK = BASE_RECIPE.replace("def setup(cfg):", '''def setup(cfg, run):
    import os, time
    from pathlib import Path
    (Path(os.environ["READY"]) / str(os.getpid())).write_text(str(run.run_dir))
    time.sleep(120)''')


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_folder_left_by_a_setup_killed_outright_is_removed_by_the_next_command(cli, write_recipe, tmp_path):
    from engineflow.record.setups import claim, release

    recipe = write_recipe(SETUP_STUCK)
    runs, ready = tmp_path / "runs", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "READY": str(ready), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "engineflow", "run", str(recipe), "--runs-dir", str(runs)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for((ready / str(proc.pid)).exists, "setup() to start")
        killed = Path((ready / str(proc.pid)).read_text())
        assert killed.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed.is_dir(), "SIGKILL leaves the folder"
    live = runs / "recipe" / "20261123-080000-live"
    claim(live)  # this process, alive, is in a setup() of its own
    assert as_json(cli("runs", "list", "--runs-dir", str(runs), "--json")) == []
    assert not killed.exists(), "the next command removed the abandoned folder"
    assert live.is_dir(), "the folder of a setup() still running is kept"
    live.rmdir()
    release(live)
    assert cli("runs", "list", "--runs-dir", str(runs)).exit_code == 0
    assert sorted(p.name for p in runs.iterdir()) == [DB_NAME, "recipe"], "no note left"


@pytest.mark.parametrize("named", ["../outside", "recipe/../../outside", "/tmp/outside", "recipe/.", "a/b/c"])
def test_a_setup_note_naming_a_folder_outside_the_runs_folder_removes_nothing(cli, tmp_path, named):
    """A note in runs/.setup/ is only ever a pointer to <runs>/<experiment>/<id>: a crafted one that
    names another folder (a dead pid, this host) leaves that folder alone."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (runs / ".setup").mkdir(parents=True)
    stem = Path(named).name or "x"
    (runs / ".setup" / f"{stem}.json").write_text(json.dumps({"run_dir": named, "pid": dead_pid(),
                                                              "hostname": socket.gethostname()}))
    assert cli("runs", "list", "--runs-dir", str(runs)).exit_code == 0
    assert (outside / "keep").is_dir()
