"""Checkpoints on disk, written atomically: a crash mid-save never leaves the run without one.

Two kinds of file:

* weights (``checkpoints/best.pt`` and ``last.pt``, written when the run ends): component name ->
  ``state_dict``, plus ``meta``, and for a run that keeps an EMA of a module, ``ema``: component
  name -> its average (see :func:`~engineflow.state.averages.file_weights`; ``best.pt`` holds an
  average validation evaluated as its module's weights too); what ``ef.load_run`` and
  ``engineflow test``/``eval`` read. Before they exist (a run still going, or killed) the full-state
  files stand in: the newest for "last", the best epoch's for "best". (Without ``keep_best``,
  best.pt is written at each improvement.)
* full state (``checkpoints/state-<iteration>.pt``): everything a resume needs (see
  :mod:`engineflow.state.rng`), each with a checksum file beside it (``.xxh3``: XXH3-128 of the whole
  file; earlier versions wrote ``.sha256``, which is still read). A file that fails its checksum is
  reported and the previous one is used. ``torch.load`` checks nothing itself (a flipped byte in a
  tensor loads silently), so the checksum is the only check; torch's per-record CRC32 is therefore
  not computed for these files (it would cost as much as the save's copy of the data, for nothing).

Loading never runs code from a file: both kinds are read with ``torch.load(weights_only=True)``,
which builds tensors and plain values only. A file that holds anything else (a pickle crafted to run
code, copied into a run folder; a checksum beside it proves nothing, anyone can compute one) raises
:class:`UnsafeCheckpointError` naming it; it is never skipped silently for an older checkpoint.

Every file goes to a temporary name in the same folder, is fsynced, renamed over the target, and
the folder is fsynced (Ignite's ``DiskSaver(atomic=True)`` renames without the fsyncs). A write that
fails (no space left) removes its temporary file and raises :class:`~engineflow.errors.WriteError`
naming the file; the files written before it are untouched.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import xxhash

from engineflow.errors import RecipeError
from engineflow.files import writing
from engineflow.state.averages import average_states, file_weights
from engineflow.state.best import ranked
from engineflow.state.components import trainable
from engineflow.state.resume import ResumeRecord, best_files_of

_USE_ANOTHER_CHECKPOINT = ("Delete it and its checksum file (a checksum proves nothing here: anyone can compute "
                           "one) to use the previous checkpoint, or use a checkpoint from a run you trust.")


class UnsafeCheckpointError(RecipeError):
    """A checkpoint holds objects other than tensors and plain values; engineflow does not load it.

    Attributes:
        path: the file.
        found: what was refused, e.g. "a reference to posix.system".
    """

    def __init__(self, path: Path, found: str, instead: str = _USE_ANOTHER_CHECKPOINT) -> None:
        super().__init__(
            f"{path} holds objects engineflow does not load ({found}): loading them could run code, so the "
            f"file may have been crafted. Nothing in it was run. {instead}"
        )
        self.path = path
        self.found = found


def _earlier_numpy_globals() -> list[Any]:
    """What unpickling the NumPy RNG state of earlier versions needs: a uint32 array and its dtype.

    Earlier versions saved ``np.random.get_state()`` as it is; these rebuild that array and nothing
    else. NumPy 2 moved ``numpy.core`` to ``numpy._core``, so the array-building function is
    allowed under both names a file may use, whichever NumPy wrote it.
    """
    try:
        import numpy as np
    except ImportError:
        return []
    reconstruct = np.zeros(0, np.uint32).__reduce__()[0]  # found this way: its module differs by version
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]


@contextmanager
def _allowing(extra: list[Any]) -> Iterator[None]:
    """Allow ``extra`` for ``weights_only`` loads inside the block only.

    torch keeps the allowlist process-wide, and its context manager removes on exit what it added:
    entries the caller had allowed already are left out, so they stay allowed afterwards.
    """
    before = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([item for item in extra if item not in before]):
        yield


def _load(path: Path, extra: list[Any], *, mmap: bool = False, instead: str = _USE_ANOTHER_CHECKPOINT) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; a refused object raises :class:`UnsafeCheckpointError`
    (``instead``: what to do about it)."""
    try:
        with _allowing(extra):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "WeightsUnpickler" not in text and "Weights only load failed" not in text:
            raise
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
        name = re.search(r"GLOBAL (\S+)", detail)
        found = f"a reference to {name.group(1)}" if name else detail.split(". ")[0]
        raise UnsafeCheckpointError(path, found, instead) from None


