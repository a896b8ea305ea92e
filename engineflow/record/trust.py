"""Whether a run's code snapshot may be imported: its files are the ones recorded, by this user.

Loading a run (``ef.load_run``, ``engineflow test/eval --run ID``) imports its ``code/`` snapshot, so
whoever can write a run folder can make code run in the process that loads it. When a run is made,
the sha256 digest of every file of ``code/`` is recorded in its ``run.json`` (``code.digests``), and
that list is signed with an HMAC-SHA256 under a key only this user can read (``code.signature``), as
Jupyter signs the notebooks a user trusts. Before a snapshot is imported:

* every file must match its digest, and no file may be added (a compiled ``__pycache__`` file
  included: Python would run it instead of the source) or missing. This holds with ``trust_code``
  too: it vouches for who wrote the run, and these files are not what they recorded;
* the signature must verify with this user's key, and the run folder and its snapshot must belong to
  this user (another owner could change them after the check). A run recorded by another user, on
  another machine, or by an earlier engineflow version (no digests) needs ``trust_code=True``
  (``--trust-code``), or ``engineflow runs trust RUN``, which signs the snapshot as it is now.

The digests alone prove nothing against someone who can write the folder (they can rewrite
``run.json`` too); the signature is what they cannot forge without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engineflow.errors import RecipeError
from engineflow.naming import option

DIGEST = "sha256"
SIGNING = "hmac-sha256"
_KEY_BYTES = 32


class UntrustedCodeError(RecipeError):
    """A run's code snapshot may not be imported: it changed since it was recorded, or nothing shows
    that this user recorded it (exit 2)."""


# The key -------------------------------------------------------------------------------------------------------

def key_path() -> Path:
    """This user's signing key: ``$XDG_DATA_HOME/engineflow/key``, by default ``~/.local/share/engineflow/key``."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "engineflow" / "key"


