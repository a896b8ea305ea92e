"""The run index: real SQLite files in tmp_path, real processes writing, killed and racing."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from engineflow.errors import RecipeError
from engineflow.record.store import (
    DB_NAME,
    SCHEMA_VERSION,
    AmbiguousRunError,
    NewerStoreError,
    RunStore,
    StoreError,
    UnknownRunError,
    UnusableStoreError,
    is_stale,
    rebuild,
    reindex,
)

HOST = socket.gethostname()


def record(run_id: str, experiment: str = "digits", *, status: str = "completed", minute: int = 0,
           **extra: Any) -> dict[str, Any]:
    """A run record shaped like the runner's, started at 08:<minute> UTC."""
    return {
        "id": run_id, "experiment": experiment, "status": status,
        "started_at": f"2026-11-23T08:{minute:02d}:12.123456+00:00", "ended_at": None,
        "config": {"lr": 0.1, "layers": [64, 32], "name": "mlp"}, "seed": 0,
        "metrics": {"valid/accuracy": 0.97, "train/loss": 0.12},
        "best": {"metric": "valid/accuracy", "mode": "max", "epoch": 2, "value": 0.98},
        "run_dir": f"/nowhere/{experiment}/{run_id}", "recipe": "/nowhere/digits.py",
        "code": {"fingerprint": f"fp-{run_id}", "git_commit": None, "dirty": False},
        "env": {"python": "3.11", "torch": "2.4", "device": "cpu", "hostname": HOST},
        "pid": os.getpid(), "hostname": HOST, "heartbeat_at": None, "error": None,
        "artifacts": {"checkpoint_best": "checkpoints/best.pt"}, "resumes": [],
        **extra,
    }


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with RunStore.open(tmp_path / "runs") as opened:
        yield opened


# ------------------------------------------------------------------------------------------ records and metrics
def test_record_and_history_round_trip(store: RunStore) -> None:
    original = record("r1", unknown_key={"nested": [1, 2.5, None, "ü"]}, ended_at="2026-11-23T09:00:00+00:00")
    store.upsert_run(original)
    # epochs logged out of order, in several batches: the history is sorted by epoch
    store.log_metrics("r1", [(2, "train/loss", 0.25), (2, "valid/accuracy", 0.98)])
    store.log_metrics("r1", [(1, "train/loss", 0.5), (1, "valid/accuracy", 0.9)])
    got = store.get_run("r1")
    assert got.pop("history") == [{"epoch": 1, "train/loss": 0.5, "valid/accuracy": 0.9},
                                  {"epoch": 2, "train/loss": 0.25, "valid/accuracy": 0.98}]
    assert got == original
    # a record read back (history included) can be written back as it is
    store.upsert_run({**store.get_run("r1"), "status": "failed"})
    assert store.get_run("r1")["status"] == "failed"
    assert len(store.get_run("r1")["history"]) == 2


def test_metrics_upsert_and_nan(store: RunStore) -> None:
    store.upsert_run(record("r1"))
    store.log_metrics("r1", [(1, "train/loss", 0.5)])
    store.log_metrics("r1", [(1, "train/loss", 0.4), (1, "train/grad", float("nan")), (1, "x", None)])
    assert store.get_run("r1")["history"] == [{"epoch": 1, "train/loss": 0.4, "train/grad": None, "x": None}]
    store.log_metrics("r1", [])  # nothing to write is not an error