def load_record(path: Path) -> ResumeRecord:
    """The record of the full-state checkpoint ``path`` (see :func:`load_state`)."""
    return ResumeRecord.from_dict(load_state(path))


def load_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read the full-state checkpoint ``path`` (on CPU) without running any code it may hold.

    Only tensors and plain values are built, plus the uint32 NumPy array in which earlier versions
    saved the NumPy RNG state; anything else raises :class:`UnsafeCheckpointError`. ``mmap=True``
    maps the tensor data instead of reading it: a cheap check that the file loads.
    """
    return _load(path, _earlier_numpy_globals(), mmap=mmap)


def atomic_save(obj: Any, path: Path, *, sync_folder: bool = True, checksum: bool = False,
                sync: bool = True) -> str | None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    ``checksum=True`` returns the file's XXH3-128 (hex), computed as it is written (no second read),
    and skips torch's per-record CRC32 (which ``torch.load`` never checks).
    ``sync_folder=False`` leaves the folder's fsync to the caller, who renames more files first;
    ``sync=False`` leaves every fsync to the caller (see :func:`make_durable`).

    Raises:
        WriteError: the file could not be written (:class:`~engineflow.errors.DiskFullError`: no space
            left); the temporary file is gone and ``path`` is as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path):
            with tmp.open("wb") as out:
                writer = _Writer(out, checksum=checksum)
                try:
                    if checksum:
                        with _no_torch_crc32():
                            torch.save(obj, writer)
                    else:
                        torch.save(obj, writer)
                except Exception:
                    # torch reports a failed write as its own RuntimeError ("unexpected pos"); the
                    # OSError the file raised says what happened
                    if writer.failure is not None:
                        raise writer.failure from None
                    raise
                out.flush()
                if sync:
                    os.fsync(out.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync and sync_folder:
        _fsync_dir(path.parent)
    return writer.digest.hexdigest() if writer.digest is not None else None


@contextmanager
def _no_torch_crc32() -> Iterator[None]:
    # torch keeps the flag in a process-wide config; a save in another thread meanwhile also skips
    # its CRC32, which torch.load ignores anyway.
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _Writer:
    """The binary file ``torch.save`` writes to: passes the data to ``out``, hashing it when asked,
    and keeps the ``OSError`` a write raised (torch replaces it with an error of its own)."""

    def __init__(self, out: Any, *, checksum: bool) -> None:
        self.out = out
        self.digest = CHECKSUMS[CHECKSUM_SUFFIX]() if checksum else None  # the hash that save_checkpoint records
        self.failure: OSError | None = None

    def write(self, data: Any) -> int:
        if self.digest is not None:
            self.digest.update(data)
        try:
            return self.out.write(data)
        except OSError as err:
            self.failure = err
            raise

    def flush(self) -> None:
        try:
            self.out.flush()
        except OSError as err:
            self.failure = err
            raise


def _fsync_dir(folder: Path) -> None:
    # the rename itself is durable only once the directory entry is flushed
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(path: Path, modules: Mapping[str, torch.nn.Module], meta: Mapping[str, Any], *,
                 parts: Mapping[str, Any] | None = None, best: bool = False) -> None:
    """Save every module's ``state_dict`` (moved to CPU), which of its parameters train
    (``requires_grad``) and ``meta`` atomically to ``path``; with the weight averages among a fit's
    ``parts`` beside them (for ``best``, an average validation evaluated as its module's weights)."""
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: m.state_dict() for name, m in modules.items()}
    _save_file(path, weights, average_states(parts or {}), meta, trainable(modules), best=best)


def _save_file(path: Path, weights: Mapping[str, Any], averages: list[Mapping[str, Any]], meta: Mapping[str, Any],
               flags: Mapping[str, list[bool]], *, best: bool) -> None:
    chosen, ema = file_weights(weights, averages, best=best)
    saved = {"weights": chosen, "meta": dict(meta), "requires_grad": dict(flags)}
    if ema:
        saved["ema"] = ema
    atomic_save(saved, path)


