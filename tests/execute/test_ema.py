"""ef.ema: the average of the weights, by hand; only after stepping iterations; resumed exactly;
validated on and saved as best.pt when asked; per stage of a pipeline."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.state.checkpoint_files import load_record
from tests.conftest import BASE_RECIPE
from tests.recipes import accumulating_step

# The eval step's main metric is a loss, which any change of the weights moves (an accuracy on 10
# samples may not).
RECIPE = BASE_RECIPE.replace('metrics={"accuracy": ef.metrics.Accuracy()}',
                             'metrics={"loss": ef.metrics.Loss(F.cross_entropy)}') + '''
SEEN = []

@ef.on(ef.Events.ITERATION_COMPLETED)
def seen(model):
    SEEN.append({k: v.detach().clone() for k, v in model.state_dict().items()})
'''


def own_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def by_hand(start: dict, seen: list[dict], decays: list[float]) -> dict:
    average = dict(start)
    for weights, decay in zip(seen, decays, strict=True):
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    return average


def assert_close(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for k in expected:
        torch.testing.assert_close(found[k], expected[k], rtol=0, atol=1e-6)


def assert_equal(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for k in expected:
        assert torch.equal(found[k], expected[k]), k


@pytest.mark.parametrize(("declared", "decays"), [("ef.ema(0.5)", [0.5] * 3),
                                                  ("ef.ema(0.9, warmup=True)", [1 / 10, 2 / 11, 3 / 12])])
def test_the_average_is_the_hand_computed_one_over_three_iterations(write_recipe, declared, decays):
    recipe = ef.load_recipe(write_recipe(RECIPE + f"average = {declared}\n"))
    fit, _, _ = ef.build(recipe)
    start = own_weights(fit.components["model"])
    fit.run(epochs=1)
    state = fit.state_dict()["parts"]["ema"]  # the average is in the fit's checkpoints
    assert state["updates"] == 3 and len(recipe.module.SEEN) == 3
    assert_close(state["weights"], by_hand(start, recipe.module.SEEN, decays))
    assert not torch.equal(state["weights"]["weight"], fit.components["model"].weight)


# Gradients accumulated over 2 batches: of an epoch's 3 batches, the 2nd steps (a full group) and the 3rd
# (the epoch's last, a short group); the 1st does not.
ACCUMULATED = accumulating_step(2) + "average = ef.ema(0.5)\n"


def test_iterations_whose_optimizers_did_not_step_are_not_averaged(write_recipe):
    recipe = ef.load_recipe(write_recipe(RECIPE + ACCUMULATED))
    fit, _, _ = ef.build(recipe)
    start = own_weights(fit.components["model"])
    fit.run(epochs=1)
    average = fit.parts["ema"]
    assert average.updates == 2
    assert_close(average.weights, by_hand(start, recipe.module.SEEN[1:3], [0.5, 0.5]))


RESUMED = RECIPE.replace("seed=0)", "seed=0, stop_at=0)") + '''
average = ef.ema(0.8, warmup=True, evaluate=True)

@ef.on(ef.Events.ITERATION_COMPLETED)
def stop(state, cfg):
    if state.iteration == cfg.stop_at:
        raise ef.StopFit
'''


def test_a_state_taken_mid_epoch_and_loaded_into_a_new_fit_continues_the_average_exactly(write_recipe):
    path = write_recipe(RESUMED)
    unbroken, _, _ = ef.build(path)
    unbroken.run(epochs=2)
    stopped, _, _ = ef.build(path, {"stop_at": 4})  # in the second epoch, after its first batch
    stopped.run(epochs=2)
    state = copy.deepcopy(stopped.state_dict())
    assert state["parts"]["ema"]["updates"] == 4
    resumed, _, _ = ef.build(path)
    resumed.load_state_dict(state)
    resumed.run(epochs=2)
    for fit in (resumed, unbroken):
        assert fit.parts["ema"].updates == 6
    assert_equal(resumed.parts["ema"].weights, unbroken.parts["ema"].weights)
    assert_equal(own_weights(resumed.components["model"]), own_weights(unbroken.components["model"]))
    assert resumed.history == unbroken.history


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """Two recorded runs validating on the average: best.pt exported from the best epoch's checkpoint
    (keep_best=1, the default) and written at each improvement (keep_best=0)."""
    folder = tmp_path_factory.mktemp("ema")
    runs = {}
    for keep_best in (1, 0):
        path = folder / f"keep{keep_best}.py"
        path.write_text(RECIPE.replace("epochs=2,", "epochs=3,") + "average = ef.ema(0.8, evaluate=True)\n"
                        f"checkpoints = ef.checkpoints(keep_best={keep_best}, keep_last=3)\n")
        runs[keep_best] = ef.run(path, runs_dir=folder / "runs", device="cpu", stream=io.StringIO())
    return folder / "runs", runs


def test_validation_runs_on_the_average(write_recipe):
    recipe = ef.load_recipe(write_recipe(RECIPE + "average = ef.ema(0.8, evaluate=True)\n"))
    fit, _, _ = ef.build(recipe)
    fit.run(epochs=1)
    validated = fit.history[-1]["valid/loss"]
    model, average = fit.components["model"], fit.parts["ema"]
    assert_equal(own_weights(model), recipe.module.SEEN[-1])  # its own weights are back after validation
    assert fit.evaluate("valid")["valid/loss"] != validated, "the model's own weights give another loss"
    # the average evaluated by hand, on a copy of the model
    copied = copy.deepcopy(model)
    copied.load_state_dict(average.weights)
    x, y = (torch.cat(parts) for parts in zip(*fit.loaders["valid"], strict=True))
    with torch.no_grad():
        torch.testing.assert_close(validated, F.cross_entropy(copied(x), y).item(), rtol=1e-6, atol=0)
    with average.swapped_in():
        assert fit.evaluate("valid")["valid/loss"] == validated


def test_a_validation_that_raises_leaves_the_model_its_own_weights(write_recipe):
    recipe = ef.load_recipe(write_recipe(RECIPE + '''
average = ef.ema(0.8, evaluate=True)

@ef.on(ef.Events.ITERATION_COMPLETED, engine=evaluate)
def fails():
    raise ValueError("validation failed")
'''))
    fit, _, _ = ef.build(recipe)
    with pytest.raises(Exception, match="validation failed"):
        fit.run(epochs=1)
    assert_equal(own_weights(fit.components["model"]), recipe.module.SEEN[-1])
    assert not torch.equal(fit.parts["ema"].weights["weight"], recipe.module.SEEN[-1]["weight"])


@pytest.mark.parametrize("keep_best", [1, 0])
def test_best_pt_holds_the_average_of_the_best_epoch_and_last_pt_the_trained_weights(ema_runs, keep_best):
    runs_dir, runs = ema_runs
    result = runs[keep_best]
    best = result.best["epoch"]
    checkpoints = result.run_dir / "checkpoints"
    at_best = load_record(checkpoints / "state" / f"state-{3 * best:09d}.pt")  # 3 iterations an epoch
    at_end = load_record(checkpoints / "state" / "state-000000009.pt")
    best_pt = torch.load(checkpoints / "best.pt", weights_only=True)
    last_pt = torch.load(checkpoints / "last.pt", weights_only=True)
    assert_equal(best_pt["weights"]["model"], at_best.parts["ema"]["weights"])
    assert_equal(best_pt["ema"]["model"], at_best.parts["ema"]["weights"])
    assert_equal(last_pt["weights"]["model"], at_end.components["model"])
    assert_equal(last_pt["ema"]["model"], at_end.parts["ema"]["weights"])
    assert not torch.equal(last_pt["weights"]["model"]["weight"], last_pt["ema"]["model"]["weight"])
    # what load_run gives, and the best metric evaluated again on it
    past = ef.load_run(result.run_id, runs_dir=runs_dir)
    assert_equal(own_weights(past.model), at_best.parts["ema"]["weights"])
    assert past.fit.evaluate("valid")["valid/loss"] == pytest.approx(result.best["value"], rel=1e-6)
    last = ef.load_run(result.run_id, runs_dir=runs_dir, which="last", ema=True)
    assert_equal(own_weights(last.model), at_end.parts["ema"]["weights"])


def test_a_run_still_going_gives_the_average_from_its_checkpoints(ema_runs):
    runs_dir, runs = ema_runs
    result = runs[1]
    checkpoints = result.run_dir / "checkpoints"
    for name in ("best.pt", "last.pt"):
        (checkpoints / name).rename(checkpoints / f"{name}.aside")
    try:
        at_best = load_record(checkpoints / "state" / f"state-{3 * result.best['epoch']:09d}.pt")
        past = ef.load_run(result.run_id, runs_dir=runs_dir)
        assert_equal(own_weights(past.model), at_best.parts["ema"]["weights"])
    finally:
        for name in ("best.pt", "last.pt"):
            (checkpoints / f"{name}.aside").rename(checkpoints / name)


STAGES = '''
stages = [ef.stage("one", train=train, eval=evaluate, epochs=1), ef.stage("two", train=train, eval=evaluate, epochs=1)]
'''
STAGED = RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(") + STAGES


def test_an_ema_of_one_stage_starts_there_and_a_pipeline_wide_one_carries_on(write_recipe):
    recipe = ef.load_recipe(write_recipe(STAGED + "second = ef.ema(0.5, stage='two')\n"
                                                  "everywhere = ef.ema(0.5, name='ema_all')\n"))
    pipeline, _, _ = ef.build(recipe)
    start = own_weights(pipeline.fit.components["model"])
    assert "ema" not in pipeline.fit.parts and "ema_all" in pipeline.fit.parts
    pipeline.run()
    seen = recipe.module.SEEN
    second, everywhere = pipeline.fit.parts["ema"], pipeline.fit.parts["ema_all"]
    assert (second.updates, everywhere.updates) == (3, 6)
    assert_close(second.weights, by_hand(seen[2], seen[3:], [0.5] * 3))  # from the weights stage one left
    assert_close(everywhere.weights, by_hand(start, seen, [0.5] * 6))


def test_a_pipeline_wide_ema_starts_again_where_a_stage_changes_the_models_shape(write_recipe):
    deeper = '''
def deeper(cfg):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=cfg.lr)}

average = ef.ema(0.5)
'''
    source = STAGED.replace(STAGES, deeper + STAGES.replace('ef.stage("two", train=train, eval=evaluate, epochs=1)',
                                                            'ef.stage("two", train=train, eval=evaluate, epochs=1, '
                                                            'prepare=deeper)'))
    recipe = ef.load_recipe(write_recipe(source))
    pipeline, _, _ = ef.build(recipe)
    pipeline.run()
    average = pipeline.fit.parts["ema"]
    assert average.updates == 3 and list(average.weights) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_a_resume_inside_the_second_stage_continues_a_pipeline_wide_average_exactly(write_recipe):
    path = write_recipe(STAGED.replace("seed=0)", "seed=0, stop_at=0)") + '''
average = ef.ema(0.8, warmup=True, evaluate=True)

@ef.on(ef.Events.ITERATION_COMPLETED, stage="two")
def stop(state, cfg):
    if state.iteration == cfg.stop_at:
        raise ef.StopFit
''')
    unbroken, _, _ = ef.build(path)
    unbroken.run()
    stopped, _, _ = ef.build(path, {"stop_at": 2})
    stopped.run()
    record = copy.deepcopy(stopped.fit.resume_record())
    assert record.stage.name == "two" and record.position.iteration == 2 and record.parts["ema"]["updates"] == 5
    resumed, _, _ = ef.build(path)
    resumed.load_state_dict(record)
    resumed.run()
    assert resumed.fit.parts["ema"].updates == unbroken.fit.parts["ema"].updates == 6
    assert_equal(resumed.fit.parts["ema"].weights, unbroken.fit.parts["ema"].weights)
    assert_equal(own_weights(resumed.fit.components["model"]), own_weights(unbroken.fit.components["model"]))


@pytest.mark.parametrize(("tail", "message"), [
    ("a = ef.ema(1.0)\n", r"ef.ema\(decay=1.0\): the decay must be a number between 0 and 1"),
    ("a = ef.ema(model='net')\n", r"ef.ema\(model='net'\) averages a module component, but the module components "
                                  "there are model; pass one of them as model="),
])
def test_bad_ema_declarations_are_recipe_errors(write_recipe, tail, message):
    with pytest.raises(RecipeError, match=message):
        ef.build(write_recipe(RECIPE + tail))


def test_the_readme_example_loads_the_best_and_the_final_average(ema_runs, monkeypatch):
    from tests.test_readme import python_block_after

    runs_dir, runs = ema_runs
    result = runs[0]  # the newest run, "last"
    monkeypatch.chdir(runs_dir.parent)
    monkeypatch.delenv("ENGINEFLOW_RUNS_DIR", raising=False)
    namespace: dict = {"ef": ef}
    exec(compile(python_block_after("<!-- ema -->"), "README.md", "exec"), namespace)
    average = namespace["average"]
    assert (average.decay, average.warmup, average.model, average.evaluate) == (0.999, True, "model", True)
    checkpoints = result.run_dir / "checkpoints"
    assert_equal(own_weights(namespace["past"].model),
                 torch.load(checkpoints / "best.pt", weights_only=True)["ema"]["model"])
    assert_equal(own_weights(namespace["final"]),
                 torch.load(checkpoints / "last.pt", weights_only=True)["ema"]["model"])