def test_bad_writes_are_refused(store: RunStore) -> None:
    with pytest.raises(UnknownRunError, match="'nope'"):
        store.log_metrics("nope", [(1, "loss", 1.0)])
    store.upsert_run(record("r1"))
    with pytest.raises(TypeError, match="epoch must be an int"):
        store.log_metrics("r1", [("1", "loss", 1.0)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'status' must be one of"):
        store.upsert_run(record("r2", status="done"))
    with pytest.raises(ValueError, match="'id'"):
        store.update_run("r1", id="other")
    with pytest.raises(UnknownRunError):
        store.update_run("nope", status="failed")
    assert issubclass(UnknownRunError, RecipeError)  # the CLI exits 2 with the message


def test_update_run_merges_fields_and_columns(store: RunStore) -> None:
    store.upsert_run(record("r1", status="running"))
    assert store.find_completed("fp-r1") == []
    updated = store.update_run("r1", status="completed", ended_at="2026-11-23T09:00:00+00:00",
                               metrics={"valid/accuracy": 0.99})
    assert store.get_run("r1") == {**updated, "history": []}
    assert updated["metrics"] == {"valid/accuracy": 0.99} and updated["config"]["lr"] == 0.1
    assert [r["id"] for r in store.find_completed("fp-r1")] == ["r1"]
    assert [r["id"] for r in store.list_runs(status="completed")] == ["r1"]


def test_delete_run_removes_row_and_metrics(store: RunStore) -> None:
    store.upsert_run(record("r1"))
    store.log_metrics("r1", [(1, "loss", 1.0)])
    store.delete_run("r1")
    with pytest.raises(UnknownRunError):
        store.get_run("r1")
    store.upsert_run(record("r1"))  # same id again: no metrics left over from the deleted run
    assert store.get_run("r1")["history"] == []
    with pytest.raises(UnknownRunError):
        store.delete_run("never")


# ------------------------------------------------------------------------------------------ resolve and list
def test_resolve(store: RunStore) -> None:
    store.upsert_run(record("20261123-080000-aaaa", minute=0))
    store.upsert_run(record("20261123-080500-aabb", minute=5))
    store.upsert_run(record("20261123-081000-cccc", "sine", minute=10))
    assert store.resolve("last")["id"] == "20261123-081000-cccc"
    assert store.resolve("last", experiment="digits")["id"] == "20261123-080500-aabb"
    assert store.resolve("20261123-080000-aaaa")["id"] == "20261123-080000-aaaa"
    assert store.resolve("20261123-0805")["history"] == []
    with pytest.raises(AmbiguousRunError, match=r"matches 2 runs.*080500-aabb.*080000-aaaa"):
        store.resolve("20261123-080")
    with pytest.raises(UnknownRunError, match=r"'zzz'.*recent runs: 20261123-081000-cccc"):
        store.resolve("zzz")
    with pytest.raises(UnknownRunError, match="belongs to experiment 'sine', not 'digits'"):
        store.resolve("20261123-081000-cccc", experiment="digits")
    with pytest.raises(UnknownRunError, match="no runs of experiment 'other' yet"):
        store.resolve("last", experiment="other")
    with pytest.raises(UnknownRunError):
        store.resolve("")


def test_list_filters_and_newest_first(store: RunStore) -> None:
    store.upsert_run(record("a", minute=1))
    store.upsert_run(record("b", "sine", status="failed", minute=2))
    store.upsert_run(record("c", minute=3))
    # 08:00 at +01:00 is 07:00 UTC: the oldest, whatever its string says
    store.upsert_run(record("d", started_at="2026-11-23T08:30:00+01:00"))
    assert [r["id"] for r in store.list_runs()] == ["c", "b", "a", "d"]
    assert [r["id"] for r in store.list_runs(experiment="digits")] == ["c", "a", "d"]
    assert [r["id"] for r in store.list_runs(status="failed")] == ["b"]
    assert store.list_runs(experiment="sine", status="completed") == []
    assert "history" not in store.list_runs()[0]


# ------------------------------------------------------------------------------------------ stale runs
def test_stale_runs_are_reported_interrupted(store: RunStore) -> None:
    now = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
    old, fresh = (now - timedelta(minutes=10)).isoformat(), (now - timedelta(seconds=20)).isoformat()
    assert is_stale(record("x", status="running", pid=dead_pid()), now)
    assert not is_stale(record("x", status="running"), now)  # this very process
    assert not is_stale(record("x", status="completed", pid=dead_pid()), now)
    assert is_stale(record("x", status="running", hostname="far", heartbeat_at=old), now)
    assert not is_stale(record("x", status="running", hostname="far", heartbeat_at=fresh), now)
    assert not is_stale(record("x", status="running", hostname="far", pid=dead_pid()), now)  # no heartbeat: unknown

    store.upsert_run(record("dead", status="running", pid=dead_pid()))
    store.upsert_run(record("alive", status="running"))
    store.upsert_run(record("remote", status="running", hostname="far"))
    store.heartbeat("remote", at=datetime.now(timezone.utc) - timedelta(hours=1))
    seen = {r["id"]: r for r in store.list_runs()}
    assert {k: r["status"] for k, r in seen.items()} == {"dead": "interrupted", "alive": "running",
                                                         "remote": "interrupted"}
    assert "no sign of life" in seen["dead"]["error"]
    assert [r["id"] for r in store.list_runs(status="running")] == ["alive"]
    assert store.get_run("dead")["status"] == "interrupted"
    # reads write nothing: the caller updates each run.json, then the index
    stale = store.stale_runs()
    assert sorted((r["id"], r["status"]) for r in stale) == [("dead", "running"), ("remote", "running")]
    for rec in stale:
        store.upsert_run({**rec, "status": "interrupted", "error": "killed"})
    assert store.stale_runs() == []
    assert store.get_run("dead")["error"] == "killed"

    store.upsert_run(record("dead2", status="running", pid=dead_pid()))
    [marked] = store.mark_stale()  # or persist in the index alone
    assert marked["id"] == "dead2" and {**marked, "history": []} == store.get_run("dead2")
    assert store.stale_runs() == [] and store.mark_stale() == []
    store.heartbeat("alive")
    assert store.get_run("alive")["heartbeat_at"] is not None


# ------------------------------------------------------------------------------------------ processes
WRITER = """
import os, sys, time
from pathlib import Path
from engineflow.record.store import RunStore
runs, name = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
while not (runs / "go").exists():
    time.sleep(0.005)
with RunStore.open(runs) as store:
    store.upsert_run({"id": name, "experiment": "race", "status": "running", "pid": os.getpid(),
                      "started_at": "2026-11-23T08:00:00+00:00"})
    for epoch in range(1, 51):
        store.log_metrics(name, [(epoch, f"m{i}", epoch + i / 10) for i in range(4)])
    store.update_run(name, status="completed")
"""


def test_four_processes_write_at_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    # the database does not exist yet: the four also race to create and migrate it
    procs = [python(WRITER, str(runs), f"run{i}") for i in range(4)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 4  # type: ignore[union-attr]
    (runs / "go").touch()  # all four are started: they open and write at the same moment
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert results == [(0, "")] * 4
    with RunStore.open(runs) as store:
        listed = store.list_runs()
        assert sorted((r["id"], r["status"]) for r in listed) == [(f"run{i}", "completed") for i in range(4)]
        for i in range(4):
            history = store.get_run(f"run{i}")["history"]
            assert [h["epoch"] for h in history] == list(range(1, 51))
            assert all(h == {"epoch": h["epoch"], **{f"m{k}": h["epoch"] + k / 10 for k in range(4)}}
                       for h in history)


KILLED = """
import os, socket, sys, time
from pathlib import Path
from engineflow.record.store import RunStore
store = RunStore.open(Path(sys.argv[1]))
store.upsert_run({"id": "victim", "experiment": "crash", "status": "running", "pid": os.getpid(),
                  "hostname": socket.gethostname(), "started_at": "2026-11-23T08:00:00+00:00"})
store.log_metrics("victim", [(1, "train/loss", 0.5)])
with store._writing() as conn:  # killed inside an open write transaction
    conn.execute("INSERT INTO metrics VALUES ('victim', 2, 'train/loss', 0.25)")
    print("ready", flush=True)
    time.sleep(60)
"""


def test_sigkill_mid_write_leaves_a_usable_store(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = python(KILLED, str(runs))
    try:
        assert proc.stdout.readline() == "ready\n"  # type: ignore[union-attr]
        with RunStore.open(runs) as store:  # WAL: reading while another process holds the write lock
            assert [r["status"] for r in store.list_runs()] == ["running"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)  # reaped, so its pid is dead rather than a zombie
    assert proc.returncode == -signal.SIGKILL
    with RunStore.open(runs) as store:
        [run] = store.list_runs()
        assert run["id"] == "victim" and run["status"] == "interrupted"
        assert f"pid {proc.pid}" in run["error"]
        assert [r["id"] for r in store.stale_runs()] == ["victim"]  # for the caller to settle its run.json
        assert store.get_run("victim")["history"] == [{"epoch": 1, "train/loss": 0.5}]  # the open write is gone
        store.log_metrics("victim", [(2, "train/loss", 0.3)])  # and the write lock with it


def test_forked_child_gets_its_own_connection(store: RunStore) -> None:
    store.upsert_run(record("r1"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            store.log_metrics("r1", [(1, "child", 1.0)])
            store.close()
        finally:
            os._exit(0 if store.path.exists() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.log_metrics("r1", [(1, "parent", 2.0)])
    assert store.get_run("r1")["history"] == [{"epoch": 1, "child": 1.0, "parent": 2.0}]


def test_heartbeats_from_a_thread_while_the_main_thread_writes(store: RunStore) -> None:
    store.upsert_run(record("r1", status="running"))
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            store.heartbeat("r1")

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        for epoch in range(1, 21):
            store.log_metrics("r1", [(epoch, "loss", 1 / epoch)])
    finally:
        done.set()
        thread.join()
    run = store.get_run("r1")
    assert len(run["history"]) == 20 and run["heartbeat_at"] is not None and run["status"] == "running"


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path)
    store.close()
    with pytest.raises(ValueError, match="is closed"):
        store.list_runs()


# ------------------------------------------------------------------------------------------ damaged files
def assert_clear(err: StoreError, path: Path) -> None:
    message = str(err)
    assert str(path) in message and "engineflow runs reindex" in message and "Traceback" not in message


def test_random_bytes_are_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    db.write_bytes(os.urandom(8192))
    with pytest.raises(UnusableStoreError) as caught:
        RunStore(db)
    assert_clear(caught.value, db)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_garbled_store_is_a_clear_error(tmp_path: Path) -> None:
    with RunStore.open(tmp_path) as store:
        store.upsert_run(record("r1"))
    db = tmp_path / DB_NAME
    data = bytearray(db.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # header intact, schema and rows destroyed
    db.write_bytes(bytes(data))
    with pytest.raises(UnusableStoreError) as caught:
        RunStore(db).list_runs()
    assert_clear(caught.value, db)


def test_text_file_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    db.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(UnusableStoreError, match="not an engineflow database") as caught:
        RunStore(db)
    assert_clear(caught.value, db)


def test_foreign_sqlite_database_is_a_clear_error_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    before = db.read_bytes()
    with pytest.raises(UnusableStoreError, match=r"another application \(tables: invoices\)") as caught:
        RunStore(db)
    assert_clear(caught.value, db)
    assert db.read_bytes() == before  # not switched to WAL, not migrated


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path):
        pass
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(NewerStoreError, match="created by a newer engineflow") as caught:
        RunStore.open(tmp_path)
    assert str(tmp_path / DB_NAME) in str(caught.value)
    with pytest.raises(NewerStoreError):
        rebuild(tmp_path)  # never moved aside: the newer engineflow still needs it


def test_rebuild_moves_an_unusable_file_aside(tmp_path: Path) -> None:
    write_folder(tmp_path, record("r1"), [(1, "loss", 0.5)])
    (tmp_path / DB_NAME).write_text("junk")
    rebuilt = rebuild(tmp_path)
    assert rebuilt.runs == 1 and rebuilt.problems == () and rebuilt.moved_aside is not None
    assert rebuilt.moved_aside.read_text() == "junk"
    with RunStore.open(tmp_path) as store:
        assert store.get_run("r1")["history"] == [{"epoch": 1, "loss": 0.5}]
    assert reindex(tmp_path) == 1  # a healthy index is rebuilt in place


# ------------------------------------------------------------------------------------------ migrations
def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    beat = datetime.now(timezone.utc).isoformat()
    old = record("r1", status="running", heartbeat_at=beat)
    # the schema as engineflow wrote it at version 1, before heartbeats and indexes
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, experiment TEXT NOT NULL, status TEXT NOT NULL, "
                     "started_at TEXT, ended_at TEXT, fingerprint TEXT, pid INTEGER, hostname TEXT, "
                     "record TEXT NOT NULL)")
        conn.execute("CREATE TABLE metrics (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, name TEXT NOT NULL, "
                      "value REAL, PRIMARY KEY (run_id, epoch, name)) WITHOUT ROWID")
        conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     ("r1", "digits", "running", old["started_at"], None, "fp-r1", os.getpid(), HOST, json.dumps(old)))
        conn.execute("INSERT INTO metrics VALUES ('r1', 1, 'loss', 0.5)")
        conn.execute("PRAGMA application_id = 1162234967")  # 0x45464C57, "EFLW"
        conn.execute("PRAGMA user_version = 1")
    with RunStore(db) as store:
        assert store.get_run("r1") == {**old, "history": [{"epoch": 1, "loss": 0.5}]}
        store.log_metrics("r1", [(2, "loss", 0.25)])
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert conn.execute("SELECT heartbeat_at FROM runs").fetchone()[0] == beat
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"runs_by_experiment", "runs_by_status", "runs_by_fingerprint"} <= indexes
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------------------ reindex
def write_folder(runs: Path, rec: dict[str, Any], rows: list[tuple[int, str, float]]) -> Path:
    """A run folder as the runner leaves it: run.json and metrics.jsonl."""
    folder = runs / rec["experiment"] / rec["id"]
    folder.mkdir(parents=True)
    rec["run_dir"] = str(folder.resolve())
    (folder / "run.json").write_text(json.dumps(rec, indent=2, sort_keys=True))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "name": n, "value": v}) + "\n"
                                                  for e, n, v in rows))
    return folder


