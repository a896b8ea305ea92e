"""Every public name of engineflow has a docstring example (``>>>``) that the doctests run."""

from __future__ import annotations

import doctest
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import engineflow as ef

PACKAGE = Path(ef.__file__).resolve().parent

# Ignite's Events, re-exported: its docstring is Ignite's, so engineflow's own package docstring
# documents it with an example, which this check looks for there instead.
REEXPORTED = {"Events": "ef.Events"}


def doctests_of(module: ModuleType) -> dict[str, doctest.DocTest]:
    """The module's doctests by name, found as pytest's --doctest-modules finds them."""
    return {test.name: test for test in doctest.DocTestFinder().find(module, module.__name__)}


def where_documented(name: str) -> tuple[ModuleType, str]:
    """The module whose doctests hold the example of public ``name``, and that doctest's name."""
    if name in REEXPORTED:
        return ef, "engineflow"
    value: Any = getattr(ef, name)
    if inspect.ismodule(value):
        return value, value.__name__
    return sys.modules[value.__module__], f"{value.__module__}.{value.__qualname__}"


def runnable_examples(name: str) -> list[doctest.Example]:
    module, test_name = where_documented(name)
    test = doctests_of(module).get(test_name)
    examples = [] if test is None else [e for e in test.examples if not e.options.get(doctest.SKIP)]
    if name in REEXPORTED:
        examples = examples if any(REEXPORTED[name] in e.source for e in examples) else []
    return examples


def test_pytest_runs_the_docstring_examples_of_the_package(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.getoption("doctestmodules"), "pyproject's addopts must keep --doctest-modules"
    assert "engineflow" in pytestconfig.getini("testpaths"), "pyproject's testpaths must include engineflow"


def test_every_public_name_has_a_docstring_example_that_runs() -> None:
    missing = [name for name in ef.__all__ if not runnable_examples(name)]
    assert not missing, (
        f"public names without a runnable '>>>' example in their docstring: {', '.join(missing)}; add an "
        "Example: section (Google style) that doctest runs"
    )


def test_the_examples_live_in_modules_that_the_doctests_collect() -> None:
    outside = [name for name in ef.__all__ if not Path(where_documented(name)[0].__file__).is_relative_to(PACKAGE)]
    assert not outside, f"examples of {', '.join(outside)} are outside engineflow/, where no doctest collects them"


def test_the_check_finds_a_name_without_an_example() -> None:
    module = ModuleType("undocumented")
    exec("def f():\n    '''No example.\n\n    Example::\n\n        f()\n    '''\n", module.__dict__)
    assert doctests_of(module)["undocumented.f"].examples == [], "a literal block is not a runnable example"
