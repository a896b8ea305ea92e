"""The package's folders are its layers, and imports point down: a layer never imports one above it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engineflow

PACKAGE = Path(engineflow.__file__).parent
# Bottom first. The top-level modules (errors, naming, files, runtime, shards, and the public metrics
# and data modules) are the base every layer may use.
LAYERS = ("declare", "state", "execute", "record", "app")


def layer_of(module: str) -> int:
    """-1 for the base modules, else the index of the module's layer in LAYERS."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) == 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return -1


def modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append(".".join(parts))
    return found


def imports_of(module: str) -> set[str]:
    """Every engineflow module ``module`` imports, at the top or inside a function."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("engineflow"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engineflow"):
            found.add(node.module)
            # "from engineflow.app import cli" imports engineflow.app.cli
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists())
    return found


def test_every_module_belongs_to_a_layer_folder_or_the_base():
    base = sorted(m for m in modules() if layer_of(m) == -1 and m != "engineflow")
    assert base == ["engineflow.__main__", "engineflow.data", "engineflow.errors", "engineflow.files",
                    "engineflow.metrics", "engineflow.naming", "engineflow.runtime", "engineflow.shards"]


@pytest.mark.parametrize("module", [m for m in modules() if m not in ("engineflow", "engineflow.__main__")])
def test_imports_point_down(module):
    mine = layer_of(module)
    upward = sorted(i for i in imports_of(module) if layer_of(i) > mine and i != "engineflow")
    assert upward == [], f"{module} (layer {LAYERS[mine] if mine >= 0 else 'base'}) imports {upward}"


@pytest.mark.parametrize("layer", LAYERS)
def test_importing_a_layer_loads_only_the_layers_below_it(layer):
    names = [m for m in modules() if layer_of(m) == LAYERS.index(layer)]
    code = (f"import importlib, json, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('engineflow.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    above = [m for m in loaded if layer_of(m) > LAYERS.index(layer)]
    assert above == [], f"importing engineflow.{layer} loaded {above}"
