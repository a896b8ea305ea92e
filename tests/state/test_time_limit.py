"""--time-limit: durations, the budget a checkpoint keeps, a run that stops, checkpoints and resumes exactly."""

from __future__ import annotations

import pytest
import torch

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.state.checkpoint_files import checkpoint_files, load_state
from engineflow.state.resume import ResumeRecord
from engineflow.state.time_limit import TimeLimit, parse_duration
from tests.conftest import BASE_RECIPE, read_run
from tests.recipes import classifier_steps


@pytest.mark.parametrize(("text", "seconds"), [("2h", 7200.0), ("30m", 1800.0), ("90s", 90.0), ("1h30m", 5400.0),
                                                ("45", 45.0), ("0.5s", 0.5), (" 1H ", 3600.0), (12, 12.0)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "2x", "h", "-5", "0", "1h-3m", "inf", float("nan"), True])
def test_bad_durations_are_refused_in_one_line(bad):
    with pytest.raises(RecipeError, match=r"^--time-limit expects a positive duration such as 2h, .*got "):
        parse_duration(bad)


def test_a_resume_goes_on_with_what_was_left_unless_given_a_new_budget():
    now = [100.0]
    clock = lambda: now[0]
    limit = TimeLimit(60, clock=clock)
    now[0] += 20
    saved = limit.state_dict()
    assert saved == {"remaining": 40.0} and not limit.reached()
    left = TimeLimit(None, clock=clock)  # --resume without --time-limit
    left.load_state_dict(saved)
    now[0] += 39
    assert not left.reached()
    now[0] += 1
    assert left.reached()
    fresh = TimeLimit(600, clock=clock)  # --resume --time-limit 10m: the new budget
    fresh.load_state_dict(saved)
    assert fresh.budget == 600
    spent = TimeLimit(None, clock=clock)  # stopped at its limit: nothing left, so no limit
    spent.load_state_dict({"remaining": -0.5})
    assert spent.budget is None and not spent.reached()
    other_rank = TimeLimit(1, decides=False, clock=clock)
    now[0] += 5
    assert not other_rank.reached()  # only rank 0's clock decides


# 3 epochs of 3 steps, each step sleeping 50 ms: 0.45 s of steps, more than the 0.1 s limit
SLOW = BASE_RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(epochs=3,").replace(
    classifier_steps(), classifier_steps(before="    time.sleep(0.05)\n")) + "\nimport time\n"


def test_the_time_limit_stops_with_a_checkpoint_and_the_resume_ends_as_an_unbroken_run(cli, write_recipe, tmp_path):
    path = str(write_recipe(SLOW))
    stopped = cli("run", path, "--time-limit", "0.1s", "--device", "cpu", "--no-progress")
    assert stopped.exit_code == 3, stopped.output
    assert "stopped at the time limit, with a checkpoint; continue with --resume" in stopped.stdout
    record = read_run(tmp_path / "runs")
    assert record["status"] == "interrupted" and record["epochs"] < 3
    newest = checkpoint_files(next((tmp_path / "runs").glob("*/*/checkpoints/state")))[-1]
    saved = ResumeRecord.from_dict(load_state(newest))
    assert saved.reason == "time-limit" and saved.parts["time_limit"]["remaining"] <= 0
    resumed = cli("run", path, "--resume", "last", "--device", "cpu", "--no-progress")  # nothing left: no limit
    assert resumed.exit_code == 0, resumed.output
    assert "from checkpoint" in resumed.stdout and read_run(tmp_path / "runs")["status"] == "completed"
    unbroken = ef.run(path, device="cpu", runs_dir=tmp_path / "unbroken", stream=open(tmp_path / "out.txt", "w"))
    ours = torch.load(record["run_dir"] + "/checkpoints/last.pt", weights_only=True)
    theirs = torch.load(unbroken.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert tensors(ours).keys() == tensors(theirs).keys() and tensors(ours)
    assert all(torch.equal(tensors(ours)[k], tensors(theirs)[k]) for k in tensors(ours))


def tensors(value, prefix=""):
    """Every tensor in nested dicts, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensors(item, f"{prefix}/{key}").items()}
    return {}


def test_a_bad_time_limit_is_one_line_and_exit_2(cli, write_recipe, tmp_path):
    result = cli("run", str(write_recipe(BASE_RECIPE)), "--time-limit", "2x")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --time-limit expects a positive duration such as 2h, 30m, 90s, 1h30m or seconds (5400), got '2x'"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/*/run.json"))
    with pytest.raises(RecipeError, match=r"ef.run\(time_limit=...\) expects a positive duration"):
        ef.run(write_recipe(BASE_RECIPE, "other.py"), time_limit=0, runs_dir=tmp_path / "runs")


# 40 samples in batches of 2: 10 steps an epoch on each of 2 processes, each step sleeping 50 ms
PARALLEL = SLOW.replace("torch.randn(10, 4, generator=gen), torch.randint(0, 2, (10,), generator=gen)",
                        "torch.randn(40, 4, generator=gen), torch.randint(0, 2, (40,), generator=gen)").replace(
    "batch_size=4, seed=0)", "batch_size=2, seed=0)").replace("epochs=3,", "epochs=2,")


@pytest.mark.slow
def test_on_two_processes_rank_0s_clock_stops_both_at_the_same_iteration(write_recipe, tmp_path):
    from tests.conftest import run_engineflow

    path = str(write_recipe(PARALLEL))
    args = ("--device", "cpu", "--nproc", "2", "--no-progress", "--runs-dir")
    stopped = run_engineflow("run", path, "--time-limit", "0.2s", *args, str(tmp_path / "runs"), cwd=tmp_path)
    assert stopped.returncode == 3, stopped.stderr
    record = read_run(tmp_path / "runs")
    newest = ResumeRecord.from_dict(load_state(checkpoint_files(
        next((tmp_path / "runs").glob("*/*/checkpoints/state")))[-1]))
    # where the processes agree: every 8th iteration, or an epoch's end
    assert record["status"] == "interrupted" and newest.reason == "time-limit" and len(newest.ranks) == 2
    assert newest.position.iteration % 8 == 0 or not newest.position.mid_epoch
    resumed = run_engineflow("run", path, "--resume", "last", *args, str(tmp_path / "runs"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    unbroken = run_engineflow("run", path, *args, str(tmp_path / "unbroken"), cwd=tmp_path)
    assert unbroken.returncode == 0, unbroken.stderr
    ours = tensors(torch.load(next((tmp_path / "runs").glob("*/*/checkpoints/last.pt")), weights_only=True))
    theirs = tensors(torch.load(next((tmp_path / "unbroken").glob("*/*/checkpoints/last.pt")), weights_only=True))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
