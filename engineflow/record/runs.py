"""Recorded runs for the CLI and scripts: queries, and the writes that change a run's record.

A run's folder is the source of truth, so a change to a run record goes to its ``run.json``
first and then to its index row, both inside one write transaction of the index: writers of one
run take turns, and each changes only the fields it names, in the file and in the row.

Imports no torch, so ``runs list`` is quick.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engineflow.errors import DiskFullError, StoreError, UnknownRunError, WriteError
from engineflow.files import write_json
from engineflow.record import outbox
from engineflow.record.folders import read_record
from engineflow.record.push import push_settled
from engineflow.record.schema import Row
from engineflow.record.setups import clean_abandoned
from engineflow.record.staleness import interrupted, still_stale
from engineflow.record.store import DB_NAME, ReadOnlyStoreError, Rebuilt, RunStore, RunTransaction
from engineflow.record.store import rebuild as rebuild_index

__all__ = ["get_run", "list_runs", "no_runs_message", "reading", "rebuild", "reindex", "settle_stale",
           "update_record"]


def list_runs(
    runs_dir: str | Path, *, experiment: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Runs newest first; none (and nothing created) when the folder has no index.

    A "running" run whose process is gone is listed as interrupted, and marked so first where the
    runs folder can be written (see :func:`reading`).
    """
    with reading(runs_dir) as store:
        return [] if store is None else store.list_runs(experiment=experiment, status=status)


def get_run(runs_dir: str | Path, ref: str) -> dict[str, Any]:
    """One run by id, unique id prefix or "last", with its per-epoch ``history``.

    Raises:
        UnknownRunError: no such run, or no index in ``runs_dir`` (nothing is created).
    """
    with reading(runs_dir) as store:
        if store is None:
            raise UnknownRunError(no_runs_message(Path(runs_dir)))
        return store.get_run(store.resolve(ref)["id"])


@contextmanager
def reading(runs_dir: str | Path) -> Iterator[RunStore | None]:
    """The index of ``runs_dir`` for a command that reads it; None when there is none (nothing is created).

    Where the index can be written, dead runs are settled first (:func:`settle_stale`); where it
    cannot (a read-only folder, a full disk), it is opened read-only and read as it is: a dead run
    still reads as interrupted.
    """
    folder = Path(runs_dir)
    if not (folder / DB_NAME).is_file():
        yield None
        return
    try:
        store = RunStore.open(folder)
    except DiskFullError:  # the index cannot even be opened for writing: read it as it is
        store = RunStore.open(folder, read_only=True)
    with store:
        if not store.read_only:
            with contextlib.suppress(WriteError, ReadOnlyStoreError):  # settled by the next command that can
                settle_stale(store)
        yield store


def no_runs_message(runs_dir: Path) -> str:
    """Why a runs folder has no runs to show: it does not exist, or it has no index."""
    if not runs_dir.is_dir():
        return f"no runs: the runs folder {runs_dir} does not exist (--runs-dir or $ENGINEFLOW_RUNS_DIR names another)"
    return (f"no runs recorded in {runs_dir} yet (it has no {DB_NAME}; if it holds run folders, "
            "`engineflow runs reindex` indexes them)")


def reindex(runs_dir: str | Path) -> int:
    """Rebuild the store from the run folders; returns how many runs it indexed (see :func:`rebuild`)."""
    return rebuild(runs_dir).runs


def rebuild(runs_dir: str | Path) -> Rebuilt:
    """Rebuild the store from the run folders (``engineflow runs reindex``); prints and warns nothing.

    Returns:
        :class:`~engineflow.record.store.Rebuilt`: ``runs`` (how many were indexed),
        ``moved_aside`` (where an unusable database file went, or None), ``problems`` (one line per
        damaged file, ``"<path>: <what is wrong>; <what was done>"``) and ``damaged`` (the ids of
        runs indexed with status "damaged" because their run.json could not be read).
    """
    return rebuild_index(Path(runs_dir))