def saved_flags(path: Path) -> dict[str, list[bool]] | None:
    """Which parameters of each module trained when the weights file ``path`` was written, or None
    (no such file, or one written before engineflow kept them). Reads nothing but plain values."""
    if not path.is_file():
        return None
    try:
        saved = _load(path, [], instead="Delete it, or use weights from a run you trust.", mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:
        return None
    flags = saved.get("requires_grad")
    return dict(flags) if isinstance(flags, Mapping) else None


def load_weights(path: Path, modules: Mapping[str, torch.nn.Module], *, ema: bool = False) -> dict[str, Any]:
    """Load weights saved by :func:`save_weights` into ``modules``; returns the file's ``meta``.
    ``ema``: each module the file holds an average of gets the average instead."""
    if not path.is_file():
        raise RecipeError(f"no weights at {path}; the run may have stopped before its first epoch ended")
    try:
        saved = _load(path, [], instead="Delete it, or use weights from a run you trust.")
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise RecipeError(f"cannot read weights {path}: {type(err).__name__}: {err}") from None
    weights = saved["weights"]
    if ema:
        weights = {**weights, **_averages_or_refuse(saved.get("ema") or {}, path)}
    _load_states(modules, _module_states(weights, modules, path))
    return saved["meta"]


def load_checkpoint_weights(record: ResumeRecord, modules: Mapping[str, torch.nn.Module], path: Path, *,
                            best: bool = False, ema: bool = False) -> None:
    """Load the modules' weights from a full-state checkpoint's record (``path`` names it in errors)
    as :func:`export_weights` would write them (``best``: best.pt's), or (``ema``) their averages."""
    chosen, averages = file_weights(_module_states(record.components, modules, path), average_states(record.parts),
                                    best=best)
    if ema:
        chosen = {**chosen, **_averages_or_refuse(averages, path)}
    _load_states(modules, chosen)


def _averages_or_refuse(averages: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    if not averages:
        raise RecipeError(f"{path} holds no EMA of the weights: the run did not keep one (declare ef.ema(...) in "
                          "the recipe), or it was recorded before engineflow kept them")
    return averages


def export_weights(checkpoint: Path | ResumeRecord, path: Path, names: list[str], meta: Mapping[str, Any],
                   *, source: Path | None = None) -> None:
    """Write the weights file ``path`` (as :func:`save_weights` does) from the modules ``names`` of the
    full-state ``checkpoint`` (its file, or its record read from ``source``): the best epoch's
    weights, taken from its checkpoint when a run ends, with its weight averages as best.pt holds them."""
    record = load_record(checkpoint) if isinstance(checkpoint, Path) else checkpoint
    where = checkpoint if isinstance(checkpoint, Path) else source
    flags = {name: list(record.requires_grad[name]) for name in names if name in record.requires_grad}
    _save_file(path, _module_states(record.components, names, where), average_states(record.parts), meta, flags,
               best=True)


def _module_states(saved: Mapping[str, Any], names: Iterable[str], path: Path) -> dict[str, Any]:
    """``saved[name]`` for each module name, or an error naming ``path`` and what it holds."""
    missing = [name for name in names if name not in saved]
    if missing:
        raise RecipeError(f"{path} has no weights for {', '.join(missing)}; it holds {', '.join(saved)}")
    return {name: saved[name] for name in names}


def _load_states(modules: Mapping[str, torch.nn.Module], states: Mapping[str, Any]) -> None:
    for name, module in modules.items():
        module.load_state_dict(states[name])


def best_checkpoint(folder: Path, skip: Callable[[Path, str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The kept checkpoint of the best epoch, as the newest intact checkpoint ranks them, or None.

    Each damaged file passed over (the newest ones, a better-ranked one) is given to ``skip`` with why.
    """
    newest = newest_intact(folder, skip)
    if newest is None:
        return None
    files = best_files_of(newest[1])
    for name in ranked(files.scores, files.mode or "max"):
        path = folder / name
        if path == newest[0]:
            return newest
        if path.is_file():
            loaded, problem = _intact(path)
            if loaded is not None:
                return path, loaded
            skip(path, problem)
    return None


# Full training-state checkpoints: numbered files beside a checksum each ------------------------

# Suffix of the checksum file beside each checkpoint -> the hash it holds. The first is written;
# the others are read, so runs checkpointed by older versions still resume.
CHECKSUMS: dict[str, Callable[[], Any]] = {".xxh3": xxhash.xxh3_128, ".sha256": hashlib.sha256}
CHECKSUM_SUFFIX = next(iter(CHECKSUMS))


def _file_digest(path: Path, new_hash: Callable[[], Any]) -> str:
    digest = new_hash()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, name: str, state: Mapping[str, Any], *, durable: bool = True) -> Path:
    """Write ``state`` to ``folder/name`` atomically, then its checksum beside it.

    The checksum is written last: a crash before it leaves a file that :func:`verify` does not
    trust, and the previous checkpoint is used. ``durable=False`` returns once both files are
    renamed into place, before any fsync: a process killed after that finds them whole (the
    operating system has their data); :func:`make_durable` then makes them survive a machine's crash
    (until then, a crash may leave a file its checksum does not match, and the previous one is used).
    """
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    digest = atomic_save(dict(state), path, sync_folder=False, checksum=True, sync=durable)
    checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
    tmp = checksum.with_name(f".{checksum.name}.tmp{os.getpid()}")
    try:
        with writing(checksum):
            with tmp.open("w") as out:
                out.write(f"{digest}  {path.name}\n")
                out.flush()
                if durable:
                    os.fsync(out.fileno())
            os.replace(tmp, checksum)
    except BaseException:
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # a checkpoint without its checksum is never used: its space is freed
        raise
    # One folder fsync for both renames: both files' contents are already on disk, so whichever
    # renames a crash keeps, a checksum never vouches for a partial file.
    if durable:
        _fsync_dir(folder)
    return path


def make_durable(paths: Iterable[Path]) -> None:
    """fsync each checkpoint of ``paths`` (written with ``durable=False``), its checksum file, then
    their folders: from then on they survive a machine's crash.

    Raises:
        WriteError: an fsync failed (the file's data may not be on disk), naming the file.
    """
    folders: dict[Path, None] = {}
    for path in paths:
        for part in (path, path.with_name(path.name + CHECKSUM_SUFFIX)):
            with writing(part):
                fd = os.open(part, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        folders[path.parent] = None
    for folder in folders:
        with writing(folder):
            _fsync_dir(folder)


def checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first (by the iteration in their name)."""
    return sorted(folder.glob("state-*.pt"), key=_iteration_of)


def _iteration_of(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


def verify(path: Path) -> str | None:
    """None when ``path`` matches its recorded checksum, else why it does not."""
    found = [(checksum, new_hash) for suffix, new_hash in CHECKSUMS.items()
             if (checksum := path.with_name(path.name + suffix)).is_file()]
    if not found:
        return "no checksum beside it (the save did not finish)"
    checksum, new_hash = found[0]
    text = checksum.read_text()
    expected = text.split()[0] if text.strip() else ""
    actual = _file_digest(path, new_hash)
    if actual != expected:
        return f"checksum mismatch (expected {expected[:12]}..., file has {actual[:12]}...)"
    return None


def load_latest(folder: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes its checksum and loads; damaged ones are reported via ``warn``.

    A file that passes its checksum but holds objects engineflow does not load raises
    :class:`UnsafeCheckpointError` instead of falling back: an intact file with such content was
    put there on purpose, and training on from an older file of the same folder would hide that.
    """
    return newest_intact(folder, lambda path, problem: warn(f"checkpoint {path} is damaged ({problem}); "
                                                            "trying the previous one"))


def newest_intact(folder: Path, skip: Callable[[Path, str], None]) -> tuple[Path, dict[str, Any]] | None:
    """:func:`load_latest`, giving each damaged checkpoint passed over to ``skip`` with why."""
    for path in reversed(checkpoint_files(folder)):
        loaded, problem = _intact(path)
        if loaded is not None:
            return path, loaded
        skip(path, problem)
    return None


def _intact(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint's content when it passes its checksum and loads, else None and why not.

    Raises:
        UnsafeCheckpointError: it passes its checksum but holds objects engineflow does not load.
    """
    problem = verify(path)
    if problem is None:
        try:
            return load_state(path), ""
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
    return None, problem


def prune(folder: Path, keep: set[Path]) -> None:
    """Delete checkpoint files (and their checksums) not in ``keep``."""
    for path in checkpoint_files(folder):
        if path not in keep:
            for suffix in CHECKSUMS:
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
