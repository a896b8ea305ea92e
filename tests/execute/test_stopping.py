"""Early stopping: stops at the expected epoch on a scripted metric, per stage and pipeline-wide, resumes exactly."""

from __future__ import annotations

import json

import pytest

import engineflow as ef
from engineflow.errors import RecipeError
from tests.conftest import BASE_RECIPE, invoke_cli, read_run

# The eval step's main metric, valid/score (mode max), follows SCORES by the pipeline's epoch.
SCRIPTED = BASE_RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(epochs=10,").replace(
    '''@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}''', '''from ignite.metrics import Average

@ef.eval_step(metrics={"score": Average(output_transform=lambda out: out["score"])})
def evaluate(batch, model, pipeline):
    return {"score": torch.tensor(SCORES[pipeline.epoch - 1])}''')


def recipe(write_recipe, scores, tail, name="recipe.py"):
    return write_recipe(SCRIPTED + f"\nnan = float('nan')\nSCORES = {scores!r}\n" + tail, name)


@pytest.mark.parametrize(("min_delta", "stopped_at"), [(0.0, 6), (0.05, 4)])
def test_it_stops_after_patience_epochs_without_an_improvement(write_recipe, min_delta, stopped_at):
    scores = [0.5, 0.7, 0.72, 0.74, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9]
    fit, _, _ = ef.build(recipe(write_recipe, scores, f"stop = ef.early_stopping(patience=2, min_delta={min_delta})\n"))
    fit.run(epochs=10)
    assert [row["epoch"] for row in fit.history] == list(range(1, stopped_at + 1))
    assert fit.summary("completed")["stopped"] == {"by": "early_stopping", "epoch": stopped_at, "rest": True}
    assert fit.best.epoch == 4