def test_delete_db_then_reindex_restores_every_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with RunStore.open(runs) as store:
        for i, experiment in enumerate(["digits", "digits", "sine"]):
            rec = record(f"2026-{i}", experiment, minute=i, extra=[i, {"k": None}])
            rows = [(e, name, e * 0.1 + i) for e in range(1, 4) for name in ("train/loss", "valid/accuracy")]
            write_folder(runs, rec, rows)
            store.upsert_run(rec)
            store.log_metrics(rec["id"], rows)
        before = (store.list_runs(), [store.get_run(r["id"]) for r in store.list_runs()])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{runs / DB_NAME}{suffix}").unlink(missing_ok=True)
    with RunStore.open(runs) as store:
        assert store.list_runs() == []
        assert store.reindex() == (3, None, (), ())
        after = (store.list_runs(), [store.get_run(r["id"]) for r in store.list_runs()])
    assert after == before


def test_reindex_replaces_the_index_and_lists_damaged_folders(tmp_path: Path, store: RunStore) -> None:
    runs = tmp_path / "elsewhere"
    store.upsert_run(record("gone"))  # in the index only: reindex drops it
    folder = write_folder(runs, record("ok"), [(1, "loss", 0.5)])
    with (folder / "metrics.jsonl").open("a") as out:
        out.write('{"epoch": 2, "name": "loss", "val')  # torn by a killed writer
    (runs / "digits" / "broken").mkdir()
    (runs / "digits" / "broken" / "run.json").write_text("{not json")
    (runs / "digits" / "nostatus").mkdir()
    (runs / "digits" / "nostatus" / "run.json").write_text('{"id": "nostatus", "experiment": "digits"}')
    (runs / "digits" / "notes").mkdir()  # no run file in it: not a run
    (runs / "digits" / "notes" / "todo.txt").write_text("-")
    write_folder(runs, record("ok", "zcopy"), [])  # a copy of run "ok" elsewhere
    rebuilt = store.reindex(runs)
    assert rebuilt.runs == 3 and sorted(rebuilt.damaged) == ["broken", "nostatus"]
    assert [line.split(": ")[0] for line in rebuilt.problems] == [
        str(runs / "digits" / "broken" / "run.json"), str(runs / "digits" / "nostatus" / "run.json"),
        str(folder / "metrics.jsonl"), str(runs / "zcopy" / "ok")]
    assert "line 2: cut short" in rebuilt.problems[2] and f"also the id of {folder}" in rebuilt.problems[3]
    assert {r["id"]: r["status"] for r in store.list_runs()} == {"ok": "completed", "broken": "damaged",
                                                                 "nostatus": "damaged"}
    assert store.get_run("ok")["history"] == [{"epoch": 1, "loss": 0.5}]


