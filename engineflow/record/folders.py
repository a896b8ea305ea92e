"""Reading run folders back, whatever state they are in, for ``engineflow runs reindex``.

A folder ``<runs_dir>/<experiment>/<run_id>/`` counts as a run when it holds any of
:data:`RUN_FILES`. Each damaged file costs only what it lost, and is described by one line
(``<path>: <what is wrong>; <what was done>``):

* ``run.json`` unreadable (missing, empty, cut short, not JSON, not UTF-8, not an object): the run
  is still listed, with status ``"damaged"``, its id from the folder's name, its experiment from
  the parent folder's name, its config from ``config.json``, its metrics from ``metrics.jsonl``
  and an ``error`` saying what happened to run.json. A ``status`` that is not a known one makes a
  run ``"damaged"`` too; other fields of the wrong type are reset to empty.
* ``metrics.jsonl``: each unreadable line (not UTF-8, not JSON, cut short by a killed write, not
  an ``{"epoch", "name", "value"}`` object) is skipped, every other line is kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from engineflow.record.schema import STATUSES, Row, metric

__all__ = ["RUN_FILES", "FolderRun", "read_folder", "read_record", "scan"]

RUN_FILES = ("run.json", "metrics.jsonl", "config.json", "code", "checkpoints")

_TEXT, _INT = (str, type(None)), (int, type(None))
# What the index and `runs list`/`runs show` rely on; a value of another type is reset to empty.
_FIELDS: dict[str, tuple[type, ...]] = {
    "started_at": _TEXT, "ended_at": _TEXT, "heartbeat_at": _TEXT, "hostname": _TEXT, "error": _TEXT,
    "run_dir": _TEXT, "recipe": _TEXT, "pid": _INT, "seed": _INT, "epochs": _INT, "max_epochs": _INT,
    "config": (dict,), "metrics": (dict,), "best": (dict,), "code": (dict,), "env": (dict,), "artifacts": (dict,),
    "resumes": (list,),
}


class FolderRun(NamedTuple):
    """One run folder as read: the record to index, its metric rows, and one line per damaged file."""

    folder: Path
    record: dict[str, Any]
    rows: list[Row]
    problems: list[str]
    stamp: tuple[Any, ...]

    @property
    def damaged(self) -> bool:
        return self.record["status"] == "damaged"

    def changed(self) -> bool:
        """Whether run.json or metrics.jsonl changed on disk since this reading."""
        return _stamp(self.folder) != self.stamp


def scan(runs_dir: Path) -> tuple[list[FolderRun], list[str]]:
    """Every run folder of ``runs_dir`` (sorted), and a line for each folder that could not be listed."""
    runs: list[FolderRun] = []
    problems: list[str] = []
    for experiment in _folders(runs_dir, problems):
        for folder in _folders(experiment, problems):
            found = read_folder(folder)
            if found is not None:
                runs.append(found)
    return runs, problems


def read_folder(folder: Path) -> FolderRun | None:
    """The run in ``folder``, salvaged as far as it goes; None when it holds none of :data:`RUN_FILES`."""
    stamp = _stamp(folder)  # before reading: a write during the reading shows as a change later
    path = folder / "run.json"
    data, trouble = _load_json(path)
    if trouble == "missing" and not any((folder / name).exists() for name in RUN_FILES):
        return None
    problems: list[str] = []
    rows, metrics_problem = _read_metrics(folder / "metrics.jsonl")
    if data is None or not isinstance(data, dict):
        trouble = trouble or f"holds a JSON {type(data).__name__}, not a run record object"
        record = _salvage(folder, rows, f"run.json {trouble}", problems)
        problems.insert(0, f"{path}: {trouble}; listed as \"damaged\" with what the folder still holds "
                           f"({len(rows)} metric value(s))")
    else:
        record, issues = _checked(data, folder)
        if issues:
            done = "listed as \"damaged\"" if record["status"] == "damaged" else "the rest is indexed"
            problems.append(f"{path}: {'; '.join(issues)}; {done}")
    if metrics_problem == "missing":
        if record.get("epochs"):
            problems.append(f"{folder / 'metrics.jsonl'}: missing; the run's per-epoch history is not indexed")
    elif metrics_problem:
        problems.append(f"{folder / 'metrics.jsonl'}: {metrics_problem}")
    if str(Path(str(record.get("run_dir"))).resolve()) != str(folder.resolve()):
        record["run_dir"] = str(folder.resolve())  # the runs folder was moved: point at where the run is now
    return FolderRun(folder, record, rows, problems, stamp)


def read_record(folder: Path) -> dict[str, Any] | None:
    """``run.json`` of ``folder`` as a dict; None when it is missing or cannot be read as one."""
    data, _ = _load_json(folder / "run.json")
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------- run.json
def _load_json(path: Path) -> tuple[Any, str | None]:
    """The JSON value in ``path``, or None and what is wrong with the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    if not data.strip():
        return None, "empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        if err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip()):
            return None, f"cut short: its JSON stops after {len(data)} bytes"
        return None, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except RecursionError:
        return None, "not a run record (JSON nested too deeply)"


