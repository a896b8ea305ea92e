"""The run index's file: its identity, versioned schema and migrations, and the row of a record.

Migrations run under ``BEGIN EXCLUSIVE`` and re-read the version once they hold it, so
concurrent openers of a new or old database apply each migration exactly once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engineflow.errors import StoreUsageError
from engineflow.record.staleness import utc

__all__ = ["APPLICATION_ID", "BUSY_TIMEOUT_S", "COLUMNS", "MIGRATIONS", "SCHEMA_VERSION", "STATUSES",
           "NewerStoreError", "Row", "UnusableStoreError", "connect", "connect_read_only", "dumps", "metric", "row"]

SCHEMA_VERSION = 2
# "damaged": rebuilt from a run folder whose run.json could not be read (see engineflow.record.folders)
# "pruned": a sweep's trial its pruner stopped (engineflow.app.pruning)
STATUSES = ("running", "completed", "failed", "interrupted", "pruned", "damaged")
BUSY_TIMEOUT_S = 30.0
# Written to the file header (PRAGMA application_id, "EFLW") so another program's database is told apart.
APPLICATION_ID = 0x45464C57
Row = tuple[int, str, float | None]  # (epoch, name, value) of one metric

REINDEX_HINT = ("Run `engineflow runs reindex` to rebuild the index from the run folders, which hold every run "
                "(it renames this file to engineflow.db.unusable-<time> first), or move the file away yourself.")


class UnusableStoreError(StoreUsageError):
    """The file at the store path is damaged or is not an engineflow run index."""


class NewerStoreError(StoreUsageError):
    """The run index was written by a newer engineflow whose schema this version does not know."""


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
        # started_at becomes UTC in the column (as row() now writes it), so runs sort by time across offsets
        conn.execute("UPDATE runs SET heartbeat_at = ?, started_at = ? WHERE id = ?",
                     (record.get("heartbeat_at"), utc(record.get("started_at")), run_id))
    # list_runs sorts by start within an experiment; stale checks scan "running"; run refuses repeats by fingerprint
    conn.execute("CREATE INDEX runs_by_experiment ON runs (experiment, started_at)")
    conn.execute("CREATE INDEX runs_by_started ON runs (started_at)")
    conn.execute("CREATE INDEX runs_by_status ON runs (status)")
    conn.execute("CREATE INDEX runs_by_fingerprint ON runs (fingerprint, status)")


# MIGRATIONS[i] takes a database from version i to i + 1. Released entries never change: add a new one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
COLUMNS = ("id", "experiment", "status", "started_at", "ended_at", "fingerprint", "pid", "hostname", "heartbeat_at",
           "record")


def connect(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open, check that the file is ours, switch to WAL and migrate; closes the connection on failure."""
    # isolation_level=None: the sqlite3 module opens no transactions itself, ours are explicit
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        check_identity(conn, path)  # before WAL: switching would write to another program's file
        _enable_wal(conn, busy_timeout_s)
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a killed process; the folders back it up
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_read_only(path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open for reading only: nothing is created, migrated or written (a folder that cannot be written).

    A WAL database opens read-only only where its ``-shm`` file exists or can be made (and sized);
    on a read-only filesystem without one, or a full disk, it is opened as immutable, which reads the
    database file as it is (commits still in a ``-wal`` file left there are not seen).
    """
    uri = path.absolute().as_uri()
    try:
        return _open_uri(f"{uri}?mode=ro", path, busy_timeout_s)
    except sqlite3.OperationalError as err:
        if not any(words in str(err) for words in ("unable to open", "disk I/O error")):
            raise
    return _open_uri(f"{uri}?mode=ro&immutable=1", path, busy_timeout_s)


def _open_uri(uri: str, path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        check_identity(conn, path)  # the first read: where a failed open shows
    except BaseException:
        conn.close()
        raise
    return conn


def check_identity(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse another program's database, or one a newer engineflow wrote."""
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
                                 f"{', '.join(tables) or 'none'}), not an engineflow run index. {REINDEX_HINT}")
    if version > SCHEMA_VERSION:
        raise NewerStoreError(f"the run index {path} was created by a newer engineflow (schema version {version}; "
                              f"this engineflow knows up to {SCHEMA_VERSION}). Upgrade engineflow "
                              "(pip install -U engineflow), or move the file away and run `engineflow runs reindex` "
                              "to build an index this version can read.")


def _enable_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    # Switching a new database to WAL needs a moment alone with the file, and SQLite reports
    # "locked" at once instead of waiting; concurrent first openers retry until the timeout.
    deadline = time.monotonic() + busy_timeout_s
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
        check_identity(conn, path)  # another opener may have created or migrated it while we waited
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for migration in MIGRATIONS[version:]:
            migration(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def row(record: dict[str, Any]) -> tuple[Any, ...]:
    """The column values of a record, in :data:`COLUMNS` order; checks the keys the index needs."""
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise ValueError(f"a run record needs a non-empty string 'id', got {record.get('id')!r}")
    if not isinstance(record.get("experiment"), str):
        raise ValueError(f"run {record['id']}: 'experiment' must be a string, got {record.get('experiment')!r}")
    if record.get("status") not in STATUSES:
        raise ValueError(f"run {record['id']}: 'status' must be one of {', '.join(STATUSES)}, "
                         f"got {record.get('status')!r}")
    code = record.get("code")
    fingerprint = code.get("fingerprint") if isinstance(code, dict) else None
    pid = record.get("pid")
    return (record["id"], record["experiment"], record["status"], _text(utc(record.get("started_at"))),
            _text(record.get("ended_at")), _text(fingerprint), pid if isinstance(pid, int) else None,
            _text(record.get("hostname")), _text(record.get("heartbeat_at")), dumps(record))


def _text(value: Any) -> str | None:
    # a TEXT column holds a string or NULL: any other value (a hand-edited run.json) would not bind
    return value if isinstance(value, str) else None


def dumps(record: dict[str, Any]) -> str:
    """The record column: JSON as ``engineflow.files.write_json`` writes run.json (``default=str``)."""
    return json.dumps(record, default=str, ensure_ascii=False)


def metric(item: Row) -> Row:
    """A checked ``(epoch, name, value)`` row; NaN becomes None (NULL)."""
    epoch, name, value = item
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**63:
        raise TypeError(f"metric row {item!r}: epoch must be an int from 0 to 2**63 - 1")
    if not isinstance(name, str) or not name:
        raise TypeError(f"metric row {item!r}: name must be a non-empty string")
    value = None if value is None else float(value)
    return epoch, name, None if value is None or math.isnan(value) else value