def test_reindex_points_run_dir_at_a_moved_folder(tmp_path: Path, store: RunStore) -> None:
    folder = write_folder(tmp_path / "a", record("r1"), [])
    moved = tmp_path / "b" / "digits" / "r1"
    moved.parent.mkdir(parents=True)
    folder.rename(moved)
    store.reindex(tmp_path / "b")
    assert store.get_run("r1")["run_dir"] == str(moved.resolve())


# ------------------------------------------------------------------------------------------ field-level writes
FIELD_WRITER = """
import json, sys, time
from datetime import datetime, timedelta
from pathlib import Path
from engineflow.record.recorder import RunRecorder
from engineflow.record.store import RunStore
runs, folder, role, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], datetime.fromisoformat(sys.argv[4])
record = json.loads((folder / "run.json").read_text())
print("ready", flush=True)
while not (runs / "go").exists():
    time.sleep(0.005)
with RunStore.open(runs) as store:
    recorder = RunRecorder(store, folder, record)  # as a run's process and a second process hold it
    for i in range(1, 101):
        if role == "trainer":
            recorder.update(epochs=i, metrics={"loss": 1 / i})
        else:
            recorder.update(resumes=[{"n": i}], tested_at=str(i))
            store.heartbeat(record["id"], at=start + timedelta(seconds=i))
"""


