"""The README's examples run as written."""

from __future__ import annotations

import io
import re

import pytest

from tests.conftest import REPO, read_run

README = (REPO / "README.md").read_text()


def python_block_after(marker: str) -> str:
    start = README.index(marker)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_tutorial_recipe_trains_xor_and_stops_early(cli, tmp_path):
    recipe = tmp_path / "xor.py"
    recipe.write_text(python_block_after("<!-- tutorial -->"))
    result = cli("run", str(recipe), "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = read_run(tmp_path / "runs")
    assert summary["best"]["value"] == 1.0
    assert summary["epochs"] < 40, "StopFit ended the fit once accuracy reached 1.0"
    assert f"epoch {summary['epochs']}: valid accuracy 1.00" in result.output


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    code = python_block_after("## Python API").replace('"recipes/digits.py"', repr(str(REPO / "recipes/digits.py")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].best["epoch"] is not None
    assert len(namespace["fit"].history) == 3
    assert (tmp_path / "runs" / "digits").is_dir()


def test_load_run_example_runs(tmp_path, monkeypatch):
    import engineflow as ef
    from tests.test_registry import RECIPE

    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    ef.run(recipe, device="cpu", stream=io.StringIO())
    namespace: dict = {"ef": ef}
    exec(compile(python_block_after("A past run, as it was"), "README.md", "exec"), namespace)
    assert namespace["past"].module.SCALE == 1.0 and namespace["past"].model is not None
