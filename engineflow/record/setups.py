"""Run folders made before their run starts, and the ones a killed process left behind.

A new run's folder exists while its recipe's ``setup()`` runs (``run.run_dir``), before anything
is recorded in it. Meanwhile a note ``<runs_dir>/.setup/<run id>.json`` names the folder and the
process that made it (:func:`claim`). When the run starts the note goes (:func:`release`); a run
that does not start removes its folder too. A process killed outright during ``setup()`` leaves
both: the next command that settles dead runs removes them (:func:`clean_abandoned`), and only
where the note's process is gone from this host and the folder never became a run (it has no
``run.json``). A folder of a live ``setup()``, of another host's, or of a run is never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from engineflow.errors import WriteError
from engineflow.files import write_json, writing
from engineflow.record.staleness import is_stale

__all__ = ["SETUP_DIR", "claim", "clean_abandoned", "release"]

SETUP_DIR = ".setup"  # a dot folder: never taken for an experiment


def _note(run_dir: Path) -> Path:
    return run_dir.parent.parent / SETUP_DIR / f"{run_dir.name}.json"


def claim(run_dir: Path) -> None:
    """Make the new run folder ``run_dir`` (``<runs>/<experiment>/<id>``), noting first who makes it.

    Raises:
        FileExistsError: the folder exists already.
        WriteError: the note or the folder could not be written.
    """
    note = _note(run_dir)
    for attempt in (1, 2):
        with writing(note.parent):
            note.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_json(note, {"run_dir": f"{run_dir.parent.name}/{run_dir.name}", "pid": os.getpid(),
                              "hostname": socket.gethostname()})
            break
        except WriteError:
            if attempt == 2 or note.parent.is_dir():
                raise  # else another process's release() removed the emptied folder just now: again
    try:
        with writing(run_dir):
            run_dir.mkdir(parents=True)
    except BaseException:
        note.unlink(missing_ok=True)
        raise


def release(run_dir: Path) -> None:
    """The run in ``run_dir`` started (or its folder is gone): forget the note, if there is one."""
    note = _note(run_dir)
    note.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other runs are in setup(): their notes keep the folder
        note.parent.rmdir()


def clean_abandoned(runs_dir: Path) -> list[Path]:
    """Remove the run folders whose ``setup()`` was killed (see the module); returns the folders removed."""
    removed = []
    try:
        notes = sorted((runs_dir / SETUP_DIR).glob("*.json"))
    except OSError:
        return []
    for note in notes:
        found = _read(note)
        if found is None or not is_stale({"status": "running", "pid": found.get("pid"),
                                          "hostname": found.get("hostname")}):
            continue  # alive, another host's, or not a note of ours: left alone
        parts = Path(str(found.get("run_dir"))).parts
        if len(parts) != 2 or any(part in ("", ".", "..") for part in parts) or parts[1] != note.stem:
            continue  # a note that names a folder elsewhere is not one this module wrote
        folder = runs_dir / parts[0] / parts[1]
        if folder.is_symlink() or folder.parent.is_symlink() \
                or folder.resolve().parent.parent != runs_dir.resolve():
            continue
        if folder.is_dir() and not (folder / "run.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the experiment's other runs keep its folder
                folder.parent.rmdir()
            removed.append(folder)
        note.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (runs_dir / SETUP_DIR).rmdir()
    return removed


def _read(note: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