def test_processes_updating_different_fields_of_one_run_lose_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    folder = write_folder(runs, record("r1", status="running", epochs=0, metrics={}), [])
    with RunStore.open(runs) as store:
        store.upsert_run(json.loads((folder / "run.json").read_text()))
    start = datetime.now(timezone.utc).replace(microsecond=0)
    procs = [python(FIELD_WRITER, str(runs), str(folder), role, start.isoformat()) for role in ("trainer", "tester")]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2  # type: ignore[union-attr]
    (runs / "go").touch()
    assert [(p.wait(timeout=60), p.stderr.read()) for p in procs] == [(0, "")] * 2  # type: ignore[union-attr]
    with RunStore.open(runs) as store:
        indexed = store.get_run("r1")
    on_disk = json.loads((folder / "run.json").read_text())
    for got in (indexed, on_disk):  # each process's last value of each of its fields, in the file and the row
        assert (got["epochs"], got["metrics"], got["resumes"], got["tested_at"]) == (100, {"loss": 0.01},
                                                                                     [{"n": 100}], "100")
        assert got["status"] == "running" and got["config"] == record("r1")["config"]
    assert indexed["heartbeat_at"] == (start + timedelta(seconds=100)).isoformat()


def test_runs_list_racing_a_resume_leaves_the_live_run_running(tmp_path: Path, monkeypatch: Any) -> None:
    from engineflow.record.runs import list_runs

    runs = tmp_path / "runs"
    dead = dead_pid()
    folders = {name: write_folder(runs, record(name, status="running", pid=dead), []) for name in ("r1", "r2")}
    with RunStore.open(runs) as store:
        for folder in folders.values():
            store.upsert_run(json.loads((folder / "run.json").read_text()))
        assert sorted(r["id"] for r in store.stale_runs()) == ["r1", "r2"]
    judge = RunStore.stale_runs
    resumed = []

    def judge_then_resume(self: RunStore, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        judged = judge(self, *args, **kwargs)
        # between the judgement and the write, `engineflow run --resume` takes the run over
        with RunStore.open(runs) as other:
            for rec in judged:
                recorder = _resumed(other, folders[rec["id"]], other.get_run(rec["id"]))
                recorder._stop_beating.set()
                resumed.append(rec["id"])
        return judged

    monkeypatch.setattr(RunStore, "stale_runs", judge_then_resume)
    listed = {r["id"]: r for r in list_runs(runs)}
    assert sorted(resumed) == ["r1", "r2"]
    for name, folder in folders.items():
        on_disk = json.loads((folder / "run.json").read_text())
        for got in (listed[name], on_disk):
            assert (got["status"], got["pid"], len(got["resumes"])) == ("running", os.getpid(), 1), name
    # the index-only marking re-checks under the lock the same way
    store = RunStore.open(runs)
    try:
        store.update_run("r1", pid=dead)  # dead again
        resumed.clear()
        assert store.mark_stale() == [] and resumed == ["r1"]
        assert store.get_run("r1")["status"] == "running"
    finally:
        store.close()


def test_two_resumes_of_one_run_cannot_both_start(tmp_path: Path) -> None:

    runs = tmp_path / "runs"
    folder = write_folder(runs, record("r1", status="interrupted"), [])
    with RunStore.open(runs) as store:
        store.upsert_run(json.loads((folder / "run.json").read_text()))
        read_by_both = store.get_run("r1")
        first = _resumed(store, folder, dict(read_by_both))
        first._stop_beating.set()
        with pytest.raises(RecipeError, match=r"changed while this process was about to resume it: it is now running"):
            _resumed(store, folder, dict(read_by_both))
        assert len(store.get_run("r1")["resumes"]) == 1
    assert len(json.loads((folder / "run.json").read_text())["resumes"]) == 1


def test_reindex_reads_again_a_folder_written_while_it_read(tmp_path: Path, monkeypatch: Any) -> None:
    runs = tmp_path / "runs"
    folder = write_folder(runs, record("r1", status="running", epochs=1), [(1, "loss", 0.5)])
    writing = RunStore._writing

    @contextmanager
    def epoch_then_writing(self: RunStore) -> Any:
        # a live run records epoch 2 after reindex read the folders, before reindex takes the write lock
        if not (folder / "epoch2").exists():
            (folder / "epoch2").touch()
            with (folder / "metrics.jsonl").open("a") as out:
                out.write(json.dumps({"epoch": 2, "name": "loss", "value": 0.25}) + "\n")
            (folder / "run.json").write_text(json.dumps({**json.loads((folder / "run.json").read_text()),
                                                         "epochs": 2}))
        with writing(self) as conn:
            yield conn

    monkeypatch.setattr(RunStore, "_writing", epoch_then_writing)
    assert reindex(runs) == 1
    with RunStore.open(runs) as store:
        run = store.get_run("r1")
    assert run["epochs"] == 2 and run["history"] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]