def _checked(data: dict[str, Any], folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``data`` made indexable: fields of the wrong type replaced, each replacement described."""
    record = {k: v for k, v in data.items() if k != "history"}
    issues = []
    if not isinstance(record.get("id"), str) or not record["id"]:
        issues.append(f"'id' is {record.get('id')!r}, not a string: the folder name is used")
        record["id"] = folder.name
    if not isinstance(record.get("experiment"), str):
        issues.append(f"'experiment' is {record.get('experiment')!r}, not a string: the parent folder's name is used")
        record["experiment"] = folder.parent.name
    if record.get("status") not in STATUSES:
        issues.append(f"'status' is {record.get('status')!r}, not one of {', '.join(STATUSES[:-1])}")
        old = record.get("error")
        record["error"] = (f"run.json has an unknown status {record.get('status')!r}"
                           + (f"; its error: {old}" if isinstance(old, str) else ""))
        record["status"] = "damaged"
    for key, kinds in _FIELDS.items():
        value = record.get(key)
        if key in record and (not isinstance(value, kinds) or (isinstance(value, bool) and kinds == _INT)
                              or (kinds == _INT and isinstance(value, int) and not -(2**63) <= value < 2**63)):
            issues.append(f"'{key}' is {_article(_json_type(value))}, expected {_expected(kinds)}: reset")
            record[key] = {} if dict in kinds else [] if list in kinds else None
    best = record.get("best") or {}
    best_value = best.get("value")
    if best_value is not None and (isinstance(best_value, bool) or not isinstance(best_value, (int, float))):
        issues.append(f"'best' has the value {best_value!r}, not a number: reset")
        record["best"] = {}
    elif best and not all(isinstance(best.get(key), str) for key in ("metric", "mode")):
        issues.append("'best' lacks its metric or mode: reset")
        record["best"] = {}
    return record, issues


def _salvage(folder: Path, rows: list[Row], what: str, problems: list[str]) -> dict[str, Any]:
    """A record for a folder whose run.json is lost, from its name, config.json and metric rows."""
    config, trouble = _load_json(folder / "config.json")
    if trouble not in (None, "missing") or (trouble is None and not isinstance(config, dict)):
        problems.append(f"{folder / 'config.json'}: {trouble or 'not a JSON object'}; the config is left empty")
    last: dict[str, tuple[int, float | None]] = {}
    for epoch, name, value in rows:
        if name not in last or epoch >= last[name][0]:
            last[name] = (epoch, value)
    return {
        "id": folder.name, "experiment": folder.parent.name, "status": "damaged",
        "started_at": _started_from_id(folder.name), "ended_at": None,
        "config": config if isinstance(config, dict) else {}, "metrics": {k: v for k, (_, v) in last.items()},
        "epochs": max((epoch for epoch, _, _ in rows), default=0), "best": {}, "run_dir": str(folder.resolve()),
        "code": {}, "artifacts": {}, "resumes": [],
        "error": f"{what}; this record was rebuilt from what the folder still holds",
    }


def _started_from_id(run_id: str) -> str | None:
    # run ids start with the local start time (engineflow.runtime.new_run_id)
    try:
        local = datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        return None
    return local.astimezone().astimezone(timezone.utc).isoformat()


# ----------------------------------------------------------------------------------------------- metrics.jsonl
def _read_metrics(path: Path) -> tuple[list[Row], str | None]:
    """The readable rows of a metrics.jsonl, and what is wrong with the rest (None: nothing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], "missing"
    except IsADirectoryError:
        return [], "is a folder, not a file; the run's per-epoch history is not indexed"
    except OSError as err:
        return [], f"cannot be read ({err.strerror or err}); the run's per-epoch history is not indexed"
    rows: list[Row] = []
    bad: list[str] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        torn = number == len(lines)  # no newline after it: the write stopped mid-line
        try:
            item = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"line {number}: not UTF-8")
            continue
        except (ValueError, RecursionError):
            bad.append(f"line {number}: {'cut short' if torn else 'not JSON'}")
            continue
        try:
            rows.append(metric((item["epoch"], item["name"], item["value"])))
        except (TypeError, KeyError, ValueError, IndexError, OverflowError):
            bad.append(f"line {number}: not an epoch/name/value record")
    if not bad:
        return rows, None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return rows, f"{len(bad)} unreadable line(s) skipped ({shown}); {len(rows)} metric value(s) indexed"


# ----------------------------------------------------------------------------------------------- helpers
def _folders(parent: Path, problems: list[str]) -> Iterable[Path]:
    try:
        children = sorted(parent.iterdir())
    except FileNotFoundError:
        return []
    except OSError as err:
        problems.append(f"{parent}: cannot be listed ({err.strerror or err}); the runs in it are not indexed")
        return []
    return [child for child in children if child.is_dir() and not child.name.startswith(".")]


def _stamp(folder: Path) -> tuple[Any, ...]:
    stamps = []
    for name in ("run.json", "metrics.jsonl"):
        try:
            stat = os.stat(folder / name)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _expected(kinds: tuple[type, ...]) -> str:
    return " or ".join(_json_type(kind()) if kind is not type(None) else "null" for kind in kinds)
