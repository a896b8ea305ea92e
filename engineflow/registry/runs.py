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


def _settle_stale(store: RunStore) -> None:
    # The folder is the source of truth: its run.json says "interrupted" too, so a reindex agrees.
    for record in store.stale_runs():
        record = {**record, "status": "interrupted", "error": record.get("error") or "the process died (killed?)",
                  "pid": None}
        record.pop("history", None)
        run_json = Path(record["run_dir"]) / "run.json"
        if run_json.parent.is_dir():
            write_json(run_json, record)
        store.upsert_run(record)
