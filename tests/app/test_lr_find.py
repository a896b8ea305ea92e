"""``engineflow lr-find``: its lines, its JSON, its plot, and one line for each bad input."""

from __future__ import annotations

import json
import re
import sys

import pytest

from engineflow.execute.lr_suggestions import trimmed
from tests.conftest import BASE_RECIPE, REPO

PNG = b"\x89PNG\r\n\x1a\n"


def suggested(output: str) -> list[float]:
    """The learning rate of each line that suggests one."""
    lines = [line for line in output.splitlines() if "suggest" in line]
    return [float(re.search(r"suggest lr (\S+)", line).group(1)) for line in lines]


def test_lr_find_prints_a_line_per_rule_and_draws_them(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("lr-find", str(write_recipe(BASE_RECIPE)), "--iterations", "20", "--end", "100", "--out", "lr.png")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "suggest" in line]
    assert [line.split(":")[0] for line in lines] == ["valley", "steep", "minimum"]
    assert all(1e-7 <= lr <= 100 for lr in suggested(result.stdout))
    assert "nothing recorded" in result.stdout
    assert (tmp_path / "lr.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "runs").exists()


def test_lr_find_json_has_the_curve_and_the_suggestions(cli, write_recipe):
    result = cli("lr-find", str(write_recipe(BASE_RECIPE)), "--iterations", "12", "--start", "1e-4", "--json")
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert len(sweep["lrs"]) == len(sweep["losses"]) == len(sweep["raw_losses"]) <= 12
    assert sweep["lrs"][0] == pytest.approx(1e-4) and sweep["stage"] == "fit"
    assert sorted(sweep["suggestions"]) == ["min10", "steep", "valley"]
    lrs, losses = trimmed(sweep["lrs"], sweep["losses"], 12)  # what the rules read
    assert sweep["suggestions"]["min10"] == pytest.approx(lrs[losses.index(min(losses))] / 10)


NO_OPTIMIZER = BASE_RECIPE.replace("return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),",
                                   "return dict(model=model, optimizer=None,")


@pytest.mark.parametrize(("recipe", "args", "says"), [
    (NO_OPTIMIZER, [], "no torch.optim.Optimizer"),
    (BASE_RECIPE, ["--start", "1", "--end", "0.1"], "0 < start < end"),
    (BASE_RECIPE, ["--start", "0.1", "--end", "0.1"], "0 < start < end"),
    (BASE_RECIPE, ["--iterations", "1"], "2 steps or more"),
    (BASE_RECIPE, ["--stage", "finetune"], "declares no stages"),
])
def test_lr_find_bad_input_is_one_line_and_exit_2(cli, write_recipe, recipe, args, says):
    result = cli("lr-find", str(write_recipe(recipe)), *args)
    assert result.exit_code == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "suggest" not in result.stdout


def test_lr_find_out_without_matplotlib_names_the_extra(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = cli("lr-find", str(write_recipe(BASE_RECIPE)), "--out", str(tmp_path / "lr.png"))
    assert result.exit_code == 2
    assert "engineflow[plot]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "suggest" not in result.stdout and not (tmp_path / "lr.png").exists()


@pytest.mark.slow
def test_lr_find_on_digits_suggests_a_usable_lr_and_writes_a_png(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("lr-find", str(REPO / "recipes" / "digits.py"), "--out", "lr.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lrs = suggested(result.stdout)
    assert len(lrs) == 3 and all(1e-4 <= lr <= 2 for lr in lrs), result.stdout
    assert (tmp_path / "lr.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "runs").exists()
