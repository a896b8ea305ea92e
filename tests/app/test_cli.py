"""The real CLI: one clear error and exit code 2 for each bad recipe, exit 1 for a NaN loss."""

from __future__ import annotations

import pytest

from tests.conftest import BASE_RECIPE, read_run


def edit(old: str, new: str) -> str:
    assert old in BASE_RECIPE, old
    return BASE_RECIPE.replace(old, new)


def assert_clean_error(result, *fragments: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_help_is_clear(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "run" in result.output and "Exit codes" in result.output
    result = cli("run", "--help")
    for option in ("--set", "--check", "--device", "--seed", "--runs-dir", "--debug"):
        assert option in result.output


def test_run_trains_and_prints_a_summary(cli, write_recipe, tmp_path):
    result = cli("run", str(write_recipe(BASE_RECIPE)), "--set", "epochs=3", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "epoch 3/3" in result.output and "best epoch" in result.output and "completed 3 epochs" in result.output
    summary = read_run(tmp_path / "runs")
    assert summary["status"] == "completed" and summary["config"]["epochs"] == 3
    assert len(summary["history"]) == 3


def test_check_runs_two_batches_for_two_epochs(cli, write_recipe, tmp_path):
    recipe = edit("config = ef.config(epochs=2,", "config = ef.config(epochs=50,") + '''
seen = []
@ef.on(ef.Events.ITERATION_COMPLETED)
def count(state):
    seen.append((state.epoch, state.iteration))

@ef.on(ef.Events.COMPLETED)
def report():
    print("seen", seen)
'''
    result = cli("run", str(write_recipe(recipe)), "--check", "--set", "batch_size=1")
    assert result.exit_code == 0, result.output
    assert "seen [(1, 1), (1, 2), (2, 3), (2, 4)]" in result.output
    assert read_run(tmp_path / "runs")["epochs"] == 2


def test_seed_option_sets_the_config_seed(cli, write_recipe, tmp_path):
    result = cli("run", str(write_recipe(BASE_RECIPE)), "--seed", "7")
    assert result.exit_code == 0, result.output
    summary = read_run(tmp_path / "runs")
    assert summary["seed"] == 7 and summary["config"]["seed"] == 7


def test_missing_recipe_file(cli, tmp_path):
    assert_clean_error(cli("run", str(tmp_path / "nope.py")), "recipe file not found", "nope.py")


def test_syntax_error_names_the_line(cli, write_recipe):
    path = write_recipe(edit("def setup(cfg):", "def setup(cfg:"))
    message = assert_clean_error(cli("run", str(path)), "syntax error")
    line = BASE_RECIPE.splitlines().index("def setup(cfg:".replace("cfg:", "cfg):")) + 1
    assert f"{path}:{line}:" in message


def test_recipe_that_raises_on_import_names_the_line(cli, write_recipe):
    path = write_recipe(BASE_RECIPE + "\nimport not_a_real_module_xyz\n")
    assert_clean_error(cli("run", str(path)), "ModuleNotFoundError", f"{path}:{len(BASE_RECIPE.splitlines()) + 2}")


def test_no_train_step(cli, write_recipe):
    recipe = edit("@ef.train_step\n", "")
    assert_clean_error(cli("run", str(write_recipe(recipe))), "no train step", "@ef.train_step", "loss_fn")


def test_step_asking_for_a_component_nobody_provides(cli, write_recipe):
    recipe = edit("def train(batch, model, optimizer):", "def train(batch, model, optimizer, scheduler):")
    assert_clean_error(cli("run", str(write_recipe(recipe))), "train step", "asks for 'scheduler'",
                       "Available: ", "batch, best, cfg", "model, optimizer")


def test_step_returning_neither_dict_nor_tensor(cli, write_recipe, tmp_path):
    recipe = edit('return {"loss": loss}', "return loss.item()")
    assert_clean_error(cli("run", str(write_recipe(recipe))), "'train'", "returned float", "must return a dict")
    summary = read_run(tmp_path / "runs")
    assert summary["status"] == "failed" and "returned float" in summary["error"]


def test_unknown_set_key(cli, write_recipe):
    assert_clean_error(cli("run", str(write_recipe(BASE_RECIPE)), "--set", "learning_rate=1"),
                       "unknown config key 'learning_rate'", "Valid keys: epochs, lr, batch_size, seed")


def test_set_value_of_the_wrong_type(cli, write_recipe, tmp_path):
    assert_clean_error(cli("run", str(write_recipe(BASE_RECIPE)), "--set", "epochs=many"),
                       "'epochs' expects an int", "got 'many'")
    assert not (tmp_path / "runs").exists(), "a usage error leaves no run behind"


def test_debug_shows_the_traceback(cli, write_recipe):
    result = cli("run", str(write_recipe(BASE_RECIPE)), "--set", "nope=1", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.output


@pytest.mark.parametrize(("bad", "shown"), [("float('nan')", "nan"), ("float('inf')", "inf")],
                         ids=["nan", "inf"])
def test_non_finite_loss_stops_with_exit_1_naming_the_iteration(cli, write_recipe, tmp_path, bad, shown):
    recipe = edit('return {"loss": loss}', f'return {{"loss": loss * ({bad} if state.iteration == 4 else 1)}}')
    recipe = recipe.replace("def train(batch, model, optimizer):", "def train(batch, model, optimizer, state):")
    # 3 batches per epoch, so iteration 4 is the first of epoch 2; the message names the value it saw
    assert_clean_error(cli("run", str(write_recipe(recipe))), f"the loss became {shown} at iteration 4 (epoch 2)",
                       code=1)
    assert read_run(tmp_path / "runs")["status"] == "failed"


def test_handler_crash_exits_1_with_the_traceback_and_names(cli, write_recipe):
    recipe = BASE_RECIPE + '''
@ef.every_n_epochs(2)
def broken(state):
    raise KeyError("oops")
'''
    result = cli("run", str(write_recipe(recipe)))
    assert result.exit_code == 1
    assert "Traceback" in result.output, "a bug in user code keeps its traceback"
    assert "handler 'broken'" in result.output and "EPOCH_COMPLETED" in result.output


def test_cuda_without_a_gpu_is_a_usage_error(cli, write_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs one without")
    assert_clean_error(cli("run", str(write_recipe(BASE_RECIPE)), "--device", "cuda"), "no CUDA device")


def test_progress_bar_when_asked_and_plain_lines_otherwise(write_recipe, tmp_path):
    import io

    import engineflow as ef

    recipe = write_recipe(BASE_RECIPE)
    bar, plain = io.StringIO(), io.StringIO()
    ef.run(recipe, runs_dir=tmp_path / "a", device="cpu", progress=True, stream=bar)
    ef.run(recipe, runs_dir=tmp_path / "b", device="cpu", progress=False, stream=plain)
    assert "batch/s" in bar.getvalue() and "\r" in bar.getvalue() and "epoch 2/2" in bar.getvalue()
    assert "\r" not in plain.getvalue() and "\033" not in plain.getvalue()
    assert "epoch 1/2  train/loss" in plain.getvalue()


def test_runs_commands_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from engineflow.app.cli import main; "
            f"r = CliRunner().invoke(main, ['runs', 'list', '--runs-dir', {str(tmp_path)!r}]); "
            "print(r.exit_code, 'torch' in sys.modules, 'ignite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False", "False"], "runs list stays fast by importing neither torch nor ignite"


def test_reindex_names_each_damaged_file_and_lists_the_run_as_damaged(cli, write_recipe, tmp_path):
    import json

    recipe = write_recipe(BASE_RECIPE)
    runs_dir = str(tmp_path / "runs")
    assert cli("run", str(recipe)).exit_code == 0
    assert cli("run", str(recipe), "--force").exit_code == 0
    damaged, healthy = sorted((tmp_path / "runs" / "recipe").iterdir())
    text = (damaged / "run.json").read_text()
    (damaged / "run.json").write_text(text[: len(text) // 2])
    (tmp_path / "runs" / "engineflow.db").unlink()
    result = cli("runs", "reindex", "--runs-dir", runs_dir)
    assert result.exit_code == 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("damaged:")]
    assert len(lines) == 1 and "run.json" in lines[0] and "cut short" in lines[0]
    assert "indexed 2 runs (1 damaged" in result.output
    listed = {r["id"]: r["status"] for r in json.loads(cli("runs", "list", "--runs-dir", runs_dir, "--json").output)}
    assert listed == {damaged.name: "damaged", healthy.name: "completed"}


def test_only_run_reports_an_unexpected_error_as_training_failed(cli, tmp_path, monkeypatch):
    import engineflow.record.runs as runs

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runs, "list_runs", broken)
    result = cli("runs", "list", "--runs-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "error: runs list failed with the exception above" in result.output
    assert "training failed" not in result.output and "RuntimeError: disk on fire" in result.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--nproc", "0"], "--nproc 0: the number of processes must be a whole number >= 1"),
    (["--nproc", "-1"], "--nproc -1: the number of processes must be a whole number >= 1"),
    (["--nproc", "two"], "Invalid value for '--nproc': 'two' is not a valid integer"),
    (["--nproc", "99999999999999999999"], "pass --oversubscribe to start them anyway"),
    (["--nproc", "CPUS+1"], "CPU core(s) for this process"),
    (["--device", "gpu"], "Invalid value for '--device'"),
    (["--no-such-option"], "--no-such-option"),  # click's wording of it differs between its releases
])
def test_a_bad_option_is_one_line_and_starts_nothing(cli, write_recipe, tmp_path, args, fragment):
    """Usage mistakes are one line like every other error (no usage block); too many processes are refused
    before any starts: no more than this machine's cores unless --oversubscribe."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    recipe = write_recipe(BASE_RECIPE)
    result = cli("run", str(recipe), *[str(cpus + 1) if a == "CPUS+1" else a for a in args])
    line = assert_clean_error(result, fragment)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert line.endswith("-h lists the options)") or "--nproc" in line
    assert not (tmp_path / "runs").exists()


def test_test_refuses_more_processes_than_cores_too(cli, write_recipe, tmp_path):
    import os

    import engineflow as ef

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    recipe = write_recipe(BASE_RECIPE)
    assert_clean_error(cli("test", str(recipe), "--nproc", str(cpus + 1), "--runs-dir", str(tmp_path / "runs")),
                       "--oversubscribe")
    with pytest.raises(ef.RecipeError, match=r"nproc=\d+: .*oversubscribe=True"):
        ef.run(recipe, runs_dir=tmp_path / "runs", nproc=cpus + 1)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("returned", "fragment"), [
    ('device="gpu9"', "returned 'device', a name engineflow provides itself (the device the run trains on)"),
    ('cfg=3', "returned 'cfg', a name engineflow provides itself (the run's config)"),
    ('run="mine"', "returned 'run', a name engineflow provides itself"),
    ('**{"my model": 1}', "returned the key 'my model'; steps and handlers ask for components by parameter name"),
    ("3", "returned the key 3;"),
])
def test_setup_returning_a_name_nobody_can_ask_for_or_engineflows_own_exits_2(cli, write_recipe, tmp_path,
                                                                             returned, fragment):
    if returned == "3":  # a key that is not a string: dict() cannot take it as a keyword
        recipe = write_recipe(edit("return dict(model=model,", "return {3: 1} | dict(model=model,"))
    else:
        recipe = write_recipe(edit("return dict(model=model,", f"return dict({returned}, model=model,"))
    line = assert_clean_error(cli("run", str(recipe)), fragment)
    assert "setup 'setup' (" in line
    assert not list((tmp_path / "runs").glob("*/*/run.json"))


def test_ignore_changes_without_resume_is_refused_not_ignored(cli, write_recipe, tmp_path):
    import engineflow as ef

    recipe = write_recipe(BASE_RECIPE)
    assert_clean_error(cli("run", str(recipe), "--ignore-changes"),
                       "--ignore-changes goes with --resume RUN", "add --resume last")
    with pytest.raises(ef.RecipeError, match=r"ignore_changes=True goes with resume='RUN'"):
        ef.run(recipe, runs_dir=tmp_path / "runs", ignore_changes=True)
    assert not (tmp_path / "runs").exists()
