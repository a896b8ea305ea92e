"""Which run a command continues or starts: --resume RUN|last|auto, repeated flags, --retrain."""

from __future__ import annotations

import json

from tests.app.test_cli import assert_clean_error
from tests.conftest import BASE_RECIPE

# Interrupted in epoch 2 when INTERRUPT is set in the environment (as Ctrl-C would: exit 130,
# checkpoint written, run "interrupted"); the code and config stay the same either way.
INTERRUPTIBLE = BASE_RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(epochs=3,") + '''
import os

@ef.on(ef.Events.ITERATION_COMPLETED)
def maybe_interrupt(state):
    if os.environ.get("INTERRUPT") == "1" and state.epoch == 2:
        raise KeyboardInterrupt

@ef.on(ef.Events.ITERATION_COMPLETED)
def maybe_fail(state):
    if os.environ.get("FAIL") == "1" and state.epoch == 2:
        raise RuntimeError("retrain failed")
'''


def runs(cli, tmp_path) -> list:
    result = cli("runs", "list", "--json", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_resume_accepts_the_flags_the_run_was_started_with(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(INTERRUPTIBLE)
    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe), "--seed", "7").exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    (started,) = runs(cli, tmp_path)
    differs = cli("run", str(recipe), "--seed", "8", "--resume", "last")
    assert_clean_error(differs, "seed 7", "seed 8")
    same = cli("run", str(recipe), "--seed", "7", "--resume", "last")
    assert same.exit_code == 0, same.output
    (done,) = runs(cli, tmp_path)
    assert done["id"] == started["id"] and done["status"] == "completed" and done["seed"] == 7


def test_resume_refuses_flags_that_start_a_new_run(cli, write_recipe):
    recipe = write_recipe(INTERRUPTIBLE)
    assert_clean_error(cli("run", str(recipe), "--resume", "last", "--force"), "--resume last", "--force")


def test_resume_auto_starts_continues_and_then_does_nothing(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(INTERRUPTIBLE)
    monkeypatch.setenv("INTERRUPT", "1")
    first = cli("run", str(recipe), "--resume", "auto")  # nothing to resume: a new run, interrupted in epoch 2
    monkeypatch.delenv("INTERRUPT")
    assert first.exit_code == 130, first.output
    assert "starting a new one" in first.output
    (interrupted,) = runs(cli, tmp_path)
    assert interrupted["status"] == "interrupted"

    again = cli("run", str(recipe), "--resume", "auto")  # the same command continues it
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output
    (done,) = runs(cli, tmp_path)
    assert done["id"] == interrupted["id"] and done["status"] == "completed" and done["epochs"] == 3

    finished = cli("run", str(recipe), "--resume", "auto")  # and once it completed, does nothing
    assert finished.exit_code == 0 and "already completed" in finished.output
    assert len(runs(cli, tmp_path)) == 1

    other = cli("run", str(recipe), "--resume", "auto", "--set", "lr=0.2")  # another config: its own run
    assert other.exit_code == 0, other.output
    assert len(runs(cli, tmp_path)) == 2


def test_the_seed_picks_the_run_auto_continues_and_last_refuses_another(cli, write_recipe, tmp_path, monkeypatch):
    # Without 'seed' in its config, a recipe's runs differ by seed alone; the fingerprint does not see it.
    recipe = write_recipe(INTERRUPTIBLE.replace(", seed=0)", ")").replace("manual_seed(cfg.seed)", "manual_seed(0)"))
    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe), "--seed", "7").exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    other_seed = cli("run", str(recipe), "--seed", "9", "--resume", "auto")
    assert other_seed.exit_code == 0, other_seed.output
    assert sorted((r["seed"], r["status"]) for r in runs(cli, tmp_path)) == [(7, "interrupted"), (9, "completed")]
    assert_clean_error(cli("run", str(recipe), "--seed", "8", "--resume", "last"), "seed 9", "seed 8")


def test_resume_last_with_nothing_recorded_starts_a_new_run(cli, write_recipe, tmp_path):
    result = cli("run", str(write_recipe(INTERRUPTIBLE)), "--resume", "last")
    assert result.exit_code == 0, result.output
    (done,) = runs(cli, tmp_path)
    assert done["status"] == "completed"


def test_retrain_keeps_the_old_run_whole_until_the_new_one_completes(cli, write_recipe, tmp_path, monkeypatch):
    from pathlib import Path

    recipe = write_recipe(INTERRUPTIBLE)
    assert cli("run", str(recipe)).exit_code == 0
    (old,) = runs(cli, tmp_path)
    old_files = sorted(p.relative_to(old["run_dir"]) for p in Path(old["run_dir"]).rglob("*") if p.is_file())

    monkeypatch.setenv("FAIL", "1")
    failed = cli("run", str(recipe), "--retrain")
    monkeypatch.delenv("FAIL")
    assert failed.exit_code == 1
    listed = {r["id"]: r["status"] for r in runs(cli, tmp_path)}
    assert listed[old["id"]] == "completed" and sorted(listed.values()) == ["completed", "failed"]
    assert sorted(p.relative_to(old["run_dir"]) for p in Path(old["run_dir"]).rglob("*") if p.is_file()) == old_files

    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe), "--retrain").exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    assert old["id"] in {r["id"] for r in runs(cli, tmp_path)}

    done = cli("run", str(recipe), "--resume", "last")  # the interrupted retrain, continued, still replaces
    assert done.exit_code == 0, done.output
    after = runs(cli, tmp_path)
    assert old["id"] not in {r["id"] for r in after} and not Path(old["run_dir"]).exists()
    (new,) = [r for r in after if r["status"] == "completed"]
    assert json.loads((Path(new["run_dir"]) / "run.json").read_text())["replaces"] == old["id"]


# Notes whether torch's deterministic algorithms are on in each epoch's last step.
NOTED = INTERRUPTIBLE + '''
import torch

@ef.on(ef.Events.EPOCH_COMPLETED)
def note_determinism(state, run):
    (run.run_dir / f"deterministic-{state.epoch}.txt").write_text(str(torch.are_deterministic_algorithms_enabled()))
'''


def test_deterministic_is_on_while_the_run_trains_recorded_and_kept_by_its_resume(cli, write_recipe, tmp_path,
                                                                                  monkeypatch):
    import os
    from pathlib import Path

    import torch

    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    recipe = write_recipe(NOTED)
    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe), "--deterministic").exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    assert not torch.are_deterministic_algorithms_enabled(), "as it was after the run"
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == workspace
    (started,) = runs(cli, tmp_path)
    shown = json.loads(cli("runs", "show", started["id"], "--json", "--runs-dir", str(tmp_path / "runs")).output)
    assert shown["deterministic"] is True and shown["exact_resume"] is True
    resumed = cli("run", str(recipe), "--resume", "last")  # without the flag: the run's own setting
    assert resumed.exit_code == 0, resumed.output
    run_dir = Path(started["run_dir"])
    assert [(run_dir / f"deterministic-{e}.txt").read_text() for e in (1, 3)] == ["True", "True"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_run_started_without_deterministic_is_not_resumed_with_it(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(NOTED)
    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe)).exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    (started,) = runs(cli, tmp_path)
    shown = json.loads(cli("runs", "show", started["id"], "--json", "--runs-dir", str(tmp_path / "runs")).output)
    assert shown["deterministic"] is False
    assert (tmp_path / "runs" / "recipe" / started["id"] / "deterministic-1.txt").read_text() == "False"
    assert_clean_error(cli("run", str(recipe), "--resume", "last", "--deterministic"),
                       "was started without --deterministic")
    assert runs(cli, tmp_path)[0]["status"] == "interrupted", "nothing changed"


# Notes each epoch's dtype of the train step's forward, under the run's precision.
PRECISION_NOTED = INTERRUPTIBLE.replace("def train(batch, model, optimizer):", '''
def train(batch, model, optimizer, run, state):
    (run.run_dir / f"forward-{state.epoch}.txt").write_text(str(model(batch[0]).dtype))''')


def test_precision_is_recorded_kept_by_a_resume_and_another_one_refused(cli, write_recipe, tmp_path, monkeypatch):
    from pathlib import Path

    recipe = write_recipe(PRECISION_NOTED)
    monkeypatch.setenv("INTERRUPT", "1")
    assert cli("run", str(recipe), "--precision", "bf16").exit_code == 130
    monkeypatch.delenv("INTERRUPT")
    (started,) = runs(cli, tmp_path)
    shown = json.loads(cli("runs", "show", started["id"], "--json", "--runs-dir", str(tmp_path / "runs")).output)
    assert shown["precision"] == "bf16"
    assert shown["step_options"] == {"fit": {"precision": "bf16", "accumulate": 1, "clip_norm": None,
                                             "clip_value": None, "compile": False, "channels_last": False}}
    assert_clean_error(cli("run", str(recipe), "--resume", "last", "--precision", "fp16"),
                       "trains in precision 'bf16'; a resume keeps it")
    resumed = cli("run", str(recipe), "--resume", "last")  # without the option: the run's own precision
    assert resumed.exit_code == 0, resumed.output
    run_dir = Path(started["run_dir"])
    assert [(run_dir / f"forward-{e}.txt").read_text() for e in (1, 3)] == ["torch.bfloat16"] * 2


def test_without_precision_a_run_records_its_steps_own(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE.replace("@ef.train_step\n", "@ef.train_step(precision='bf16')\n"))
    assert cli("run", str(recipe)).exit_code == 0
    (done,) = runs(cli, tmp_path)
    shown = json.loads(cli("runs", "show", done["id"], "--json", "--runs-dir", str(tmp_path / "runs")).output)
    assert shown["precision"] == "bf16" and shown["step_options"]["fit"]["precision"] == "bf16"


def test_bad_step_options_exit_2_naming_the_step_and_nothing_is_recorded(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE.replace("@ef.train_step\n", "@ef.train_step(accumulate=0)\n"))
    assert_clean_error(cli("run", str(recipe)), "@ef.train_step of 'train': accumulate= expects a whole number")
    assert_clean_error(cli("run", str(write_recipe(BASE_RECIPE)), "--precision", "fp8"), "fp8")
    recipe = write_recipe(BASE_RECIPE.replace("@ef.train_step\n", "@ef.train_step(accumulate='steps')\n"))
    assert_clean_error(cli("run", str(recipe)), "accumulate= expects the name of a config key; 'steps' is not")
    assert not (tmp_path / "runs" / "recipe").exists() or not list((tmp_path / "runs" / "recipe").iterdir())
