"""The code snapshot of a run: the recipe and the local modules it imports, with git's view of them.

Fingerprints decide the history semantics: ``source`` covers the code only (``test``/``eval``
refuse when it changed), ``fingerprint`` covers code and config (``run`` refuses to repeat a
completed run). The snapshot folder keeps copies of every file, so ``ef.load_run`` imports the
code as it was, and ``diff.patch`` plus the commit id restore it in the repository too.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CodeState:
    """The code a run used.

    Attributes:
        root: the git work tree holding the recipe, else the recipe's folder.
        files: the recipe and its local imports, relative to ``root``, recipe first.
        source: sha256 of those files' paths and contents.
        git_commit: ``HEAD`` of the repository, or None outside git (or before the first commit).
        dirty: True when any of ``files`` differs from ``HEAD`` or is untracked.
    """

    root: Path
    files: tuple[str, ...]
    source: str
    git_commit: str | None
    dirty: bool

    def fingerprint(self, config: Mapping[str, Any]) -> str:
        """sha256 of the code and the resolved config: equal fingerprints train the same thing."""
        text = json.dumps(config, sort_keys=True, default=str)
        return hashlib.sha256(f"{self.source}\n{text}".encode()).hexdigest()

    def record(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The ``code`` entry of a run record."""
        return {"fingerprint": self.fingerprint(config), "source": self.source, "git_commit": self.git_commit,
                "dirty": self.dirty, "files": list(self.files), "root": str(self.root)}


def capture(recipe_path: Path) -> CodeState:
    """Describe the code of a loaded recipe: which files, their hash, the git commit and dirtiness.

    Local imports are the modules the recipe imports whose file lies under the root (the git work
    tree, else the recipe's folder), outside environments and outside engineflow itself.
    """
    recipe_path = recipe_path.resolve()
    root = _git_root(recipe_path.parent) or recipe_path.parent
    files = [recipe_path.relative_to(root).as_posix()]
    for path in _local_imports(recipe_path, root):
        rel = path.relative_to(root).as_posix()
        if rel not in files:
            files.append(rel)
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    commit = _git(root, "rev-parse", "HEAD") if _git_root(root) else None
    dirty = bool(_git(root, "status", "--porcelain", "--", *files)) if commit else False
    return CodeState(root, tuple(files), digest.hexdigest(), commit, dirty)


def save(code: CodeState, folder: Path) -> None:
    """Copy the files into ``folder`` (layout kept) and write ``git.json`` and ``diff.patch``."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in code.files:
        target = folder / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(code.root / rel, target)
    info = {"root": str(code.root), "files": list(code.files), "git_commit": code.git_commit, "dirty": code.dirty,
            "source": code.source}
    (folder / "git.json").write_text(json.dumps(info, indent=2) + "\n")
    if code.git_commit and code.dirty:
        tracked = _git(code.root, "diff", "HEAD", "--", *code.files) or ""
        untracked = _git(code.root, "ls-files", "--others", "--exclude-standard", "--", *code.files) or ""
        note = "".join(f"# untracked, copied in files/: {name}\n" for name in untracked.splitlines())
        (folder / "diff.patch").write_text(note + tracked)


def _local_imports(recipe: Path, root: Path) -> list[Path]:
    """Files under ``root`` that the recipe imports, directly or through other local files.

    Read from the import statements, not from ``sys.modules``: in a long-lived process (a test
    session, a notebook) ``sys.modules`` also holds modules that this recipe never imported.
    """
    seen: set[Path] = {recipe}
    todo = [recipe]
    while todo:
        for name in _imported_names(todo.pop()):
            path = _module_file(name)
            if path is None or path in seen or not path.is_relative_to(root) or _in_environment(path):
                continue
            seen.add(path)
            todo.append(path)
    seen.discard(recipe)
    return sorted(seen)


def _imported_names(file: Path) -> list[str]:
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, OSError, UnicodeDecodeError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return [n for n in names if n.split(".")[0] != "engineflow"]


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if file is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return None
        file = spec.origin if spec is not None else None
    if not file or not file.endswith(".py"):
        return None
    return Path(file).resolve()


def _in_environment(path: Path) -> bool:
    parts = set(path.parts)
    return bool(parts & {"site-packages", "dist-packages", ".venv", ".tox", "venv"})


def _git_root(folder: Path) -> Path | None:
    out = _git(folder, "rev-parse", "--show-toplevel")
    return Path(out).resolve() if out else None


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine: the snapshot still has the files
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
