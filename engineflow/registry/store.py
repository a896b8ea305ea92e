"""The run index: a SQLite database over the run folders, safe for many processes at once.

Each run folder ``<runs_dir>/<experiment>/<run_id>/`` is the source of truth: ``run.json`` holds
the run record and ``metrics.jsonl`` one ``{"epoch", "name", "value"}`` object per line. The
database ``<runs_dir>/engineflow.db`` only indexes them, so :func:`rebuild` (``engineflow runs
reindex``) can recreate it at any time and a lost or damaged database loses nothing.

Concurrency: WAL mode (readers never wait for the writer), a 30 s busy timeout, and every write
is one short ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front so that two
writers queue on the busy timeout instead of failing with "database is locked". Migrations run
under ``BEGIN EXCLUSIVE`` and re-read the version once they hold it, so concurrent openers of a
new or old database apply each migration exactly once.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp, RunStore.open(Path(tmp)) as store:
    ...     store.upsert_run({"id": "20261123-084512-3fa2", "experiment": "digits", "status": "running",
    ...                       "started_at": "2026-11-23T08:45:12.123456+00:00", "config": {"lr": 0.1}})
    ...     store.log_metrics("20261123-084512-3fa2", [(1, "train/loss", 0.5), (1, "valid/accuracy", 0.9)])
    ...     store.update_run("20261123-084512-3fa2", status="completed")["status"]
    ...     store.resolve("20261123-0845", experiment="digits")["history"]
    'completed'
    [{'epoch': 1, 'train/loss': 0.5, 'valid/accuracy': 0.9}]
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from engineflow.errors import RecipeError

__all__ = [
    "DB_NAME", "HEARTBEAT_INTERVAL_S", "HEARTBEAT_TIMEOUT_S", "SCHEMA_VERSION", "STATUSES", "AmbiguousRunError",
    "NewerStoreError", "Rebuilt", "RunStore", "StoreError", "UnknownRunError", "UnusableStoreError", "is_stale",
    "rebuild", "reindex",
]

DB_NAME = "engineflow.db"
SCHEMA_VERSION = 2
STATUSES = ("running", "completed", "failed", "interrupted")
BUSY_TIMEOUT_S = 30.0
# A live runner refreshes ``heartbeat_at`` every HEARTBEAT_INTERVAL_S; ten missed beats mean it is gone.
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_TIMEOUT_S = 300.0
# Written to the file header (PRAGMA application_id, "EFLW") so another program's database is told apart.
APPLICATION_ID = 0x45464C57

_REINDEX_HINT = ("Run `engineflow runs reindex` to rebuild the index from the run folders, which hold every run "
                 "(it renames this file to engineflow.db.unusable-<time> first), or move the file away yourself.")


class StoreError(RecipeError):
    """The run index cannot be used as asked; the message names the file and what to do."""


class UnusableStoreError(StoreError):
    """The file at the store path is damaged or is not an engineflow run index."""


class NewerStoreError(StoreError):
    """The run index was written by a newer engineflow whose schema this version does not know."""


class UnknownRunError(StoreError):
    """No run matches the id, prefix or ``last`` that was asked for."""


class AmbiguousRunError(StoreError):
    """An id prefix matches more than one run."""


class Rebuilt(NamedTuple):
    """What :func:`rebuild` did: how many runs it indexed, and where an unusable file went."""

    runs: int
    moved_aside: Path | None


# ----------------------------------------------------------------------------------------------- schema
def _v1(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, experiment TEXT NOT NULL, status TEXT NOT NULL, "
                 "started_at TEXT, ended_at TEXT, fingerprint TEXT, pid INTEGER, hostname TEXT, record TEXT NOT NULL)")
    # NULL values stand for NaN: SQLite cannot store NaN in a REAL column
    conn.execute("CREATE TABLE metrics (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, name TEXT NOT NULL, value REAL, "
                 "PRIMARY KEY (run_id, epoch, name)) WITHOUT ROWID")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _v2(conn: sqlite3.Connection) -> None:
    # heartbeats tell dead runs on other hosts (where a pid means nothing) from live ones
    conn.execute("ALTER TABLE runs ADD COLUMN heartbeat_at TEXT")
    for run_id, text in conn.execute("SELECT id, record FROM runs").fetchall():
        record = json.loads(text)
        # started_at becomes UTC in the column (as _row now writes it), so runs sort by time across offsets
        conn.execute("UPDATE runs SET heartbeat_at = ?, started_at = ? WHERE id = ?",
                     (record.get("heartbeat_at"), _utc(record.get("started_at")), run_id))
    # list_runs sorts by start within an experiment; stale checks scan "running"; run refuses repeats by fingerprint
    conn.execute("CREATE INDEX runs_by_experiment ON runs (experiment, started_at)")
    conn.execute("CREATE INDEX runs_by_started ON runs (started_at)")
    conn.execute("CREATE INDEX runs_by_status ON runs (status)")
    conn.execute("CREATE INDEX runs_by_fingerprint ON runs (fingerprint, status)")


# MIGRATIONS[i] takes a database from version i to i + 1. Released entries never change: add a new one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
_COLUMNS = ("id", "experiment", "status", "started_at", "ended_at", "fingerprint", "pid", "hostname", "heartbeat_at",
            "record")
# Connections inherited through fork are kept referenced, never closed: closing one in the child
# could checkpoint or drop locks on files that the parent is still using.
_INHERITED: list[sqlite3.Connection] = []


# ----------------------------------------------------------------------------------------------- staleness
def is_stale(record: dict[str, Any], now: datetime | None = None, *, heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
             hostname: str | None = None) -> bool:
    """True when a run says "running" but its process is gone, so it counts as interrupted.

    On this host (``hostname``, default this machine's) a dead ``pid`` decides. Anywhere, a
    ``heartbeat_at`` older than ``heartbeat_timeout_s`` does too (it also catches a pid reused by
    another process). A run from another host that never wrote a heartbeat is never stale.

    Example:
        >>> is_stale({"status": "running", "pid": os.getpid(), "hostname": socket.gethostname()})
        False
        >>> is_stale({"status": "running", "pid": 1, "hostname": "elsewhere",
        ...           "heartbeat_at": "2020-01-01T00:00:00+00:00"})
        True
    """
    if record.get("status") != "running":
        return False
    now = now or datetime.now(timezone.utc)
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    pid = record.get("pid")
    local = record.get("hostname") == (hostname or socket.gethostname())
    if local and isinstance(pid, int) and not isinstance(pid, bool) and not _pid_alive(pid):
        return True
    beat = _parse_time(record.get("heartbeat_at"))
    return beat is not None and (now - beat).total_seconds() > heartbeat_timeout_s


def _interrupted(record: dict[str, Any]) -> dict[str, Any]:
    """A stale run's record as it reads once marked: "interrupted", with an ``error`` saying why."""
    error = record.get("error")
    if error is None:
        error = (f"no sign of life from the run's process (pid {record.get('pid')} on {record.get('hostname')}, "
                 f"last heartbeat {record.get('heartbeat_at')}): it ended without recording an outcome")
    return {**record, "status": "interrupted", "error": error}


def _as_seen(record: dict[str, Any]) -> dict[str, Any]:
    return _interrupted(record) if is_stale(record) else record


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _utc(text: Any) -> Any:
    """``text`` as a UTC ISO string, so that the column sorts by time whatever offset was written."""
    moment = _parse_time(text)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds") if moment else text


# ----------------------------------------------------------------------------------------------- the store
class RunStore:
    """The SQLite index of run records and their per-epoch metrics.

    One connection per process, opened on first use in that process, so a store may be shared
    with forked workers; calls from several threads are serialized by a lock.

    Reads (``list_runs``, ``get_run``, ``resolve``) report a "running" run whose process is gone
    (:func:`is_stale`) as "interrupted" without writing anything: the change belongs in its
    ``run.json`` first. The caller takes :meth:`stale_runs`, writes their folders, then
    ``upsert_run``; or calls :meth:`mark_stale` to persist in the index alone.

    Args:
        db_path: the database file; created (with its folder) when missing.

    Raises:
        UnusableStoreError: the file is corrupt or not an engineflow index.
        NewerStoreError: a newer engineflow wrote the file.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.RLock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._session():  # open now, so a damaged file is reported where the store is opened
            pass

    @classmethod
    def open(cls, runs_dir: Path) -> RunStore:
        """The store of ``runs_dir``: ``<runs_dir>/engineflow.db``."""
        return cls(Path(runs_dir) / DB_NAME)

    def close(self) -> None:
        """Close this process's connection; the store cannot be used afterwards."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            elif self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn, self._closed = None, True

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -------------------------------------------------------------------------------------- writes
    def upsert_run(self, record: dict[str, Any]) -> None:
        """Insert ``record``, or replace the whole stored record of its ``id``.

        The record must be JSON-able (other values are stored as ``str``, as ``run.json`` does) and
        have ``id``, ``experiment`` and a ``status`` among :data:`STATUSES`. A ``history`` key is
        dropped: histories come from the metrics table.
        """
        row = _row({k: v for k, v in record.items() if k != "history"})
        with self._writing() as conn:
            conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(row))})",
                         row)

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the top level of a stored record; returns the new record.

        Raises:
            UnknownRunError: no run has this id.
        """
        if "id" in fields or "history" in fields:
            raise ValueError("update_run cannot change 'id' or 'history'; use upsert_run or log_metrics")
        with self._writing() as conn:
            record = {**self._record(conn, run_id), **fields}
            row = _row(record)
            conn.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?",
                         (*row[1:], run_id))
        return record

    def heartbeat(self, run_id: str, at: datetime | None = None) -> None:
        """Record that the run's process is alive (``heartbeat_at``), now or ``at``."""
        self.update_run(run_id, heartbeat_at=(at or datetime.now(timezone.utc)).isoformat())

    def log_metrics(self, run_id: str, rows: Iterable[tuple[int, str, float | None]]) -> None:
        """Store ``(epoch, name, value)`` rows in one transaction; a repeated (epoch, name) replaces.

        NaN and None are stored as NULL and read back as None.

        Raises:
            UnknownRunError: no run has this id (upsert the run first).
        """
        batch = [_metric(row) for row in rows]  # checked before the lock, which is then held briefly
        if not batch:
            return
        with self._writing() as conn:
            self._record(conn, run_id)
            conn.executemany("INSERT INTO metrics (run_id, epoch, name, value) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (run_id, epoch, name) DO UPDATE SET value = excluded.value",
                             [(run_id, *row) for row in batch])

    def delete_run(self, run_id: str) -> None:
        """Remove a run and its metrics from the index (its folder is left alone).

        Raises:
            UnknownRunError: no run has this id.
        """
        with self._writing() as conn:
            self._record(conn, run_id)
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def stale_runs(self, now: datetime | None = None, *,
                   heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[dict[str, Any]]:
        """The runs stored as "running" whose process is gone (see :func:`is_stale`), as stored.

        Nothing is written: the caller marks each one interrupted in its ``run.json`` and then
        :meth:`upsert_run`, so that the folder and the index agree.
        """
        with self._session() as conn:
            found = conn.execute("SELECT record FROM runs WHERE status = 'running'").fetchall()
        records = [json.loads(text) for (text,) in found]
        return [r for r in records if is_stale(r, now, heartbeat_timeout_s=heartbeat_timeout_s)]

    def mark_stale(self, now: datetime | None = None, *,
                   heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Persist "interrupted" (and an ``error``) for :meth:`stale_runs` in the index; returns them.

        The run folders are not touched: write the returned records to their ``run.json``, or a
        later ``reindex`` brings back "running" (which reads report as interrupted again).
        """
        if not self.stale_runs(now, heartbeat_timeout_s=heartbeat_timeout_s):  # the common case: no write lock
            return []
        changed = []
        with self._writing() as conn:
            for (text,) in conn.execute("SELECT record FROM runs WHERE status = 'running'").fetchall():
                record = json.loads(text)  # read again under the lock: the run may have finished meanwhile
                if is_stale(record, now, heartbeat_timeout_s=heartbeat_timeout_s):
                    record = _interrupted(record)
                    conn.execute("UPDATE runs SET status = ?, record = ? WHERE id = ?",
                                 (record["status"], _dumps(record), record["id"]))
                    changed.append(record)
        return changed

    def reindex(self, runs_dir: Path | None = None) -> int:
        """Replace the whole index with the run folders ``<runs_dir>/*/*/`` (default: the db's folder).

        A folder whose ``run.json`` cannot be read, or unreadable lines of a ``metrics.jsonl``,
        are skipped with a warning. Returns the number of runs indexed.
        """
        runs_dir = Path(runs_dir) if runs_dir is not None else self.path.parent
        runs: dict[str, tuple[dict[str, Any], list[tuple[int, str, float | None]]]] = {}
        for path in sorted(runs_dir.glob("*/*/run.json")):  # files are read before the write lock is taken
            loaded = _read_folder(path.parent)
            if loaded is not None:
                if loaded[0]["id"] in runs:
                    warnings.warn(f"{path}: run id {loaded[0]['id']} is also in another folder; this one is kept",
                                  stacklevel=2)
                runs[loaded[0]["id"]] = loaded
        with self._writing() as conn:
            conn.execute("DELETE FROM metrics")
            conn.execute("DELETE FROM runs")
            for record, metrics in runs.values():
                row = _row(record)
                conn.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(row))})", row)
                conn.executemany("INSERT OR REPLACE INTO metrics (run_id, epoch, name, value) VALUES (?, ?, ?, ?)",
                                 [(record["id"], *m) for m in metrics])
        return len(runs)

    # -------------------------------------------------------------------------------------- reads
    def get_run(self, run_id: str) -> dict[str, Any]:
        """The record of ``run_id`` plus ``"history"``: ``[{"epoch": 1, "train/loss": ...}, ...]`` by epoch.

        Raises:
            UnknownRunError: no run has this id.
        """
        with self._session() as conn:
            record = _as_seen(self._record(conn, run_id))
            history: dict[int, dict[str, Any]] = {}
            for epoch, name, value in conn.execute(
                    "SELECT epoch, name, value FROM metrics WHERE run_id = ? ORDER BY epoch, name", (run_id,)):
                history.setdefault(epoch, {"epoch": epoch})[name] = value
        return {**record, "history": list(history.values())}

    def resolve(self, ref: str, experiment: str | None = None) -> dict[str, Any]:
        """The run (as :meth:`get_run`) named by ``ref``: ``"last"``, a full id, or a unique id prefix.

        ``last`` is the run that started latest; ``experiment`` restricts every form to one experiment.

        Raises:
            UnknownRunError: nothing matches; the message lists recent runs.
            AmbiguousRunError: a prefix matches several runs; the message lists them.
        """
        with self._session() as conn:
            run_id = self._resolve_id(conn, ref, experiment)
        return self.get_run(run_id)

    def _resolve_id(self, conn: sqlite3.Connection, ref: str, experiment: str | None) -> str:
        where, args = ("WHERE experiment = ?", [experiment]) if experiment is not None else ("", [])
        scope = f" of experiment {experiment!r}" if experiment is not None else ""
        if ref == "last":
            found = conn.execute(f"SELECT id FROM runs {where} ORDER BY started_at DESC, id DESC LIMIT 1",
                                 args).fetchone()
            if found is None:
                raise UnknownRunError(f"no runs{scope} yet in {self.path}")
            return found[0]
        exact = conn.execute("SELECT experiment FROM runs WHERE id = ?", (ref,)).fetchone()
        if exact is not None and experiment not in (None, exact[0]):
            raise UnknownRunError(f"run {ref} belongs to experiment {exact[0]!r}, not {experiment!r}")
        if exact is not None:
            return ref
        both = "AND" if where else "WHERE"
        matches = [r[0] for r in conn.execute(
            f"SELECT id FROM runs {where} {both} substr(id, 1, ?) = ? AND ? != '' ORDER BY started_at DESC, id DESC",
            [*args, len(ref), ref, ref]).fetchall()]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousRunError(f"{ref!r} matches {len(matches)} runs{scope}: {_few(matches)}; "
                                    "give more characters of the id")
        recent = [r[0] for r in conn.execute(f"SELECT id FROM runs {where} ORDER BY started_at DESC, id DESC LIMIT 5",
                                             args).fetchall()]
        known = f"recent runs: {_few(recent)}" if recent else "there are no runs yet"
        raise UnknownRunError(f"no run{scope} matches {ref!r} in {self.path}; {known} (or use 'last')")

    def list_runs(self, experiment: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Run records (without history), newest first, optionally of one experiment and status.

        Stale runs are listed (and filtered) as "interrupted".
        """
        where, args = "", []
        if experiment is not None:
            where, args = "WHERE experiment = ?", [experiment]
        with self._session() as conn:
            rows = conn.execute(f"SELECT record FROM runs {where} ORDER BY started_at DESC, id DESC", args).fetchall()
        records = [_as_seen(json.loads(text)) for (text,) in rows]
        return [r for r in records if status is None or r["status"] == status]

    def find_completed(self, fingerprint: str) -> list[dict[str, Any]]:
        """Completed runs whose ``code.fingerprint`` is ``fingerprint``, newest first."""
        with self._session() as conn:
            rows = conn.execute("SELECT record FROM runs WHERE fingerprint = ? AND status = 'completed' "
                                "ORDER BY started_at DESC, id DESC", (fingerprint,)).fetchall()
        return [json.loads(text) for (text,) in rows]

    # -------------------------------------------------------------------------------------- plumbing
    def _record(self, conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
        found = conn.execute("SELECT record FROM runs WHERE id = ?", (run_id,)).fetchone()
        if found is None:
            raise UnknownRunError(f"no run {run_id!r} in {self.path}")
        return json.loads(found[0])

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, under the thread lock, with SQLite errors made readable."""
        if self._pid != os.getpid():
            self._lock = threading.RLock()  # a lock copied by fork may be held by a thread the child lacks
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.DatabaseError as err:
                raise self._explain(err) from err

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; the write lock is taken at BEGIN, so waits go to the busy timeout."""
        with self._session() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a failed COMMIT too: never leave the connection inside a transaction
                    conn.rollback()
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn, self._pid = None, os.getpid()
            self._conn = _connect(self.path)
        return self._conn

    def _explain(self, err: sqlite3.DatabaseError) -> StoreError:
        text = str(err)
        code = getattr(err, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StoreError(f"the run index {self.path} stayed locked for over {BUSY_TIMEOUT_S:.0f} s ({text}): "
                              "another process holds a long write transaction. Try again.")
        damaged = ("malformed", "not a database", "no such table", "no such column", "encrypted")
        if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(word in text for word in damaged):
            return UnusableStoreError(f"the run index {self.path} is damaged or is not an engineflow database "
                                      f"({text}). {_REINDEX_HINT}")
        return StoreError(f"the run index {self.path} cannot be used: {text}")


def reindex(runs_dir: Path) -> int:
    """Rebuild ``<runs_dir>/engineflow.db`` from the run folders; returns the number of runs (see :func:`rebuild`)."""
    return rebuild(runs_dir).runs


def rebuild(runs_dir: Path) -> Rebuilt:
    """Rebuild ``<runs_dir>/engineflow.db`` from the run folders (``engineflow runs reindex``).

    A database that is damaged or foreign is first renamed to ``engineflow.db.unusable-<time>``
    (with its -wal and -shm files) and a new one created; a newer engineflow's database is left
    alone (:class:`NewerStoreError`).
    """
    db = Path(runs_dir) / DB_NAME
    moved = None
    try:
        store = RunStore(db)
    except UnusableStoreError:
        moved = db.with_name(f"{DB_NAME}.unusable-{datetime.now():%Y%m%d-%H%M%S}")
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                os.replace(f"{db}{suffix}", f"{moved}{suffix}")
        store = RunStore(db)
    with store:
        return Rebuilt(store.reindex(runs_dir), moved)


# ----------------------------------------------------------------------------------------------- helpers
def _connect(path: Path) -> sqlite3.Connection:
    """Open, check that the file is ours, switch to WAL and migrate; closes the connection on failure."""
    # isolation_level=None: the sqlite3 module opens no transactions itself, ours are explicit
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        _check_identity(conn, path)  # before WAL: switching would write to another program's file
        _enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a killed process; the folders back it up
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_identity(conn: sqlite3.Connection, path: Path) -> None:
    # one statement, so one snapshot: separate reads could straddle another opener's migration
    # and see its tables without its application id
    app_id, version, names = conn.execute(
        "SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM pragma_user_version), "
        "(SELECT group_concat(name, char(10)) FROM sqlite_master WHERE type = 'table')").fetchone()
    tables = sorted(names.split("\n")) if names else []
    if app_id == 0 and version == 0 and not tables:
        return  # a new, empty database
    if app_id != APPLICATION_ID:
        raise UnusableStoreError(f"{path} is a SQLite database of another application (tables: "
                                 f"{', '.join(tables) or 'none'}), not an engineflow run index. {_REINDEX_HINT}")
    if version > SCHEMA_VERSION:
        raise NewerStoreError(f"the run index {path} was created by a newer engineflow (schema version {version}; "
                              f"this engineflow knows up to {SCHEMA_VERSION}). Upgrade engineflow "
                              "(pip install -U engineflow), or move the file away and run `engineflow runs reindex` "
                              "to build an index this version can read.")


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching a new database to WAL needs a moment alone with the file, and SQLite reports
    # "locked" at once instead of waiting; concurrent first openers retry until the timeout.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal" or time.monotonic() > deadline:
                return  # a filesystem without WAL support keeps the rollback journal: slower, still correct
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN EXCLUSIVE")
    try:
        _check_identity(conn, path)  # another opener may have created or migrated it while we waited
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for migration in MIGRATIONS[version:]:
            migration(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    """The column values of a record, in :data:`_COLUMNS` order; checks the keys the index needs."""
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise ValueError(f"a run record needs a non-empty string 'id', got {record.get('id')!r}")
    if not isinstance(record.get("experiment"), str):
        raise ValueError(f"run {record['id']}: 'experiment' must be a string, got {record.get('experiment')!r}")
    if record.get("status") not in STATUSES:
        raise ValueError(f"run {record['id']}: 'status' must be one of {', '.join(STATUSES)}, "
                         f"got {record.get('status')!r}")
    code = record.get("code")
    fingerprint = code.get("fingerprint") if isinstance(code, dict) else None
    pid = record.get("pid") if isinstance(record.get("pid"), int) else None
    return (record["id"], record["experiment"], record["status"], _utc(record.get("started_at")),
            record.get("ended_at"), fingerprint, pid, record.get("hostname"), record.get("heartbeat_at"),
            _dumps(record))


def _dumps(record: dict[str, Any]) -> str:
    # default=str as engineflow.files.write_json: the index holds what run.json holds
    return json.dumps(record, default=str, ensure_ascii=False)


def _metric(row: tuple[int, str, float | None]) -> tuple[int, str, float | None]:
    epoch, name, value = row
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise TypeError(f"metric row {row!r}: epoch must be an int")
    if not isinstance(name, str) or not name:
        raise TypeError(f"metric row {row!r}: name must be a non-empty string")
    value = None if value is None else float(value)
    return epoch, name, None if value is None or math.isnan(value) else value


def _read_folder(folder: Path) -> tuple[dict[str, Any], list[tuple[int, str, float | None]]] | None:
    """The record and metric rows of one run folder, or None (with a warning) when run.json is unusable."""
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        _row(record)
    except (OSError, ValueError, AttributeError) as err:
        warnings.warn(f"{folder / 'run.json'} skipped, it cannot be read as a run record: {err}", stacklevel=3)
        return None
    if str(Path(str(record.get("run_dir"))).resolve()) != str(folder.resolve()):
        record["run_dir"] = str(folder.resolve())  # the runs folder was moved: point at where the run is now
    rows, bad = [], 0
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
    for line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            rows.append(_metric((item["epoch"], item["name"], item["value"])))
        except (ValueError, TypeError, KeyError):
            bad += 1  # typically the last line, torn by a killed process
    if bad:
        warnings.warn(f"{metrics}: {bad} unreadable line(s) skipped", stacklevel=3)
    return record, rows


def _few(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