def update_record(store: RunStore, record: Mapping[str, Any], fields: Mapping[str, Any], *, rows: Iterable[Row] = (),
                  check: Callable[[dict[str, Any] | None], bool] | None = None) -> dict[str, Any] | None:
    """Set ``fields`` of run ``record["id"]``, and only those, in its ``run.json`` and then in the index.

    Args:
        store: the index.
        record: the run's whole record as the caller knows it. It names the run (``id``) and its
            folder (``run_dir``), and is what run.json or the index row start from where they are
            missing or unreadable (a deleted index, a damaged file).
        fields: the top-level fields to set.
        rows: ``(epoch, name, value)`` metric rows for the index, in the same transaction
            (``metrics.jsonl`` is the caller's to write first).
        check: called under the write lock with the stored record (None if the index has none);
            when it returns False nothing is written and the result is None.

    Returns:
        the record as run.json now holds it.

    Raises:
        StoreError: the index could not be written; run.json has the change all the same
            (unless ``check`` was given: then nothing is written).
        WriteError: run.json could not be written (no space left, not even in place); the index
            has the change.
    """
    run_id = record["id"]
    folder = _folder(record)
    written: dict[str, Any] | None = None
    unwritten: WriteError | None = None

    def write_folder() -> None:
        nonlocal written, unwritten
        on_disk = read_record(folder) if folder is not None else None
        base = on_disk if on_disk is not None and on_disk.get("id") == run_id else record
        written = {k: v for k, v in {**base, **fields}.items() if k != "history"}
        if folder is not None:  # a folder deleted by hand: the index still learns the change
            try:
                write_json(folder / "run.json", written, in_place_when_full=True)
            except WriteError as err:  # the index still learns the change; the error is raised after it
                unwritten = err

    try:
        with store.transaction() as tx:
            if check is not None and not check(tx.get(run_id)):
                return None
            write_folder()
            tx.update(run_id, fields, insert=written)
            tx.log_metrics(run_id, rows)
    except StoreError:
        if written is None and check is None:
            write_folder()
        raise
    if unwritten is not None:
        raise unwritten
    return written


def settle_stale(store: RunStore) -> list[dict[str, Any]]:
    """Mark interrupted, in run.json and then the index, each run whose process is gone; returns them.

    A run that mirrors to MLflow gets KILLED queued (:mod:`engineflow.record.outbox`), and pushed briefly
    (:mod:`engineflow.record.push`).

    Each run judged stale is checked again under the write lock, and left alone if it was resumed,
    finished or beat since (:func:`~engineflow.record.staleness.still_stale`). When its run.json
    tells of another life than the index (a process whose index write failed), the folder is the
    truth: the index takes run.json as it is.

    Run folders left by a process killed during ``setup()`` are removed too
    (:func:`~engineflow.record.setups.clean_abandoned`).
    """
    clean_abandoned(store.path.parent)
    settled = []
    for judged in store.stale_runs():
        with store.transaction() as tx:
            current = tx.get(judged["id"])
            if current is not None and still_stale(current, judged):
                marked = _settle(tx, current)
                if marked is not None:
                    settled.append(marked)
                    outbox.queue_killed(marked)  # MLflow hears KILLED (under the lock: before any resume's RUNNING)
    push_settled(settled)
    return settled


def _settle(tx: RunTransaction, current: dict[str, Any]) -> dict[str, Any] | None:
    folder = _folder(current)
    on_disk = read_record(folder) if folder is not None else None
    if on_disk is not None and on_disk.get("id") == current["id"] and any(
            on_disk.get(key) != current.get(key) for key in ("status", "pid", "hostname")):
        try:
            tx.upsert(on_disk)
            return None
        except ValueError:
            pass  # a run.json the index cannot hold: the index's record is the better one
    fields = interrupted(current)
    if folder is not None:
        base = on_disk if on_disk is not None and on_disk.get("id") == current["id"] else current
        write_json(folder / "run.json", {**base, **fields}, in_place_when_full=True)
    return tx.update(current["id"], fields)


def _folder(record: Mapping[str, Any]) -> Path | None:
    """The run's folder, when the record names one that exists."""
    run_dir = record.get("run_dir")
    return Path(run_dir) if isinstance(run_dir, str) and run_dir and Path(run_dir).is_dir() else None


def resolve_runs_dir(runs_dir: str | Path | None) -> Path:
    """The runs folder: the argument, else ``$ENGINEFLOW_RUNS_DIR``, else ``./runs``."""
    import os

    return Path(runs_dir if runs_dir is not None else os.environ.get("ENGINEFLOW_RUNS_DIR", "runs"))
