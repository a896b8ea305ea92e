"""The bundled recipes, trained for real through the installed command in a subprocess."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_run, run_engineflow

pytestmark = pytest.mark.slow


def test_digits_reaches_95_percent_validation_accuracy(tmp_path):
    proc = run_engineflow("run", str(REPO / "recipes" / "digits.py"), "--runs-dir", str(tmp_path), "--device", "cpu",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_run(tmp_path)
    assert summary["status"] == "completed" and summary["epochs"] == 20
    assert summary["best"]["metric"] == "valid/accuracy"
    assert summary["best"]["value"] >= 0.95
    assert summary["metrics"]["valid/accuracy"] >= 0.95, "the last epoch too, not only a lucky one"
    assert "best epoch" in proc.stdout
    # not a terminal: plain lines, no progress-bar control characters
    assert "\r" not in proc.stdout and "epoch 20/20" in proc.stdout


def test_sine_regression_fits_with_the_default_step(tmp_path):
    proc = run_engineflow("run", str(REPO / "recipes" / "sine.py"), "--runs-dir", str(tmp_path), "--device", "cpu",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_run(tmp_path)
    assert summary["best"]["metric"] == "valid/mse" and summary["best"]["mode"] == "min"
    assert summary["best"]["value"] < 0.01
    assert summary["history"][0]["valid/mse"] > summary["best"]["value"]


@pytest.mark.parametrize("recipe", ["digits.py", "sine.py"])
def test_bundled_recipes_pass_check(recipe, cli):
    result = cli("run", str(REPO / "recipes" / recipe), "--check")
    assert result.exit_code == 0, result.output
    assert "completed 2 epochs" in result.output
