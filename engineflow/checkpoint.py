"""Model weights on disk, written atomically: a crash mid-save never leaves a torn file.

A weights file maps component names to ``state_dict``s: ``{"model": {...}}``, or several for
a GAN (``{"generator": ..., "discriminator": ...}``), plus a small ``meta`` dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engineflow.errors import RecipeError


def modules_of(components: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """The ``nn.Module`` components by name; a dict of modules gives ``name.key`` entries."""
    found: dict[str, torch.nn.Module] = {}
    for name, value in components.items():
        if isinstance(value, torch.nn.Module):
            found[name] = value
        elif isinstance(value, Mapping) and name != "loaders":
            found.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, torch.nn.Module)})
    return found


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            torch.save(obj, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # the rename itself is durable only once the directory entry is flushed
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(path: Path, modules: Mapping[str, torch.nn.Module], meta: Mapping[str, Any]) -> None:
    """Save every module's ``state_dict`` (moved to CPU) and ``meta`` atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    states = {name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in modules.items()}
    atomic_save({"weights": states, "meta": dict(meta)}, path)


def load_weights(path: Path, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """Load weights saved by :func:`save_weights` into ``modules``; returns the file's ``meta``."""
    if not path.is_file():
        raise RecipeError(f"no weights at {path}; the run may have stopped before its first epoch ended")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RecipeError(f"cannot read weights {path}: {type(err).__name__}: {err}") from None
    missing = [name for name in modules if name not in saved["weights"]]
    if missing:
        raise RecipeError(f"{path} has no weights for {', '.join(missing)}; it holds {', '.join(saved['weights'])}")
    for name, module in modules.items():
        module.load_state_dict(saved["weights"][name])
    return saved["meta"]
