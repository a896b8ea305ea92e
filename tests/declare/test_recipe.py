"""Loading recipe files: what they declare, and clear errors when they declare it wrong."""

from __future__ import annotations

import pytest

import engineflow as ef
from tests.conftest import BASE_RECIPE


def test_collects_config_setup_steps_and_handlers(write_recipe):
    recipe = ef.load_recipe(write_recipe(BASE_RECIPE + "\n@ef.every_n_epochs(1)\ndef log(state):\n    pass\n"))
    assert recipe.name == "recipe"
    assert recipe.config.lr == 0.1
    assert set(recipe.steps) == {"train", "eval"}
    assert recipe.steps["train"].fn is recipe.module.train
    assert [h.fn.__name__ for h in recipe.handlers] == ["log"]


def test_experiment_name_can_be_set(write_recipe):
    assert ef.load_recipe(write_recipe(BASE_RECIPE + '\nexperiment = "digits-v2"\n')).name == "digits-v2"
    with pytest.raises(ef.RecipeError, match="plain name"):
        ef.load_recipe(write_recipe(BASE_RECIPE + '\nexperiment = "../up"\n'))


def test_two_train_steps_are_refused(write_recipe):
    recipe = BASE_RECIPE + "\n@ef.train_step\ndef train2(batch):\n    return {'loss': batch}\n"
    with pytest.raises(ef.RecipeError, match="two train steps, 'train' and 'train2'"):
        ef.load_recipe(write_recipe(recipe))


def test_recipe_imports_helpers_beside_it(write_recipe):
    write_recipe("SCALE = 3\n", name="helpers_for_recipe.py")
    recipe = ef.load_recipe(write_recipe("from helpers_for_recipe import SCALE\nimport engineflow as ef\n"
                                         "config = ef.config(scale=SCALE)\n"))
    assert recipe.config.scale == 3


def test_recipes_do_not_share_steps(write_recipe):
    a = ef.load_recipe(write_recipe(BASE_RECIPE, name="a.py"))
    b = ef.load_recipe(write_recipe("import engineflow as ef\n", name="b.py"))
    assert a.steps and not b.steps


def test_setup_must_return_loaders_with_train(write_recipe):
    recipe = BASE_RECIPE.replace('loaders={"train": DataLoader(data, batch_size=cfg.batch_size),',
                                 'loaders={"fit": DataLoader(data, batch_size=cfg.batch_size),')
    with pytest.raises(ef.RecipeError, match="at least a 'train' loader; got loaders fit, valid"):
        ef.build(write_recipe(recipe))


def test_setup_returning_a_non_dict(write_recipe):
    recipe = "import engineflow as ef\n\ndef setup(cfg):\n    return [1, 2]\n"
    with pytest.raises(ef.RecipeError, match=r"setup 'setup' \(.*recipe.py:3\) returned list; it must return a dict"):
        ef.build(write_recipe(recipe))


def test_default_supervised_steps_when_setup_gives_loss_fn(write_recipe):
    recipe = BASE_RECIPE.replace("@ef.train_step\n", "").replace("return dict(model=model,",
                                                                  "return dict(loss_fn=F.cross_entropy, model=model,")
    recipe = recipe.replace("def train(", "def not_a_step(")
    fit, _, _ = ef.build(write_recipe(recipe))
    fit.run(2)
    assert [row["epoch"] for row in fit.history] == [1, 2]
    assert "train/loss" in fit.history[0] and "valid/accuracy" in fit.history[0]


def test_validation_runs_before_user_handlers(write_recipe):
    recipe = BASE_RECIPE + '''
seen = []
@ef.on(ef.Events.EPOCH_COMPLETED)
def look(metrics, history):
    seen.append((sorted(metrics), len(history)))
'''
    loaded = ef.load_recipe(write_recipe(recipe))
    fit, _, _ = ef.build(loaded)
    fit.run(1)
    assert loaded.module.seen == [(["train/loss", "train/lr", "valid/accuracy"], 1)]


def test_eval_every_n_epochs(write_recipe):
    recipe = BASE_RECIPE.replace("@ef.eval_step(metrics={\"accuracy\": ef.metrics.Accuracy()})",
                                 "@ef.eval_step(metrics={\"accuracy\": ef.metrics.Accuracy()}, every=2)")
    fit, _, _ = ef.build(write_recipe(recipe))
    fit.run(4)
    assert ["valid/accuracy" in row for row in fit.history] == [False, True, False, True]
