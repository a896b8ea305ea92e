"""The run index: a SQLite database over the run folders, safe for many processes at once.

Each run folder ``<runs_dir>/<experiment>/<run_id>/`` is the source of truth: ``run.json`` holds
the run record and ``metrics.jsonl`` one ``{"epoch", "name", "value"}`` object per line. The
database ``<runs_dir>/engineflow.db`` only indexes them, so :func:`rebuild` (``engineflow runs
reindex``) can recreate it at any time and a lost or damaged database loses nothing.

Concurrency: WAL mode (readers never wait for the writer), a 30 s busy timeout, and every write
is one short ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front so that two
writers queue on the busy timeout instead of failing with "database is locked". Writes are
field-level: :meth:`RunStore.update_run` reads the stored record and changes only the fields it
is given, inside that transaction, so two processes updating different fields of one run never
undo each other. :meth:`RunStore.transaction` holds the lock across several steps, which is how a
run's folder and its row change together (:mod:`engineflow.record.runs`).

Errors: :class:`~engineflow.errors.StoreError` (exit 1) when the file cannot be read or written
(locked too long, disk full); its :class:`~engineflow.errors.StoreUsageError` branch (exit 2) for
requests it cannot serve: :class:`UnknownRunError`, :class:`AmbiguousRunError`,
:class:`UnusableStoreError` (damaged or foreign file), :class:`NewerStoreError`.

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

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from engineflow.errors import AmbiguousRunError, StoreError, StoreFullError, StoreUsageError, UnknownRunError
from engineflow.files import no_space_message, out_of_space, writing
from engineflow.record.folders import FolderRun, read_folder, scan
from engineflow.record.schema import (
    BUSY_TIMEOUT_S,
    COLUMNS,
    REINDEX_HINT,
    SCHEMA_VERSION,
    STATUSES,
    NewerStoreError,
    Row,
    UnusableStoreError,
    connect,
    connect_read_only,
    metric,
    row,
)
from engineflow.record.staleness import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TIMEOUT_S,
    interrupted,
    is_stale,
    still_stale,
)

__all__ = [
    "DB_NAME", "HEARTBEAT_INTERVAL_S", "HEARTBEAT_TIMEOUT_S", "SCHEMA_VERSION", "STATUSES", "AmbiguousRunError",
    "NewerStoreError", "ReadOnlyStoreError", "Rebuilt", "RunStore", "RunTransaction", "StoreError", "StoreUsageError",
    "UnknownRunError", "UnusableStoreError", "is_stale", "rebuild", "reindex",
]

DB_NAME = "engineflow.db"
# Connections this process never closes: one inherited through fork (closing it in the child
# could checkpoint or drop locks on files the parent still uses), or one whose file was deleted or
# replaced (closing it would checkpoint into, then delete, the -wal and -shm files at the path,
# which may by then belong to the new file).
_UNCLOSED: list[sqlite3.Connection] = []


class ReadOnlyStoreError(StoreError):
    """The run index cannot be written here (it or its folder is read-only); reading it still works."""


class Rebuilt(NamedTuple):
    """What a reindex did.

    Attributes:
        runs: how many runs it indexed (damaged ones included).
        moved_aside: where an unusable database file went (:func:`rebuild`), else None.
        problems: one line per damaged file or unlistable folder, ``"<path>: <what is wrong>; <what was done>"``.
        damaged: the ids of the runs indexed with status "damaged" (their run.json was unreadable).
    """

    runs: int
    moved_aside: Path | None = None
    problems: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()


class RunTransaction:
    """Reads and field-level writes inside one write transaction of a :class:`RunStore`.

    Everything done through it commits together when the ``with store.transaction()`` block ends,
    and nothing does if the block raises. Other writers wait until then.
    """

    def __init__(self, store: RunStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The record of ``run_id`` as stored ("running" even when stale), or None."""
        found = self._conn.execute("SELECT record FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._store.located(json.loads(found[0])) if found is not None else None

    def update(self, run_id: str, fields: Mapping[str, Any], *,
               insert: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Set ``fields`` (top-level keys) of the stored record and leave every other field as stored.

        ``insert``: the whole record to store, with ``fields`` over it, when the index has no row
        for ``run_id`` (it was deleted or rebuilt meanwhile); without it a missing run raises
        :class:`UnknownRunError`. Returns the record as now stored.
        """
        if "id" in fields or "history" in fields:
            raise ValueError("a run's fields cannot include 'id' or 'history'; use upsert_run or log_metrics")
        current = self.get(run_id)
        if current is None:
            if insert is None:
                raise UnknownRunError(f"no run {run_id!r} in {self._store.path}")
            record = {**{k: v for k, v in insert.items() if k != "history"}, **fields, "id": run_id}
            self.upsert(record)
            return record
        record = {**current, **fields}
        values = row(record)
        self._conn.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE id = ?",
                           (*values[1:], run_id))
        return record

    def upsert(self, record: Mapping[str, Any]) -> None:
        """Store ``record`` whole (see :meth:`RunStore.upsert_run`)."""
        values = row({k: v for k, v in record.items() if k != "history"})
        self._conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) "
                           f"VALUES ({', '.join('?' * len(values))})", values)

    def log_metrics(self, run_id: str, rows: Iterable[Row]) -> None:
        """Store metric rows (see :meth:`RunStore.log_metrics`)."""
        batch = [metric(item) for item in rows]
        if not batch:
            return
        if self.get(run_id) is None:
            raise UnknownRunError(f"no run {run_id!r} in {self._store.path}")
        self._conn.executemany("INSERT INTO metrics (run_id, epoch, name, value) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (run_id, epoch, name) DO UPDATE SET value = excluded.value",
                               [(run_id, *item) for item in batch])

    def delete_metrics(self, run_id: str, *, after_epoch: int) -> None:
        """Remove the metric rows of ``run_id`` past ``after_epoch`` (a resume records them again)."""
        self._conn.execute("DELETE FROM metrics WHERE run_id = ? AND epoch > ?", (run_id, after_epoch))


# ----------------------------------------------------------------------------------------------- the store
class RunStore:
    """The SQLite index of run records and their per-epoch metrics.

    One connection per process, opened on first use in that process, so a store may be shared
    with forked workers; calls from several threads are serialized by a lock. When the file is
    deleted or replaced (a rebuilt index) while open, the next call opens whatever is at the path
    now, so writes never go to a file nobody reads.

    Reads (``list_runs``, ``get_run``, ``resolve``) report a "running" run whose process is gone
    (:func:`is_stale`) as "interrupted" without writing anything: the change belongs in its
    ``run.json`` first (:func:`engineflow.record.runs.list_runs` does both), or in the index
    alone with :meth:`mark_stale`.

    Args:
        db_path: the database file; created (with its folder) when missing.
        busy_timeout_s: how long a write waits for another process's write lock before failing.
        read_only: open the file for reading only: nothing is created, migrated or written, and a
            write raises :class:`StoreError`. None (the default): read-only when the file exists but
            it or its folder cannot be written (a read-only mount, another user's runs).

    Raises:
        UnusableStoreError: the file is corrupt or not an engineflow index.
        NewerStoreError: a newer engineflow wrote the file.
    """

    def __init__(self, db_path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S, read_only: bool | None = None) -> None:
        self.path = Path(db_path)
        self.busy_timeout_s = busy_timeout_s
        self._where = self.path.absolute()  # the same file even if the process changes directory
        self.read_only = _cannot_write(self._where) if read_only is None else read_only
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None
        self._pid = 0
        self._lock = threading.RLock()
        self._closed = False
        if not self.read_only:
            with writing(self.path.parent):
                self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._session():  # open now, so a damaged file is reported where the store is opened
            pass

    @classmethod
    def open(cls, runs_dir: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S, read_only: bool | None = None) -> RunStore:
        """The store of ``runs_dir``: ``<runs_dir>/engineflow.db`` (see the class for ``read_only``)."""
        return cls(Path(runs_dir) / DB_NAME, busy_timeout_s=busy_timeout_s, read_only=read_only)

    def close(self) -> None:
        """Close this process's connection; the store cannot be used afterwards."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid() and _identity(self._where) == self._file:
                self._conn.close()
            elif self._conn is not None:
                _UNCLOSED.append(self._conn)
            self._conn, self._closed = None, True

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -------------------------------------------------------------------------------------- writes
    @contextmanager
    def transaction(self) -> Iterator[RunTransaction]:
        """One write transaction: the write lock is held from the start of the block to its end.

        Keep the block short (other writers wait up to the busy timeout); it commits when the
        block ends and rolls back if it raises.
        """
        with self._writing() as conn:
            yield RunTransaction(self, conn)

    def upsert_run(self, record: dict[str, Any]) -> None:
        """Insert ``record``, or replace the whole stored record of its ``id``.

        For a record read whole from its source (a run folder); to change some fields of a stored
        run use :meth:`update_run`, which keeps the fields other writers set meanwhile. The record
        must be JSON-able (other values are stored as ``str``, as ``run.json`` does) and have
        ``id``, ``experiment`` and a ``status`` among :data:`STATUSES`. A ``history`` key is
        dropped: histories come from the metrics table.
        """
        with self.transaction() as tx:
            tx.upsert(record)

    def update_run(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Set ``fields`` of a stored record, leaving its other fields as stored; returns the new record.

        Raises:
            UnknownRunError: no run has this id.
        """
        with self.transaction() as tx:
            return tx.update(run_id, fields)

    def heartbeat(self, run_id: str, at: datetime | None = None) -> None:
        """Record that the run's process is alive (``heartbeat_at``), now or ``at``."""
        self.update_run(run_id, heartbeat_at=(at or datetime.now(timezone.utc)).isoformat())

    def log_metrics(self, run_id: str, rows: Iterable[Row]) -> None:
        """Store ``(epoch, name, value)`` rows in one transaction; a repeated (epoch, name) replaces.

        NaN and None are stored as NULL and read back as None.

        Raises:
            UnknownRunError: no run has this id (upsert the run first).
        """
        batch = [metric(item) for item in rows]  # checked before the lock, which is then held briefly
        if batch:
            with self.transaction() as tx:
                tx.log_metrics(run_id, batch)

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

        Nothing is written, and the answer can be out of date at once (a run resumed meanwhile):
        whoever marks one interrupted re-checks it with
        :func:`~engineflow.record.staleness.still_stale` inside a :meth:`transaction`.
        """
        with self._session() as conn:
            found = conn.execute("SELECT record FROM runs WHERE status = 'running'").fetchall()
        records = [self.located(json.loads(text)) for (text,) in found]
        return [r for r in records if is_stale(r, now, heartbeat_timeout_s=heartbeat_timeout_s)]

    def mark_stale(self, now: datetime | None = None, *,
                   heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Persist "interrupted" (and an ``error``) for :meth:`stale_runs` in the index; returns them.

        Each run is re-checked under the write lock: one resumed, finished or beating since it
        was judged stale is left alone. The run folders are not touched (see
        :func:`engineflow.record.runs.list_runs` for both).
        """
        changed = []
        for judged in self.stale_runs(now, heartbeat_timeout_s=heartbeat_timeout_s):
            with self.transaction() as tx:
                current = tx.get(judged["id"])
                if current is not None and still_stale(current, judged, now, heartbeat_timeout_s=heartbeat_timeout_s):
                    changed.append(tx.update(judged["id"], interrupted(current)))
        return changed

    def reindex(self, runs_dir: Path | None = None) -> Rebuilt:
        """Replace the whole index with the run folders ``<runs_dir>/*/*/`` (default: the db's folder).

        Damaged files cost only what they lost (see :mod:`engineflow.record.folders`): a run
        whose run.json is unreadable is indexed as "damaged" from what its folder still holds, and
        each damaged file is one line of :attr:`Rebuilt.problems`. Nothing is printed or warned.
        """
        runs_dir = Path(runs_dir) if runs_dir is not None else self._where.parent
        found, problems = scan(runs_dir)  # read before the write lock, so writers wait only for the writing
        with self._writing() as conn:
            # A live run writes its folder under this lock: one that wrote while we read is read again.
            found = [r for r in (read_folder(r.folder) if r.changed() else r for r in found) if r is not None]
            runs = _unique(found, problems)
            conn.execute("DELETE FROM metrics")
            conn.execute("DELETE FROM runs")
            for run in runs:
                values = row(run.record)
                conn.execute(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(values))})",
                             values)
                conn.executemany("INSERT OR REPLACE INTO metrics (run_id, epoch, name, value) VALUES (?, ?, ?, ?)",
                                 [(run.record["id"], *item) for item in run.rows])
        problems = [line for run in found for line in run.problems] + problems
        return Rebuilt(len(runs), None, tuple(problems), tuple(r.record["id"] for r in runs if r.damaged))

    # -------------------------------------------------------------------------------------- reads
    def get_run(self, run_id: str) -> dict[str, Any]:
        """The record of ``run_id`` plus ``"history"``: ``[{"epoch": 1, "train/loss": ...}, ...]`` by epoch.

        Raises:
            UnknownRunError: no run has this id.
        """
        with self._session() as conn:
            record = self._seen(self._record(conn, run_id))
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
        records = [self._seen(json.loads(text)) for (text,) in rows]
        return [r for r in records if status is None or r["status"] == status]

    def find_completed(self, fingerprint: str) -> list[dict[str, Any]]:
        """Completed runs whose ``code.fingerprint`` is ``fingerprint``, newest first."""
        with self._session() as conn:
            rows = conn.execute("SELECT record FROM runs WHERE fingerprint = ? AND status = 'completed' "
                                "ORDER BY started_at DESC, id DESC", (fingerprint,)).fetchall()
        return [self._seen(json.loads(text)) for (text,) in rows]

    # -------------------------------------------------------------------------------------- plumbing
    def _seen(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stored record as the caller should see it: a dead "running" run as interrupted, and
        its folder found (:meth:`located`)."""
        return self.located(_as_seen(record))

    def located(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with ``run_dir`` in this runs folder (``<runs>/<experiment>/<id>``) when the folder is
        there: a runs folder moved or copied elsewhere keeps the absolute paths it was written with."""
        here = str(self.path.parent.resolve() / str(record.get("experiment")) / str(record.get("id")))
        if record.get("run_dir") != here and Path(here).is_dir():
            return {**record, "run_dir": here}
        return record

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
        if self.read_only:
            raise ReadOnlyStoreError(f"the run index {self.path} was opened read-only (it or its folder cannot be "
                                     "written here), so nothing can be recorded in it; use a runs folder you can "
                                     "write to (--runs-dir)")
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
        if self._conn is not None and (self._pid != os.getpid() or _identity(self._where) != self._file):
            _UNCLOSED.append(self._conn)
            self._conn = None
        if self._conn is None:
            self._pid = os.getpid()
            self._conn = (connect_read_only if self.read_only else connect)(self._where, self.busy_timeout_s)
            self._file = _identity(self._where)
        return self._conn

    def _explain(self, err: sqlite3.DatabaseError) -> StoreError:
        text = str(err)
        code = getattr(err, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StoreError(f"the run index {self.path} stayed locked for over {self.busy_timeout_s:g} s ({text}): "
                              "another process holds a long write transaction. Try again.")
        damaged = ("malformed", "not a database", "no such table", "no such column", "encrypted")
        if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(word in text for word in damaged):
            return UnusableStoreError(f"the run index {self.path} is damaged or is not an engineflow database "
                                      f"({text}). {REINDEX_HINT}")
        files = [Path(f"{self._where}{suffix}") for suffix in ("", "-wal", "-shm")]
        if (code.startswith("SQLITE_FULL") or "is full" in text
                or ((code.startswith("SQLITE_IOERR") or "disk I/O error" in text) and out_of_space(self._where.parent,
                                                                                                  files))):
            return StoreFullError(no_space_message(self.path, OSError(errno.ENOSPC, text)), self.path)
        if code.startswith("SQLITE_READONLY") or "readonly database" in text:
            return ReadOnlyStoreError(f"the run index {self.path} cannot be written ({text}): it or its folder is "
                                      "read-only here; use a runs folder you can write to (--runs-dir)")
        return StoreError(f"the run index {self.path} cannot be used: {text}")


def reindex(runs_dir: Path) -> int:
    """Rebuild ``<runs_dir>/engineflow.db`` from the run folders; returns the number of runs (see :func:`rebuild`)."""
    return rebuild(runs_dir).runs


def rebuild(runs_dir: Path) -> Rebuilt:
    """Rebuild ``<runs_dir>/engineflow.db`` from the run folders (``engineflow runs reindex``).

    A database that is damaged or foreign is first renamed to ``engineflow.db.unusable-<time>``
    (with its -wal and -shm files) and a new one created; a newer engineflow's database is left
    alone (:class:`NewerStoreError`). Damaged run folders are salvaged (see
    :meth:`RunStore.reindex`); :attr:`Rebuilt.problems` says what was found.
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
        return store.reindex(runs_dir)._replace(moved_aside=moved)


# ----------------------------------------------------------------------------------------------- helpers
def _cannot_write(db: Path) -> bool:
    """Whether an existing index file, or its folder, cannot be written by this process."""
    return db.exists() and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK))


def _as_seen(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, **interrupted(record)} if is_stale(record) else record


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at ``path`` (device, inode); None when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _unique(found: list[FolderRun], problems: list[str]) -> list[FolderRun]:
    """One folder per run id: the first (in path order); each later one is a problem line."""
    seen: dict[str, FolderRun] = {}
    for run in found:
        first = seen.setdefault(run.record["id"], run)
        if first is not run:
            problems.append(f"{run.folder}: run id {run.record['id']} is also the id of {first.folder}, which is "
                            "indexed; this folder is not")
    return list(seen.values())


def _few(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
