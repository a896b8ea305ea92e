"""Telling a live run from a dead one: a "running" run whose process is gone counts as interrupted.

On the run's own host a dead pid decides; anywhere, a heartbeat older than
:data:`HEARTBEAT_TIMEOUT_S` does. A judgement can be out of date by the time it is acted on (the
run may have been resumed meanwhile), so whoever marks a run interrupted re-checks with
:func:`still_stale` under the index's write lock.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from typing import Any

__all__ = ["HEARTBEAT_INTERVAL_S", "HEARTBEAT_TIMEOUT_S", "interrupted", "is_stale", "parse_time", "still_stale",
           "utc"]

# A live runner refreshes ``heartbeat_at`` every HEARTBEAT_INTERVAL_S; ten missed beats mean it is gone.
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_TIMEOUT_S = 300.0
# What identifies one process's life of a run: a resume changes the pid, a live process the heartbeat.
_LIFE = ("status", "pid", "hostname", "heartbeat_at")


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
    beat = parse_time(record.get("heartbeat_at"))
    return beat is not None and (now - beat).total_seconds() > heartbeat_timeout_s


def still_stale(current: dict[str, Any] | None, judged: dict[str, Any], now: datetime | None = None, *,
                heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> bool:
    """Whether ``current`` (the run as stored now) is the same dead life that was ``judged`` stale.

    A run resumed, finished or beating since the judgement has another pid, status or
    heartbeat, and must not be marked interrupted on the strength of the older reading.
    """
    return (current is not None and all(current.get(key) == judged.get(key) for key in _LIFE)
            and is_stale(current, now, heartbeat_timeout_s=heartbeat_timeout_s))


def interrupted(record: dict[str, Any]) -> dict[str, Any]:
    """The fields that mark a stale run interrupted: the status, no pid, and an ``error`` saying why."""
    error = record.get("error")
    if error is None:
        error = (f"no sign of life from the run's process (pid {record.get('pid')} on {record.get('hostname')}, "
                 f"last heartbeat {record.get('heartbeat_at')}): it ended without recording an outcome")
    return {"status": "interrupted", "pid": None, "error": error}


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


def parse_time(text: Any) -> datetime | None:
    """An ISO time string as an aware datetime (UTC when it names no offset); None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def utc(text: Any) -> Any:
    """``text`` as a UTC ISO string, so that the column sorts by time whatever offset was written."""
    moment = parse_time(text)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds") if moment else text
