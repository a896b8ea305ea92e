"""Toolbox declarations: found at a recipe's top level, attached to each train stage's fit, checkpointed."""

from __future__ import annotations

import pytest

import engineflow as ef
from engineflow.errors import RecipeError
from tests.conftest import BASE_RECIPE

# A tool that counts iterations: the smallest object with the tool protocol.
COUNTER = '''
from engineflow.declare.handlers import HandlerSpec

class Counter:
    __engineflow_tool__ = True

    def __init__(self, name="counter", stage=None):
        self.name, self.stage, self.count, self.fits = name, stage, 0, []

    def attach(self, fit):
        fit.register(self.name, self)
        self.fits.append(fit.stage.name)
        def count(engine):
            self.count += 1
        return [HandlerSpec(count, ef.Events.ITERATION_COMPLETED, "train", 0, seq=-1, raw=True)]

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]
'''


def test_a_top_level_tool_attaches_to_the_fit_and_is_checkpointed(write_recipe):
    path = write_recipe(BASE_RECIPE + COUNTER + "counted = Counter()\nalias = counted\n")
    fit, _, _ = ef.build(path)
    tool = fit.parts["counter"]
    fit.run(epochs=2)
    assert tool.count == 6  # 3 batches a epoch, attached once although two names hold it
    assert fit.state_dict()["parts"]["counter"] == {"count": 6}
    again, _, _ = ef.build(path)
    again.load_state_dict(fit.state_dict())
    assert again.parts["counter"].count == 6


STAGED = BASE_RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(") + '''
stages = [ef.stage("one", train=train, eval=evaluate, epochs=1), ef.stage("two", train=train, eval=evaluate, epochs=1)]
''' + COUNTER


def test_a_tool_for_one_stage_attaches_there_alone(write_recipe):
    path = write_recipe(STAGED + "everywhere = Counter()\nsecond = Counter('second', stage='two')\n")
    pipeline, _, _ = ef.build(path)
    module = pipeline.recipe.module
    pipeline.run()
    assert module.everywhere.fits == ["one", "two"] and module.everywhere.count == 6  # one object across stages
    assert module.second.fits == ["two"] and module.second.count == 3


@pytest.mark.parametrize(("tail", "message"), [
    ("a = Counter()\nb = Counter()\n", "two toolbox declarations named 'counter'"),
    ("a = Counter(stage='nope')\n", "Counter 'counter' is for stage 'nope', which is not one of the recipe's stages"),
])
def test_bad_tool_declarations_are_recipe_errors(write_recipe, tail, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        ef.load_recipe(write_recipe(STAGED + COUNTER + tail))


def test_a_stage_tool_in_a_recipe_without_stages_is_refused(write_recipe):
    with pytest.raises(RecipeError, match="the recipe declares no stages"):
        ef.load_recipe(write_recipe(BASE_RECIPE + COUNTER + "a = Counter(stage='two')\n"))


BOARD = '''
from engineflow.declare.handlers import HandlerSpec

class Shows:
    __engineflow_tool__ = True
    name, stage = "shows", None

    def attach(self, fit):
        def show(engine):
            fit.board.scalar("twice", 2.0 * engine.state.iteration, engine.state.iteration)
            fit.board.histogram("weights", fit.components["model"].weight.detach(), engine.state.iteration)
        return [HandlerSpec(show, ef.Events.ITERATION_COMPLETED, "train", 0, seq=-1, raw=True)]

shows = Shows()
'''


def test_a_tools_board_entries_reach_the_runs_tensorboard_each_iteration(write_recipe, tmp_path):
    from tests.conftest import read_tensorboard

    result = ef.run(write_recipe(BASE_RECIPE + BOARD), runs_dir=tmp_path / "runs", device="cpu", progress=False)
    events = read_tensorboard(result.run_dir / "tb")
    assert [(e.step, e.value) for e in events.Scalars("iteration/twice")] == [(i, 2.0 * i) for i in range(1, 7)]
    histograms = events.Histograms("iteration/weights")
    assert [h.step for h in histograms] == list(range(1, 7)) and histograms[-1].histogram_value.num == 8
    # a fit nothing records drops what its board is given
    fit, _, _ = ef.build(write_recipe(BASE_RECIPE + BOARD, "unrecorded.py"))
    fit.run(epochs=1)
    assert fit.board.drain() == []
