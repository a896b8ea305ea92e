"""A launch's private folder: made, held for as long as its launcher lives, removed after it.

The launcher of ``engineflow run --nproc N`` keeps the command, the store its processes meet
through and their results in a temporary folder that only its user can read. It removes the folder
when it ends; a launcher killed outright cannot, and the folder (which holds the command's
arguments) would stay. So the launcher holds a lock on a file in it (``flock``: the kernel lets go
of it when the process ends, however it ends), and the next launch or ``runs list``/``runs show``
removes this user's folders whose lock is free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

PREFIX = "engineflow-launch-"
LOCK = ".lock"
# a folder without its lock file: its launcher died between making it and locking it, or is there now
ABANDONED_AFTER_S = 3600.0


def make() -> tuple[Path, IO[bytes] | None]:
    """A new launch folder, and the open file whose lock says it is in use (close it to let go).

    The lock file is locked under a name of its own and then renamed into place, so that nobody finds
    it in the folder unlocked."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder is removed by its launcher only
        return folder, None
    held = (folder / f"{LOCK}.new").open("wb")
    with contextlib.suppress(OSError):
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(folder / f"{LOCK}.new", folder / LOCK)
    return folder, held


def remove_abandoned() -> list[Path]:
    """Remove this user's launch folders whose launcher is gone (see the module); returns them."""
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            lock = folder / LOCK
            if not lock.exists():
                if time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
                    continue  # a launcher between making the folder and locking it
            else:
                with lock.open("rb") as probe:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its launcher lives
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
