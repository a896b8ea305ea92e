"""Small file helpers shared by the run outputs: JSON written atomically, and write errors that name their file.

A write that fails (a full disk, a read-only folder) becomes one :class:`~engineflow.errors.WriteError`
naming the file, :class:`~engineflow.errors.DiskFullError` when no space was left, instead of an
``OSError`` deep in a library; and the temporary file of an atomic write never outlives it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engineflow.errors import DiskFullError, WriteError

# What a write fails with when no space is left: the disk, a quota, or the process's file size
# limit (RLIMIT_FSIZE, when SIGXFSZ is ignored: a write past it fails with EFBIG).
NO_SPACE = frozenset(code for code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if code is not None)
# Below this many free bytes a filesystem counts as full, for writers whose errors carry no errno (SQLite).
FULL_MARGIN = 1 << 20


def no_space_message(path: Any, err: OSError | None = None) -> str:
    """The one line that says no space was left for ``path``, and what to do.

    Example:
        >>> no_space_message("runs/d/1/last.pt", OSError(errno.EFBIG, "File too large"))[:71]
        'No space left on device while writing runs/d/1/last.pt (File too large)'
    """
    why = f" ({err.strerror})" if err is not None and err.errno != errno.ENOSPC and err.strerror else ""
    return (f"No space left on device while writing {path}{why}; free some space, then run the command again "
            "(a run continues from its latest checkpoint with --resume)")


def write_error(err: OSError, path: Any) -> WriteError:
    """``err``, raised while writing ``path``, as the error engineflow reports: one line naming the file."""
    if err.errno in NO_SPACE:
        return DiskFullError(no_space_message(path, err), path)
    if err.errno == errno.EROFS:
        return WriteError(f"cannot write {path}: its folder is on a read-only filesystem", path)
    return WriteError(f"cannot write {path}: {err.strerror or err}", path)


@contextmanager
def writing(path: Any) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :func:`write_error` naming ``path``.

    Example:
        >>> with writing("out/x.json"):  # doctest: +ELLIPSIS
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        engineflow.errors.DiskFullError: No space left on device while writing out/x.json; free some space...
    """
    try:
        yield
    except OSError as err:
        raise write_error(err, path) from err


def out_of_space(folder: Path, files: Iterable[Path] = ()) -> bool:
    """Whether writes in ``folder`` fail for lack of space: its filesystem has less than
    :data:`FULL_MARGIN` free, or one of ``files`` is within that margin of the process's file size
    limit. For writers whose errors do not carry the ``errno`` (SQLite's "disk I/O error")."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    if stat.f_bavail * stat.f_frsize < FULL_MARGIN:
        return True
    try:
        import resource
    except ImportError:
        return False
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return False
    for path in files:
        try:
            if path.stat().st_size + FULL_MARGIN >= limit:
                return True
        except OSError:
            continue
    return False


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing). A failed append takes back what it wrote,
    so no torn line is left behind.

    Raises:
        WriteError: the file could not be written (:class:`~engineflow.errors.DiskFullError`: no space).
    """
    data = memoryview(text.encode("utf-8"))
    with writing(path), path.open("ab", buffering=0) as out:
        start = out.tell()
        try:
            while data:
                data = data[out.write(data) or 0:]
        except OSError:
            with contextlib.suppress(OSError):  # what remains is a line cut short, which readers skip
                os.ftruncate(out.fileno(), start)
            raise


def write_json(path: Path, data: Any, *, durable: bool = False, in_place_when_full: bool = False) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old file or the new one, never half.

    ``durable=True`` also fsyncs before the rename, so the file survives a power loss; it costs
    milliseconds to a second on slow disks, so per-epoch records skip it (a killed process
    cannot tear them either way).

    ``in_place_when_full=True``: when no space is left for the temporary copy, the file is
    overwritten in place, compact, if that fits in the space it already has (a run's record that
    must say how the run ended). Only then can a reader see it half written.

    Raises:
        WriteError: the file could not be written (:class:`~engineflow.errors.DiskFullError`: no space).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path):
            try:
                with tmp.open("w", encoding="utf-8") as out:
                    json.dump(data, out, indent=2, sort_keys=True, default=str)
                    out.write("\n")
                    if durable:
                        out.flush()
                        os.fsync(out.fileno())
                os.replace(tmp, path)
            except OSError as err:
                if not (in_place_when_full and err.errno in NO_SPACE and _overwrite(path, data)):
                    raise
    finally:
        tmp.unlink(missing_ok=True)


def _overwrite(path: Path, data: Any) -> bool:
    """Write ``data`` over ``path`` in place, compact, when it fits in the space the file already has.

    The file keeps at least its size (spaces after the JSON), so that a later record that must go
    the same way finds the same room.
    """
    text = (json.dumps(data, sort_keys=True, default=str, separators=(",", ":")) + "\n").encode("utf-8")
    try:
        stat = path.stat()
        room = max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)  # the blocks it holds take no new space
        if not path.is_file() or len(text) > room:
            return False
        with path.open("r+b") as out:
            out.write(text.ljust(stat.st_size))
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        return False
    return True
