"""A run's MLflow outbox: what the mirror still has to tell MLflow, kept in the run folder.

Folder ``<run_dir>/mlflow/``::

    outbox.jsonl   append-only, one entry a line: {"op": "start" | "params" | "tags" | "metrics" |
                   "status" | "artifacts", ...}; written on the training thread, never read there
    state.json     {"uri", "experiment_id", "run_id", "pushed"}: where the mirror goes, the MLflow
                   run it writes to, and how many bytes of the outbox MLflow already has
    lock           held (``flock``) by whoever pushes, so two processes never push one run at once

Appending costs a JSON line and no network, so training never waits for MLflow; whoever pushes
(:mod:`engineflow.record.push`, for the run's own thread, ``engineflow runs sync`` and ``runs list``)
reads from ``pushed`` on. Pushing an entry twice changes nothing in MLflow (metrics keep the
timestamp they were queued with, and MLflow stores a ``(key, step, timestamp, value)`` once), so a
push cut off before ``pushed`` moved on is simply done again.

This module imports no MLflow: runs that are only listed, settled or queued to never load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from engineflow.declare.configuration import flatten
from engineflow.errors import WriteError
from engineflow.files import append_text, write_json
from engineflow.record.staleness import parse_time

__all__ = ["MLFLOW_STATUS", "Outbox", "first_entries", "mirrored", "queue_killed", "reconcile", "run_params",
           "run_tags", "stage_names"]

FOLDER = "mlflow"
# engineflow's run status -> MLflow's RunStatus. A run found dead (SIGKILL, a lost machine) is
# "interrupted" in engineflow, like a clean Ctrl-C or SIGTERM: MLflow calls both KILLED.
MLFLOW_STATUS = {"running": "RUNNING", "completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED",
                 "pruned": "KILLED"}
_LOCK_POLL_S = 0.05


def now_ms() -> int:
    """MLflow's clock: milliseconds since the epoch."""
    return int(time.time() * 1000)


