"""Several losses from one train step: each checked, averaged and logged under its own name."""

from __future__ import annotations

import math

import pytest

import engineflow as ef
from engineflow.execute.losses import LossMonitor
from engineflow.state.resume import ResumeRecord
from tests.conftest import BASE_RECIPE, read_run

TWO_LOSSES = BASE_RECIPE.replace('''    optimizer.step()
    return {"loss": loss}''', '''    optimizer.step()
    return {"g_loss": loss, "d_loss": 2 * loss.detach() + BAD.get(state.iteration, 0.0)}''').replace(
    "def train(batch, model, optimizer):", "def train(batch, model, optimizer, state):") + "\nBAD = {}\n"


def test_each_loss_is_averaged_per_epoch_under_its_own_name(write_recipe, tmp_path):
    result = ef.run(write_recipe(TWO_LOSSES), device="cpu", runs_dir=tmp_path / "runs",
                    stream=open(tmp_path / "out.txt", "w"))
    history = read_run(tmp_path / "runs")["history"]
    names = [sorted(k for k in row if k.startswith("train/") and k != "train/lr") for row in history]
    assert names == [["train/d_loss", "train/g_loss"]] * 2
    for row in history:
        assert math.isclose(row["train/d_loss"], 2 * row["train/g_loss"], rel_tol=1e-6)
    assert "train/d_loss" in result.metrics and "train/loss" not in result.metrics


def test_a_non_finite_second_loss_stops_the_run_naming_it(write_recipe, tmp_path):
    recipe = write_recipe(TWO_LOSSES.replace("BAD = {}", "BAD = {4: float('inf')}"))
    with pytest.raises(ef.NonFiniteLossError, match="the loss 'd_loss' became inf at iteration 4"):
        ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))


def test_the_state_of_single_loss_checkpoints_still_loads():
    # the checkpoint's record reads the single-loss layout (total, count) as today's
    old = {"format": 1, "engine": {"iteration": 3, "epochs_completed": 0, "batches_in_epoch": 3}, "rng": {},
           "loss": {"running": 0.5, "total": 1.5, "count": 3}}
    monitor = LossMonitor()
    monitor.load_state_dict(ResumeRecord.from_dict(old).ranks[0].loss)
    assert monitor.epoch_means() == {"train/loss": 0.5} and monitor.running == 0.5
    again = LossMonitor()
    again.load_state_dict(monitor.state_dict())
    assert again.epoch_means() == monitor.epoch_means()