# ------------------------------------------------------------------------------------------ store failures
def test_store_failures_exit_1_and_requests_it_cannot_serve_exit_2(tmp_path: Path) -> None:
    from engineflow.errors import EXIT_TRAINING_FAILED, EXIT_USAGE

    for usage in (UnknownRunError, AmbiguousRunError, UnusableStoreError, NewerStoreError):
        assert issubclass(usage, StoreError) and issubclass(usage, RecipeError) and usage.exit_code == EXIT_USAGE
    with RunStore.open(tmp_path) as store:
        store.upsert_run(record("r1"))
        store._connection().execute("PRAGMA busy_timeout = 100")
        holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock too long
        try:
            with pytest.raises(StoreError, match="stayed locked") as caught:
                store.update_run("r1", status="failed")
        finally:
            holder.rollback()
            holder.close()
    assert caught.value.exit_code == EXIT_TRAINING_FAILED and not isinstance(caught.value, RecipeError)


def fill_up(store: RunStore) -> None:
    """The index can grow no more: as on a full disk, the next write that needs a page fails."""
    conn = store._connection()
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")


def hold_write_lock(store: RunStore) -> sqlite3.Connection:
    """Another process holds the write lock for longer than this store waits."""
    store._connection().execute("PRAGMA busy_timeout = 100")
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@pytest.mark.parametrize("failure", ["disk full", "locked"])
def test_a_failing_index_stops_the_run_with_exit_1_and_its_folder_keeps_the_change(tmp_path: Path,
                                                                                   failure: str) -> None:
    from engineflow.errors import EXIT_TRAINING_FAILED
    from engineflow.record.recorder import RunRecorder

    runs = tmp_path / "runs"
    folder = write_folder(runs, record("r1", status="running", epochs=1), [])
    with RunStore.open(runs) as store:
        store.upsert_run(json.loads((folder / "run.json").read_text()))
        recorder = RunRecorder(store, folder, json.loads((folder / "run.json").read_text()))
        holder = hold_write_lock(store) if failure == "locked" else fill_up(store)
        try:
            with pytest.raises(StoreError) as caught:
                recorder.update(epochs=2, notes="n" * 100_000)
        finally:
            if holder is not None:
                holder.rollback()
                holder.close()
        assert caught.value.exit_code == EXIT_TRAINING_FAILED and not isinstance(caught.value, RecipeError)
        assert str(folder / "run.json") in str(caught.value) and "engineflow runs reindex" in str(caught.value)
        assert store.get_run("r1")["epochs"] == 1  # the index missed it ...
    on_disk = json.loads((folder / "run.json").read_text())
    assert on_disk["epochs"] == 2 and len(on_disk["notes"]) == 100_000  # ... the folder has it
    assert reindex(runs) == 1
    with RunStore.open(runs) as store:
        assert store.get_run("r1")["epochs"] == 2