def user_key() -> bytes:
    """This user's signing key, made on first use (32 random bytes, readable by this user alone).

    Raises:
        RecipeError: the key file is readable by others, belongs to someone else, or is damaged.
    """
    path = key_path()
    if not path.exists():
        _create_key(path)
    if os.name == "posix":
        found = path.stat()
        if found.st_uid != os.geteuid() or found.st_mode & 0o077:
            raise RecipeError(f"engineflow's signing key {path} must belong to you and be readable by you alone: "
                              f"chmod 600 {path}")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != _KEY_BYTES:
        raise RecipeError(f"engineflow's signing key {path} is damaged; delete it (a new one is made, and the runs "
                          "signed with the old one then need --trust-code, or `engineflow runs trust RUN` once)")
    return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(secrets.token_hex(_KEY_BYTES) + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile: its signatures stay valid
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


# Recording -----------------------------------------------------------------------------------------------------

def seal(run_id: str, code_dir: Path, *, signed: bool = True) -> dict[str, Any]:
    """The ``code`` fields that let a later load check the snapshot in ``code_dir``: ``digests``
    (``{"algorithm": "sha256", "files": {path in code/: hex}}``) and ``signature``.

    The signature is left out when this user's key cannot be made or read (a read-only home); such a
    run then loads with ``trust_code=True`` only. ``signed=False`` raises that key error instead.
    """
    digests = {"algorithm": DIGEST, "files": {rel: _digest(path) for rel, path in _entries(code_dir)}}
    try:
        key = user_key()
    except (OSError, RecipeError) as err:
        if not signed:
            raise
        print(f"note: run {run_id}'s code snapshot is recorded unsigned ({err}); loading it will need "
              f"{option('trust_code')}", file=sys.stderr, flush=True)
        return {"digests": digests}
    return {"digests": digests, "signature": {"algorithm": SIGNING, "value": _sign(key, run_id, digests)}}


def _entries(code_dir: Path) -> list[tuple[str, Path]]:
    """Every entry of ``code_dir`` that is not a directory (files, links), by path relative to it."""
    found = []
    for folder, dirs, files in os.walk(code_dir):  # does not follow links to folders: they are listed
        here = Path(folder)
        links = [name for name in dirs if (here / name).is_symlink()]
        for name in (*files, *links):
            found.append(((here / name).relative_to(code_dir).as_posix(), here / name))
    return sorted(found)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sign(key: bytes, run_id: str, digests: Mapping[str, Any]) -> str:
    message = json.dumps({"run": run_id, "digests": digests}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


# Loading -------------------------------------------------------------------------------------------------------

def checked_recipe(record: Mapping[str, Any], run_dir: Path, *, trust_code: bool) -> Path:
    """The recipe file of run ``record``'s snapshot, once the snapshot may be imported (see the module).

    Raises:
        UntrustedCodeError: one line naming the file or the reason, and what to do; nothing was imported.
    """
    run_id, code_dir = record["id"], run_dir / "code"
    code = record.get("code") if isinstance(record.get("code"), dict) else {}
    files = code.get("files")
    if not isinstance(files, list) or not files or not isinstance(files[0], str):
        raise UntrustedCodeError(f"run {run_id}'s record names no recipe file of its code snapshot (code.files in "
                                 f"{run_dir / 'run.json'}); it cannot be loaded as it was")
    recipe = code_dir / "files" / files[0]
    review = (f"Review {code_dir}, then pass {option('trust_code')} or sign it once with "
              f"`engineflow runs trust {run_id}`")
    digests = code.get("digests")
    if digests is None:
        if trust_code:
            return recipe
        raise UntrustedCodeError(f"run {run_id} was recorded by an earlier engineflow version: its code snapshot has "
                                 "no digests, so nothing shows it is the code the run used, and loading the run "
                                 f"imports it. {review}")
    _check_files(run_id, code_dir, digests)
    if f"files/{files[0]}" not in digests["files"]:
        raise UntrustedCodeError(f"run {run_id}'s recipe {recipe} is not among the files its snapshot recorded; "
                                 "nothing was imported")
    if trust_code:
        return recipe
    other = other_owner(run_dir)
    if other is not None:
        raise UntrustedCodeError(f"{other[0]} belongs to another user (uid {other[1]}), who could change run "
                                 f"{run_id}'s code after any check, and loading the run imports it. Review {code_dir}, "
                                 f"then pass {option('trust_code')}, or copy the run folder to own it")
    signature = code.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != SIGNING:
        raise UntrustedCodeError(f"run {run_id}'s code snapshot has no signature (its key could not be written when it "
                                 f"was recorded, or the record was changed), and loading the run imports it. {review}")
    if not hmac.compare_digest(str(signature.get("value")), _sign(user_key(), run_id, digests)):
        raise UntrustedCodeError(f"run {run_id}'s code snapshot is not signed with your key ({key_path()}): another "
                                 "user or machine recorded it, or its record was changed since, and loading the run "
                                 f"imports its code. {review}")
    return recipe


def _check_files(run_id: str, code_dir: Path, digests: Any) -> None:
    """Every file of ``code_dir`` matches ``digests``; else the first that does not, named."""
    recorded = digests.get("files") if isinstance(digests, dict) else None
    if not isinstance(recorded, dict) or digests.get("algorithm") != DIGEST:
        raise UntrustedCodeError(f"run {run_id}'s record holds no {DIGEST} digests of its code snapshot that "
                                 f"engineflow can read (code.digests: {str(digests)[:80]}); nothing was imported")
    if code_dir.is_symlink():
        raise UntrustedCodeError(f"{code_dir} is a symbolic link, not the code snapshot run {run_id} recorded; "
                                 "nothing was imported")
    restore = "Restore it (git.json and diff.patch name the code)"
    found = dict(_entries(code_dir)) if code_dir.is_dir() else {}
    for rel in sorted(set(found) | set(recorded)):
        path = code_dir / rel
        if rel not in found:
            problem, fix = f"{path} is missing from run {run_id}'s code snapshot", restore
        elif rel not in recorded:
            problem, fix = f"{path} was not recorded with run {run_id}'s code snapshot (added since)", "Delete it"
        elif path.is_symlink():
            problem, fix = f"{path} in run {run_id}'s code snapshot is a symbolic link, not the file recorded", restore
        elif _digest(path) != recorded[rel]:
            problem, fix = f"{path} differs from the file run {run_id} recorded in its code snapshot ({DIGEST})", \
                restore
        else:
            continue
        raise UntrustedCodeError(f"{problem}; nothing was imported. {fix}, or review the snapshot and sign it as it "
                                 f"is now with `engineflow runs trust {run_id}`")


def other_owner(run_dir: Path) -> tuple[Path, int] | None:
    """The first of the runs folder, the experiment's and the run's folders, its ``code/`` and everything
    in it that another user owns, with its uid (who owns a folder above may swap what is below)."""
    if not hasattr(os, "geteuid"):
        return None
    me = os.geteuid()
    code_dir = run_dir / "code"
    paths = [run_dir.parent.parent, run_dir.parent, run_dir]
    for folder, dirs, files in os.walk(code_dir):
        paths += [Path(folder), *(Path(folder, name) for name in (*dirs, *files))]
    for path in paths:
        try:
            uid = path.lstat().st_uid
        except FileNotFoundError:
            continue
        if uid != me:
            return path, uid
    return None


@contextmanager
def writing_no_bytecode() -> Iterator[None]:
    """Imports inside the block write no ``__pycache__`` folder beside the files they import.

    A compiled file in a snapshot is code its digests do not vouch for, so a check refuses any;
    loading a snapshot must therefore not leave one there itself.
    """
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


# Trusting a run ------------------------------------------------------------------------------------------------

def trust_run(runs_dir: str | Path, ref: str) -> dict[str, Any]:
    """Sign run ``ref``'s code snapshot as it is now with this user's key (``engineflow runs trust``),
    after the user reviewed it; the run then loads without ``trust_code``. Returns the run's record.

    Raises:
        RecipeError: no such run, no snapshot, a file in it owned by another user or a link.
    """
    from engineflow.record.runs import update_record
    from engineflow.record.store import RunStore

    with RunStore.open(Path(runs_dir)) as store:
        record = store.resolve(ref)
        run_dir = Path(record["run_dir"])
        code_dir = run_dir / "code"
        if not code_dir.is_dir():
            raise RecipeError(f"run {record['id']} has no code snapshot at {code_dir}; there is nothing to trust")
        other = other_owner(run_dir)
        if other is not None:
            raise RecipeError(f"{other[0]} belongs to another user (uid {other[1]}), who could change it after you "
                              f"trust it; copy the run folder to own it, or pass --trust-code each time you load it")
        links = [path for _, path in _entries(code_dir) if path.is_symlink()]
        if links:
            raise RecipeError(f"{links[0]} is a symbolic link; a code snapshot holds plain files only, so replace it "
                              "by the file it points to (or delete it) before trusting the run")
        code = {**(record.get("code") or {}), **seal(record["id"], code_dir, signed=False)}
        return update_record(store, record, {"code": code}) or {**record, "code": code}
