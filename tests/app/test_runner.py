"""ef.run and `engineflow run` before training: checks that run first, setup failures, no litter."""

from __future__ import annotations

import json

import pytest

from tests.app.test_cli import assert_clean_error, edit
from tests.conftest import BASE_RECIPE


def listed_runs(cli, tmp_path) -> list:
    result = cli("runs", "list", "--json", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def assert_nothing_recorded(cli, tmp_path) -> None:
    assert listed_runs(cli, tmp_path) == []
    runs = tmp_path / "runs"
    folders = [p for p in runs.glob("*") if p.is_dir()] if runs.exists() else []
    assert folders == [], folders


EVAL_WITHOUT_Y = edit('    return {"y_pred": model(x), "y": y}', '    return {"y_pred": model(x)}')
EVAL_WRONG_SHAPE = edit('@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})',
                        '@ef.eval_step(metrics={"mse": ef.metrics.MeanSquaredError()})').replace(
    '    return {"y_pred": model(x), "y": y}', '    return {"y_pred": model(x), "y": y.float()}')


@pytest.mark.parametrize(("source", "fragments"), [
    (EVAL_WITHOUT_Y, ["metric 'accuracy' (Accuracy)", "eval step 'evaluate'", "'y_pred': float32[4, 2]",
                      "reads 'y_pred' and 'y'"]),
    (EVAL_WRONG_SHAPE, ["metric 'mse' (MeanSquaredError)", "eval step 'evaluate'", "'y': float32[4]"]),
], ids=["no-y", "wrong-shape"])
def test_eval_output_mistakes_are_caught_before_training(cli, write_recipe, tmp_path, source, fragments):
    result = cli("run", str(write_recipe(source)))
    assert_clean_error(result, *fragments)
    assert "epoch 1" not in result.output, "the mistake must be found before the first epoch, not after it"
    assert_nothing_recorded(cli, tmp_path)


def test_a_failing_setup_says_setup_failed_shows_the_recipes_frames_and_records_nothing(cli, write_recipe, tmp_path):
    recipe = write_recipe(edit("    model = torch.nn.Linear(4, 2)\n",
                               "    model = torch.nn.Linear(4, 2)\n    load_vocabulary(cfg)\n")
                          + "\n\ndef load_vocabulary(cfg):\n    raise ValueError('vocabulary file missing')\n")
    result = cli("run", str(recipe))
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "setup" in error[0] and "failed" in error[0] and "training failed" not in error[0]
    assert "ValueError: vocabulary file missing" in error[0]
    trace = result.output[result.output.index("Traceback"):result.output.index("error: ")]
    assert f'File "{recipe}"' in trace and "in load_vocabulary" in trace and "in setup" in trace
    assert "/engineflow/" not in trace and "/ignite/" not in trace, trace
    assert_nothing_recorded(cli, tmp_path)
    debug = cli("run", str(recipe), "--debug")
    assert debug.exit_code == 1 and "/engineflow/app/runner.py" in debug.output


def test_an_eval_step_failing_on_the_checked_batch_says_so_and_records_nothing(cli, write_recipe, tmp_path):
    recipe = write_recipe(edit('    return {"y_pred": model(x), "y": y}',
                               '    return {"y_pred": model(x[:, :3]), "y": y}'))
    result = cli("run", str(recipe))
    assert result.exit_code == 1, result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "eval step 'evaluate'" in error and "first batch of the 'valid' loader" in error
    assert "training failed" not in result.output
    trace = result.output[result.output.index("Traceback"):result.output.index("error: ")]
    assert f'File "{recipe}"' in trace and "/engineflow/" not in trace
    assert_nothing_recorded(cli, tmp_path)


def test_a_missing_config_key_is_one_clear_line(cli, write_recipe, tmp_path):
    recipe = write_recipe(edit("config = ef.config(epochs=2, lr=0.1, batch_size=4, seed=0)", "config = ef.config()"))
    result = cli("run", str(recipe))
    assert_clean_error(result, "'seed'", "does not declare", "config = ef.config(seed=...)")
    assert_nothing_recorded(cli, tmp_path)


def test_a_recipe_without_config_runs_one_epoch_and_says_so_in_the_singular(cli, write_recipe, tmp_path):
    source = (edit("config = ef.config(epochs=2, lr=0.1, batch_size=4, seed=0)\n", "")
              .replace("manual_seed(cfg.seed)", "manual_seed(0)").replace("lr=cfg.lr", "lr=0.1")
              .replace("batch_size=cfg.batch_size", "batch_size=4"))
    result = cli("run", str(write_recipe(source)))
    assert result.exit_code == 0, result.output
    assert ", 1 epoch" in result.output and "1 epochs" not in result.output
    assert "completed 1 epoch in" in result.output


@pytest.mark.parametrize("args", [
    ["--set", "lr=fast"],
    ["--set", "nonsense=1"],
])
def test_start_up_errors_print_no_banner_and_leave_no_run(cli, write_recipe, tmp_path, args):
    result = cli("run", str(write_recipe(BASE_RECIPE)), *args)
    assert_clean_error(result)
    assert "run " not in result.output.split("error:")[0], "no run banner before a start-up error"
    assert_nothing_recorded(cli, tmp_path)


@pytest.mark.parametrize("source", [
    edit("def train(batch, model, optimizer):", "def train(batch, model, optimizer, scheduler):"),
    edit("@ef.train_step\n", ""),
    edit('loaders={"train": DataLoader', 'loaders={"training": DataLoader'),
], ids=["unknown-component", "no-train-step", "no-train-loader"])
def test_recipe_errors_found_while_building_leave_no_run(cli, write_recipe, tmp_path, source):
    result = cli("run", str(write_recipe(source)))
    assert_clean_error(result)
    assert_nothing_recorded(cli, tmp_path)


LOADS_LAST = BASE_RECIPE.replace("def setup(cfg):", "def setup(cfg, run):").replace(
    "    model = torch.nn.Linear(4, 2)\n", """\
    model = torch.nn.Linear(4, 2)
    try:
        past = ef.load_run("last", runs_dir=run.runs_dir)
    except ef.RecipeError as err:
        note(run.run_id, "none")
    else:
        note(run.run_id, past.record["id"])
        model.load_state_dict(past.model.state_dict())
""") + """

def note(who, what):
    with open(LOG, "a") as log:
        log.write(f"{who} {what}\\n")


@ef.on(ef.Events.COMPLETED)
def load_from_a_handler(run):
    try:
        ef.load_run(run.run_id, runs_dir=run.runs_dir)
    except ef.RecipeError as err:
        note(run.run_id, "refused: " + str(err).replace(" ", "_"))
"""


def test_setup_loading_last_gets_the_previous_run_never_its_own(write_recipe, tmp_path):
    import engineflow as ef

    log = tmp_path / "loads.txt"
    recipe = write_recipe(LOADS_LAST + f"\nLOG = {str(log)!r}\n")
    runs = tmp_path / "runs"
    first = ef.run(recipe, device="cpu", runs_dir=runs, stream=open(tmp_path / "1.txt", "w"))
    second = ef.run(recipe, device="cpu", runs_dir=runs, force=True, stream=open(tmp_path / "2.txt", "w"))
    assert first.status == second.status == "completed"
    lines = [line.split(" ", 1) for line in log.read_text().splitlines()]
    setups = [(who, what) for who, what in lines if not what.startswith("refused")]
    # run 1 found nothing; run 2 loaded run 1 (whose own setup, rebuilt from its snapshot, found nothing
    # but the runs being built and loaded, so it loaded none)
    assert setups[0] == (first.run_id, "none")
    assert (second.run_id, first.run_id) in setups
    assert all(what != who for who, what in setups), "a setup loaded its own run"
    refusals = [(who, what) for who, what in lines if what.startswith("refused")]
    assert [who for who, _ in refusals] == [first.run_id, second.run_id]
    assert all("training_or_loading_now" in what for _, what in refusals)


def test_loading_a_run_in_setup_leaves_this_runs_seed_in_charge(write_recipe, tmp_path):
    import torch

    import engineflow as ef

    recipe = write_recipe(LOADS_LAST + f"\nLOG = {str(tmp_path / 'log.txt')!r}\n")
    ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", seed=5, stream=open(tmp_path / "1.txt", "w"))
    load = f"    if cfg.load:\n        ef.load_run('last', runs_dir={str(tmp_path / 'runs')!r})\n"
    head = BASE_RECIPE.replace("    model = torch.nn.Linear(4, 2)\n",
                               "    model = torch.nn.Linear(4, 2)\n" + load + "    model.head = torch.nn.Linear(2, 2)\n"
                               ).replace("seed=0)", "seed=0, load=True)")
    path = write_recipe(head, "head.py")

    def head_weights(load: bool, seed: int) -> torch.Tensor:
        fit, _, _ = ef.build(path, {"load": load}, seed=seed)
        return fit.components["model"].head.weight.detach().clone()

    assert torch.equal(head_weights(True, 1), head_weights(False, 1)), "the loaded run's seed took over"
    assert not torch.equal(head_weights(True, 1), head_weights(True, 2))


def test_errors_through_the_python_api_name_python_arguments(write_recipe, tmp_path):
    import engineflow as ef

    recipe = write_recipe(BASE_RECIPE)
    ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))
    with pytest.raises(ef.RecipeError) as repeat:
        ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))
    assert "force=True" in str(repeat.value) and "retrain=True" in str(repeat.value)
    assert "--force" not in str(repeat.value)
    with pytest.raises(ef.RecipeError, match=r"resume='last' continues a recorded run; force=True"):
        ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", resume="last", force=True)