def test_an_index_deleted_while_a_run_records_gets_its_next_write(tmp_path: Path) -> None:
    from engineflow.record.recorder import RunRecorder

    runs = tmp_path / "runs"
    folder = write_folder(runs, record("r1", status="running", epochs=1), [(1, "loss", 0.5)])
    with RunStore.open(runs) as store:
        store.upsert_run(json.loads((folder / "run.json").read_text()))
        recorder = RunRecorder(store, folder, json.loads((folder / "run.json").read_text()))
        for suffix in ("", "-wal", "-shm"):  # as `runs reindex` moves an unusable index aside, or `rm` does
            Path(f"{store.path}{suffix}").unlink(missing_ok=True)
        recorder.update(epochs=2)
        with RunStore.open(runs) as reader:  # whatever opens the path now sees the write
            assert [(r["id"], r["epochs"], r["config"]) for r in reader.list_runs()] == [
                ("r1", 2, record("r1")["config"])]


# ------------------------------------------------------------------------------------------ reindex salvage
def damage(folder: Path, kind: str) -> None:
    run_json, metrics = folder / "run.json", folder / "metrics.jsonl"
    text = run_json.read_text()
    if kind == "run.json cut short":
        run_json.write_text(text[: len(text) // 2])
    elif kind == "run.json not JSON":
        run_json.write_text("{status: completed}\n")
    elif kind == "run.json not UTF-8":
        run_json.write_bytes(text.encode().replace(b'"completed"', b'"compl\xff\xfeted"'))
    elif kind == "run.json empty":
        run_json.write_bytes(b"")
    elif kind == "run.json a list":
        run_json.write_text("[1, 2]")
    elif kind == "run.json missing":
        run_json.unlink()
    elif kind == "run.json a folder":
        run_json.unlink()
        run_json.mkdir()
    elif kind == "run.json unknown status":
        run_json.write_text(json.dumps({**json.loads(text), "status": "done"}))
    elif kind == "run.json wrong types":
        run_json.write_text(json.dumps({**json.loads(text), "id": 7, "best": "great", "started_at": {"t": 1},
                                        "pid": "x"}))
    elif kind == "run.json huge numbers":
        run_json.write_text(json.dumps({**json.loads(text), "pid": 10**30, "best": {"value": 0.5}}))
    elif kind == "metrics.jsonl huge epoch":
        metrics.write_bytes(metrics.read_bytes() + b'{"epoch": 99999999999999999999999, "name": "a", "value": 1}\n')
    elif kind == "metrics.jsonl not UTF-8":
        metrics.write_bytes(metrics.read_bytes().replace(b'"loss"', b'"lo\xffss"', 1))
    elif kind == "metrics.jsonl cut short":
        metrics.write_bytes(metrics.read_bytes() + b'{"epoch": 3, "name": "lo')
    elif kind == "metrics.jsonl garbage":
        data = metrics.read_bytes().splitlines(keepends=True)
        metrics.write_bytes(b"".join([data[0], b"\x00\x01garbage\n", b'{"epoch": "3", "name": "x", "value": 1}\n',
                                      b'[1, 2]\n', b'{"epoch": 3, "name": "loss", "value": "high"}\n', *data[1:]]))
    elif kind == "metrics.jsonl missing":
        metrics.unlink()
    else:  # pragma: no cover
        raise AssertionError(kind)


# kind -> (status the run is indexed with, what its problem line says, its history)
FULL = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
DAMAGES = {
    "run.json cut short": ("damaged", "cut short", FULL),
    "run.json not JSON": ("damaged", "not valid JSON (Expecting property name", FULL),
    "run.json not UTF-8": ("damaged", "not UTF-8 text (byte 0xff at offset", FULL),
    "run.json empty": ("damaged", "empty", FULL),
    "run.json a list": ("damaged", "holds a JSON list, not a run record object", FULL),
    "run.json missing": ("damaged", "missing", FULL),
    "run.json a folder": ("damaged", "is a folder, not a file", FULL),
    "run.json unknown status": ("damaged", "'status' is 'done', not one of", FULL),
    "run.json wrong types": ("completed", "'id' is 7, not a string: the folder name is used", FULL),
    "run.json huge numbers": ("completed", "'pid' is a number, expected", FULL),
    "metrics.jsonl huge epoch": ("completed", "1 unreadable line(s) skipped (line 3: not an epoch/name/value record)",
                                 FULL),
    "metrics.jsonl not UTF-8": ("completed", "1 unreadable line(s) skipped (line 1: not UTF-8); 1 metric", FULL[1:]),
    "metrics.jsonl cut short": ("completed", "1 unreadable line(s) skipped (line 3: cut short); 2 metric", FULL),
    "metrics.jsonl garbage": ("completed", "4 unreadable line(s) skipped (line 2: not JSON, line 3: not an "
                              "epoch/name/value record, line 4: not an epoch/name/value record and 1 more)", FULL),
    "metrics.jsonl missing": ("completed", "missing; the run's per-epoch history is not indexed", []),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_reindex_salvages_a_damaged_file_and_rebuilds_every_other_run(tmp_path: Path, kind: str) -> None:
    import warnings

    runs = tmp_path / "runs"
    healthy = [record(f"20261123-08{i}000-aaa{i}", experiment, minute=i, epochs=2)
               for i, experiment in enumerate(["digits", "sine"])]
    for rec in healthy:
        write_folder(runs, rec, [(1, "loss", 0.5), (2, "loss", 0.25)])
    victim = write_folder(runs, record("20261123-083000-bbbb", config={"lr": 0.3}, epochs=2, metrics={"loss": 0.25}),
                          [(1, "loss", 0.5), (2, "loss", 0.25)])
    (victim / "config.json").write_text(json.dumps({"lr": 0.3}))
    (victim / "code").mkdir()
    damage(victim, kind)
    status, said, history = DAMAGES[kind]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = rebuild(runs)
    assert caught == [] and rebuilt.runs == 3
    damaged_file = victim / kind.split()[0]
    assert len(rebuilt.problems) == 1, rebuilt.problems  # one line for the one damaged file
    [line] = rebuilt.problems
    assert line.startswith(f"{damaged_file}: ") and said in line and "\n" not in line and "Traceback" not in line
    assert rebuilt.damaged == (("20261123-083000-bbbb",) if status == "damaged" else ())
    with RunStore.open(runs) as store:
        for rec in healthy:  # every other run as it was
            got = store.get_run(rec["id"])
            assert got["history"] == FULL and {**got, "history": None} == {**rec, "history": None}
        salvaged = store.get_run("20261123-083000-bbbb")
        assert {r["id"]: r["status"] for r in store.list_runs()} == {
            **{rec["id"]: "completed" for rec in healthy}, "20261123-083000-bbbb": status}
    assert (salvaged["id"], salvaged["experiment"], salvaged["status"]) == ("20261123-083000-bbbb", "digits", status)
    assert salvaged["history"] == history and salvaged["run_dir"] == str(victim.resolve())
    if status == "damaged":  # rebuilt from the folder: its name, its config.json and its metrics.jsonl
        assert salvaged["config"] == {"lr": 0.3} and salvaged["metrics"] == {"loss": 0.25}
        assert salvaged["epochs"] == 2 and kind.split()[0] in salvaged["error"]
        assert salvaged["started_at"] is not None and salvaged["started_at"].endswith("+00:00")


def _resumed(store, folder, record):
    """A recorder of an earlier run that has begun its resume, as the runner's session does."""
    from engineflow.record.recorder import RunRecorder

    recorder = RunRecorder(store, folder, {k: v for k, v in record.items() if k != "history"})
    recorder.begin_resumed(changed=[])
    return recorder
