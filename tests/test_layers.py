"""The package's folders are its layers, and imports point down: a layer never imports one above it,
and no module imports itself through others (no import cycle, inside a layer or across)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engineflow

PACKAGE = Path(engineflow.__file__).parent
# Bottom first. The top-level modules (errors, naming, files, runtime, shards, ignite_internals, and
# the public metrics and data modules) are the base every layer may use.
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


def imports_of(module: str, *, at_run_time: bool = False) -> set[str]:
    """Every engineflow module ``module`` imports, at the top or inside a function; ``at_run_time``:
    without those under ``if TYPE_CHECKING:``, which only type checkers import."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if at_run_time and _type_checking_only(block)
               for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("engineflow"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engineflow"):
            found.add(node.module)
            # "from engineflow.app import cli" imports engineflow.app.cli
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists())
    return found


def _type_checking_only(node: ast.AST) -> bool:
    """Whether ``node`` is ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``), whose body only type
    checkers run (an ``else:`` runs, and counts)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each group of :func:`cycle_groups`."""
    return [_cycle_through(group, graph) for group in cycle_groups(graph)]


def cycle_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (through others), sorted, found with Tarjan's
    strongly connected components; a module that imports itself is a group too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # iterative: the recursion of the textbook version, on a list
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph.get(node, ()):
                    groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, set()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{group} is no cycle")


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": set()}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycle_groups({**graph, "d": {"b"}}) == [["a", "b", "c", "d"], ["e"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nif x:\n    import y\n")
    assert [_type_checking_only(node) for node in tree.body] == [False, True, False]


def test_no_import_cycles():
    """Module-level and function-level imports both count: a cycle through a function's import
    still means neither module can be understood, or moved to another layer, without the other."""
    graph = {module: imports_of(module, at_run_time=True) for module in modules()}
    named = [f"{' -> '.join(_cycle_through(group, graph))} (and every cycle among {', '.join(group)})"
             for group in cycle_groups(graph)]
    assert named == [], "import cycles: " + "; ".join(named)


def test_every_module_belongs_to_a_layer_folder_or_the_base():
    base = sorted(m for m in modules() if layer_of(m) == -1 and m != "engineflow")
    assert base == ["engineflow.__main__", "engineflow.data", "engineflow.errors", "engineflow.files",
                    "engineflow.ignite_internals", "engineflow.metrics", "engineflow.naming", "engineflow.runtime",
                    "engineflow.shards"]


@pytest.mark.parametrize("module", [m for m in modules() if m not in ("engineflow", "engineflow.__main__")])
def test_imports_point_down(module):
    mine = layer_of(module)
    upward = sorted(i for i in imports_of(module) if layer_of(i) > mine and i != "engineflow")
    assert upward == [], f"{module} (layer {LAYERS[mine] if mine >= 0 else 'base'}) imports {upward}"


# the optional extras' packages (pyproject.toml): serve, sweep, mlflow, plot
OPTIONAL = ("optuna", "psycopg", "pgserver", "starlette", "uvicorn", "prometheus_client", "mlflow", "matplotlib")


@pytest.mark.parametrize("layer", LAYERS)
def test_importing_a_layer_loads_only_the_layers_below_it(layer):
    names = [m for m in modules() if layer_of(m) == LAYERS.index(layer)]
    # a module that needs an optional extra not installed here (the lowest-versions job has none) is left out
    code = (f"import importlib, json, sys\nfor name in {names!r}:\n    try:\n        importlib.import_module(name)\n"
            f"    except ModuleNotFoundError as err:\n        if (err.name or '').split('.')[0] not in {OPTIONAL!r}:\n"
            "            raise\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('engineflow.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    above = [m for m in loaded if layer_of(m) > LAYERS.index(layer)]
    assert above == [], f"importing engineflow.{layer} loaded {above}"