def test_a_recorded_run_records_and_reports_the_epoch_it_stopped_at(write_recipe, tmp_path):
    scores = [0.5, 0.7, 0.72, 0.74, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9]
    path = recipe(write_recipe, scores, "stop = ef.early_stopping(patience=2)\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as stream:
        ef.run(path, device="cpu", runs_dir=tmp_path / "runs", stream=stream)
    record = read_run(tmp_path / "runs")
    assert [row["epoch"] for row in record["history"]] == [1, 2, 3, 4, 5, 6]  # the stop epoch's metrics too
    assert record["epochs"] == 6
    shown = json.loads(cli_json("runs", "show", "last", "--json", "--runs-dir", str(tmp_path / "runs")))
    assert shown["stages"][0]["stopped"] == {"by": "early_stopping", "epoch": 6, "rest": True}
    assert "epoch 6/10" in out.read_text() and "completed 6 epochs" in out.read_text()


def cli_json(*args: str) -> str:
    done = invoke_cli(list(args))
    assert done.exit_code == 0, done.output
    return done.stdout


def test_a_nan_metric_never_improves(write_recipe):
    fit, _, _ = ef.build(recipe(write_recipe, [0.5, float("nan"), float("nan"), 0.9] + [0.9] * 6,
                                "stop = ef.early_stopping(patience=2)\n"))
    fit.run(epochs=10)
    assert len(fit.history) == 3


def test_its_state_resumes_to_the_same_stop_epoch(write_recipe):
    path = recipe(write_recipe, [0.5, 0.7, 0.6, 0.65, 0.69, 0.9, 0.9, 0.9, 0.9, 0.9],
                  "stop = ef.early_stopping(patience=3)\n")
    unbroken, _, _ = ef.build(path)
    unbroken.run(epochs=10)
    first, _, _ = ef.build(path)
    first.run(epochs=3)  # best 0.7 at epoch 2, one epoch without improvement since
    state = first.state_dict()
    assert state["parts"]["early_stopping"] == {"counter": 1, "best": pytest.approx(0.7), "tracking": "valid/score"}
    again, _, _ = ef.build(path)
    again.load_state_dict(state)
    assert again.parts["early_stopping"].counter == 1
    again.run(epochs=10)
    assert len(again.history) == len(unbroken.history) == 5
    assert again.stopped.as_dict() == unbroken.stopped.as_dict() == {"by": "early_stopping", "epoch": 5, "rest": True}
    # the state of the epoch it stopped at (its epoch checkpoint, before the stage-end one) trains no further
    after, _, _ = ef.build(path)
    after.load_state_dict(unbroken.state_dict())
    after.run(epochs=10)
    assert len(after.history) == 5 and after.train.state.epoch == 5


STAGES = '''
stages = [ef.stage("one", train=train, eval=evaluate, epochs=3), ef.stage("two", train=train, eval=evaluate, epochs=4),
          ef.stage("three", train=train, eval=evaluate, epochs=3),
          ef.stage("test", eval=evaluate, loaders={"test": "valid"})]
'''


def test_a_stage_stopper_ends_its_stage_and_the_next_stage_starts(write_recipe):
    scores = [0.5, 0.4, 0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2]  # "two" would stop after 2 of its own
    stop = "stop = ef.early_stopping(patience=2, stage='one')\n"
    pipeline, _, _ = ef.build(recipe(write_recipe, scores, STAGES + stop))
    pipeline.run()
    summary = {s["name"]: (s["status"], s["epochs"], s.get("stopped")) for s in pipeline.summaries}
    assert summary == {"one": ("completed", 3, {"by": "early_stopping", "epoch": 3, "rest": False}),
                       "two": ("completed", 4, None), "three": ("completed", 3, None), "test": ("completed", 0, None)}


def test_a_pipeline_wide_stopper_counts_across_stages_and_skips_the_later_train_stages(write_recipe, tmp_path):
    from engineflow.state.checkpoint_files import load_record

    # one improves to 0.7; two's first two epochs do not beat it: patience 2 runs out in two's epoch 2
    scores = [0.5, 0.6, 0.7, 0.65, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9]
    path = recipe(write_recipe, scores, STAGES + "stop = ef.early_stopping(patience=2)\n")
    result = ef.run(path, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))
    stages = {s["name"]: (s["status"], s["epochs"], s.get("stopped")) for s in read_run(tmp_path / "runs")["stages"]}
    assert stages == {"one": ("completed", 3, None),
                      "two": ("completed", 2, {"by": "early_stopping", "epoch": 2, "rest": True}),
                      "three": ("skipped", 0, None), "test": ("completed", 0, None)}
    assert result.status == "completed" and "test/test/score" in result.metrics
    assert "stage 3/4 three: skipped (early stopping ended the training)" in (tmp_path / "out.txt").read_text()
    # a resume from the state stage two ended with skips stage three too
    record = load_record(result.run_dir / "checkpoints" / "stages" / "two.pt")
    pipeline, _, _ = ef.build(path)
    pipeline.load_state_dict(record)
    pipeline.run()
    assert [s["status"] for s in pipeline.summaries] == ["completed", "completed", "skipped", "completed"]


@pytest.mark.parametrize(("call", "message"), [
    ("ef.early_stopping(patience=0)", "patience=...) expects a whole number of epochs >= 1, got 0"),
    ("ef.early_stopping(patience=2, min_delta=-1)", "min_delta=...) expects a number >= 0, got -1"),
    ("ef.early_stopping(patience=2, mode='up', metric='valid/x')", "mode=...) expects 'min' or 'max', got 'up'"),
])
def test_bad_arguments_are_recipe_errors(call, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        eval(call)


def test_a_metric_the_epoch_does_not_have_is_named(write_recipe):
    fit, _, _ = ef.build(recipe(write_recipe, [0.5] * 10, "stop = ef.early_stopping(patience=2, metric='valid/acc')\n"))
    with pytest.raises(RecipeError, match=r"'valid/acc', which the epoch's metrics do not have \(valid/score\)"):
        fit.run(epochs=2)
