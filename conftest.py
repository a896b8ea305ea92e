"""What every test and every doctest of engineflow/ share: a signing key and temporary folders of their own."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# without the sweep extra (tox -e lowest) the modules that need Optuna are not collected for their doctests
collect_ignore = [] if importlib.util.find_spec("optuna") else ["engineflow/app/studies.py", "engineflow/app/sweep.py"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--benchmarks", action="store_true",
                     help="also run tests/test_benchmarks.py, which runs every benchmark family briefly (about a "
                          "minute and a half on 2 cores; CI runs it as a step of its own)")


@pytest.fixture(scope="session", autouse=True)
def signing_key_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """engineflow signs the runs it records with a per-user key in ``$XDG_DATA_HOME/engineflow/``:
    every test and doctest, and every process a test starts, uses one in a temporary folder, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("xdg-data")
        patch.setenv("XDG_DATA_HOME", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def doctest_temporary_files_in_tmp_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docstring examples make their runs folders with ``tempfile.mkdtemp()``, as a user would; under
    pytest those folders go to the example's ``tmp_path``, which pytest removes in time, not to /tmp."""
    if isinstance(request.node, pytest.DoctestItem):
        if request.node.name.startswith("engineflow.app.serving."):  # as tests/app/test_serving.py does
            pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'engineflow[serve]')")
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
