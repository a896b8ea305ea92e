"""Queries over recorded runs for the CLI and scripts; imports no torch, so ``runs list`` is quick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engineflow.files import write_json
from engineflow.registry.store import RunStore


def list_runs(
    runs_dir: str | Path, *, experiment: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Runs newest first. A "running" run whose process is gone is marked interrupted first."""
    with RunStore.open(Path(runs_dir)) as store:
        _settle_stale(store)
        return store.list_runs(experiment=experiment, status=status)


def get_run(runs_dir: str | Path, ref: str) -> dict[str, Any]:
    """One run by id, unique id prefix or "last", with its per-epoch ``history``."""
    with RunStore.open(Path(runs_dir)) as store:
        _settle_stale(store)
        return store.get_run(store.resolve(ref)["id"])


def reindex(runs_dir: str | Path) -> int:
    """Rebuild the store from the run folders; returns how many runs it indexed."""
    from engineflow.registry.store import reindex as rebuild

    return rebuild(Path(runs_dir))


def save_record(store: RunStore, record: dict[str, Any]) -> None:
    """Write a run record to its folder's ``run.json`` (the source of truth), then to the store.

    ``history`` (which the store adds on reads) is not part of the record: metrics.jsonl holds it.
    """
    record = {k: v for k, v in record.items() if k != "history"}
    folder = Path(record["run_dir"])
    if folder.is_dir():  # a folder deleted by hand: the store still learns the new status
        write_json(folder / "run.json", record)
    store.upsert_run(record)


def _settle_stale(store: RunStore) -> None:
    # The folder is the source of truth: its run.json says "interrupted" too, so a reindex agrees.
    for record in store.stale_runs():
        save_record(store, {**record, "status": "interrupted", "pid": None,
                            "error": record.get("error") or "the process died (killed?)"})