class Outbox:
    """The outbox of the run in ``run_dir`` (see the module). Creating one touches no file.

    Example:
        >>> import tempfile
        >>> box = Outbox(Path(tempfile.mkdtemp()))
        >>> box.open("http://127.0.0.1:5000")  # a new outbox
        True
        >>> box.append({"op": "metrics", "step": 1, "time": 0, "values": {"valid/accuracy": 0.9}})
        >>> [entry["op"] for entry, _ in box.pending()]
        ['metrics']
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.path = self.folder / "outbox.jsonl"
        self.state_path = self.folder / "state.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self, uri: str) -> bool:
        """Make the folder and point the mirror at ``uri``. A new ``uri`` (the server moved, or
        another one was chosen) starts its state afresh: that server gets the whole outbox.

        Returns:
            True when the mirror's target changed (or the outbox is new).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._end_torn_line()
        else:
            self.path.touch()
        state = self.state()
        if state.get("uri") == uri:
            return False
        self.save_state({"uri": uri, "experiment_id": None, "run_id": None, "pushed": 0})
        return True

    def append(self, *entries: Mapping[str, Any]) -> None:
        """Add entries at the end, one JSON line each (no fsync: a killed process tears at most
        the last line, which readers skip)."""
        append_text(self.path, "".join(json.dumps(entry, separators=(",", ":"), default=str) + "\n"
                                       for entry in entries))

    def state(self) -> dict[str, Any]:
        """``state.json`` as a dict; empty when missing or unreadable (then everything is pushed again)."""
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: Mapping[str, Any]) -> None:
        write_json(self.state_path, dict(state))

    def pending(self, offset: int | None = None) -> list[tuple[dict[str, Any], int]]:
        """The entries after byte ``offset`` (default: the state's ``pushed``), each with the offset
        just past it; an unreadable line is skipped, a last line without its newline is not there yet."""
        start = int(self.state().get("pushed") or 0) if offset is None else offset
        try:
            with self.path.open("rb") as src:
                src.seek(start)
                data = src.read()
        except OSError:
            return []
        found = []
        position = start
        for line in data.splitlines(keepends=True):
            position += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("op"), str):
                found.append((entry, position))
        return found

    def last_status(self) -> str | None:
        """The MLflow status the outbox asks for last (None when it asks for none)."""
        statuses = [entry["status"] for entry, _ in self.pending(0) if entry["op"] == "status"]
        return statuses[-1] if statuses else None

    @contextlib.contextmanager
    def locked(self, timeout_s: float) -> Iterator[bool]:
        """Hold the push lock, waiting up to ``timeout_s``; yields False when another holder kept it."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; pushes are idempotent, so a rare overlap only repeats work
            yield True
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "lock").open("a") as handle:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(_LOCK_POLL_S)
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _end_torn_line(self) -> None:
        # A process killed mid-append leaves a line without its newline; ending it keeps the next
        # entry on a line of its own (the torn one is then skipped as unreadable).
        with self.path.open("rb+") as box:
            box.seek(0, os.SEEK_END)
            if box.tell() == 0:
                return
            box.seek(-1, os.SEEK_END)
            if box.read(1) != b"\n":
                box.write(b"\n")


def mirrored(record: Mapping[str, Any]) -> Outbox | None:
    """The outbox of a run that mirrors to MLflow, else None."""
    run_dir = record.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        return None
    box = Outbox(Path(run_dir))
    return box if box.exists() else None


def reconcile(record: Mapping[str, Any], box: Outbox) -> bool:
    """Queue the MLflow status that matches the run's own, when the outbox does not end with it
    (the run's process died before queueing its end, or was found dead). Returns True if queued.

    Example:
        >>> import tempfile
        >>> box = Outbox(Path(tempfile.mkdtemp()))
        >>> _ = box.open("http://127.0.0.1:5000")
        >>> reconcile({"status": "interrupted"}, box), reconcile({"status": "interrupted"}, box)
        (True, False)
        >>> box.last_status()
        'KILLED'
    """
    wanted = MLFLOW_STATUS.get(str(record.get("status")))
    if wanted is None or wanted == "RUNNING" or box.last_status() == wanted:
        return False
    box.append({"op": "status", "status": wanted, "time": now_ms()})
    return True


def queue_killed(record: Mapping[str, Any]) -> None:
    """For a run just settled as interrupted (found dead): queue KILLED when it mirrors to MLflow.

    Called under the index's write lock, so a resume of the run (which queues RUNNING after its
    own write) always comes after it in the outbox. Never raises: settling must not fail on it.
    """
    box = mirrored(record)
    if box is None:
        return
    with contextlib.suppress(OSError, WriteError):
        reconcile(record, box)


# ------------------------------------------------------------------------------------------- the entries
def first_entries(record: Mapping[str, Any], run_dir: Path, *, backfill: bool) -> list[dict[str, Any]]:
    """What a run's outbox starts with: the MLflow run (with its tags), its params, its code; and,
    for a run that starts mirroring when resumed (``backfill``), the epochs it already has."""
    entries: list[dict[str, Any]] = [
        {"op": "start", "experiment": record.get("experiment"), "run_name": record.get("id"),
         "time": _ms(record.get("started_at")), "tags": run_tags(record)},
        {"op": "params", "params": run_params(record)},
    ]
    if backfill:
        epochs: dict[int, dict[str, Any]] = {}
        for line in _lines(run_dir / "metrics.jsonl"):
            epochs.setdefault(line["epoch"], {})[line["name"]] = line["value"]
        stamp = now_ms()
        entries += [{"op": "metrics", "step": epoch, "time": stamp, "values": values}
                    for epoch, values in sorted(epochs.items())]
    if (run_dir / "code").is_dir():
        entries.append({"op": "artifacts", "items": [["code", "code"]]})
    return entries


def run_params(record: Mapping[str, Any]) -> dict[str, str]:
    """The run's resolved config as MLflow params: dotted keys, values as ``str()`` gives them.

    Example:
        >>> run_params({"config": {"lr": 0.1, "optim": {"momentum": 0.9}}})
        {'lr': '0.1', 'optim.momentum': '0.9'}
    """
    return {k: str(v) for k, v in flatten(record.get("config") or {}).items()}


def run_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The tags that tie the MLflow run to the engineflow run, its stage, code and commit."""
    code = record.get("code") or {}
    tags = {"engineflow.run_id": record.get("id"), "engineflow.experiment": record.get("experiment"),
            "engineflow.stage": stage_names(record), "engineflow.code_fingerprint": code.get("fingerprint"),
            "engineflow.seed": record.get("seed"), "engineflow.run_dir": record.get("run_dir"),
            "mlflow.source.name": record.get("recipe")}
    if code.get("git_commit"):
        tags.update({"engineflow.git_commit": code["git_commit"], "mlflow.source.git.commit": code["git_commit"],
                     "engineflow.git_dirty": str(bool(code.get("dirty"))).lower()})
    if record.get("check"):
        tags["engineflow.check"] = "true"
    sweep = record.get("sweep") or {}
    if sweep:  # a sweep's trial: nested under the study's MLflow run
        tags.update({"engineflow.sweep": sweep.get("study"), "engineflow.trial": sweep.get("trial"),
                     "mlflow.parentRunId": record.get("mlflow_parent")})
    return {k: str(v) for k, v in tags.items() if v is not None}


def stage_names(record: Mapping[str, Any]) -> str:
    """The run's stage names, comma-separated: its ``stages`` when it records them, else "fit".

    Example:
        >>> stage_names({"stages": [{"name": "pretrain"}, {"name": "finetune"}]})
        'pretrain,finetune'
        >>> stage_names({})
        'fit'
    """
    stages = record.get("stages")
    stages = stages if isinstance(stages, list) else []
    names = [str(stage["name"]) for stage in stages if isinstance(stage, dict) and stage.get("name")]
    return ",".join(names) or "fit"


def _ms(text: Any) -> int:
    moment = parse_time(text)
    return int(moment.timestamp() * 1000) if moment is not None else now_ms()


def _lines(path: Path) -> list[dict[str, Any]]:
    found = []
    with contextlib.suppress(OSError):
        for raw in path.read_bytes().splitlines():
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if isinstance(item, dict) and isinstance(item.get("epoch"), int) and isinstance(item.get("name"), str):
                found.append(item)
    return found
