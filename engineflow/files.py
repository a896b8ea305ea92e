"""Small file helpers shared by the run outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old file or the new one, never half.

    ``durable=True`` also fsyncs before the rename, so the file survives a power loss; it costs
    milliseconds to a second on slow disks, so per-epoch records skip it (a killed process
    cannot tear them either way).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as out:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
        if durable:
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)
