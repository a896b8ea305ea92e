"""Step decorators: functions stay callable as written; one engine iteration gives the same result."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import engineflow as ef
from engineflow.declare.steps import step_spec
from engineflow.execute.engine import make_engine
from tests.conftest import BASE_RECIPE, tiny_data


def _train(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "logits": model(x).detach()}


def test_decorator_returns_the_same_function():
    def step(batch):
        return {"loss": batch}

    def evaluate(batch):
        return {"y_pred": batch}

    assert ef.train_step(step) is step
    assert ef.eval_step(metrics={"acc": ef.metrics.Accuracy()})(evaluate) is evaluate
    assert step_spec(step).kind == "train" and step_spec(evaluate).kind == "eval"
    assert step(2) == {"loss": 2} and evaluate(3) == {"y_pred": 3}


def test_one_function_cannot_have_two_roles():
    def step(batch):
        return {"loss": batch}

    ef.train_step(step)
    with pytest.raises(ef.RecipeError, match="already the train step"):
        ef.eval_step(step)


def test_direct_call_equals_one_engine_iteration():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    batch = tiny_data(8)
    step = ef.train_step(_train)

    direct = step(batch, model=model, optimizer=opt)
    engine = make_engine(step_spec(step), {"model": twin, "optimizer": twin_opt})
    state = engine.run([batch], max_epochs=1)

    assert state.output.keys() == direct.keys()
    for key in direct:
        assert torch.equal(state.output[key], direct[key]), key
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tensor_output_becomes_loss_dict():
    step = ef.train_step(lambda batch: batch.sum())
    state = make_engine(step_spec(step), {}).run([torch.ones(3)], max_epochs=1)
    assert set(state.output) == {"loss"}
    assert state.output["loss"].item() == 3.0


@pytest.mark.parametrize("bad", [1.5, [1, 2], None, "loss"])
def test_output_that_is_neither_dict_nor_tensor_is_a_recipe_error(bad):
    def step(batch):
        return bad

    engine = make_engine(step_spec(ef.train_step(step)), {})
    with pytest.raises(ef.RecipeError, match=r"returned .*must return a dict"):
        engine.run([0], max_epochs=1)


def test_eval_step_runs_without_grad_and_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.5))
    seen = {}

    def evaluate(batch, model):
        seen["grad"] = torch.is_grad_enabled()
        seen["training"] = model.training
        return {"y_pred": model(batch)}

    make_engine(step_spec(ef.eval_step(evaluate)), {"model": model}).run([torch.ones(2, 4)], max_epochs=1)
    assert seen == {"grad": False, "training": False}
    assert model.training, "train mode is restored after the eval run"


def test_infer_step_gets_input_by_first_parameter():
    def predict(x, model):
        return model(x).argmax(-1)

    model = torch.nn.Linear(4, 3)
    state = make_engine(step_spec(ef.infer_step(predict)), {"model": model}).run([torch.ones(5, 4)], max_epochs=1)
    assert state.output.shape == (5,)


def test_missing_component_lists_what_is_available():
    def step(batch, model, scheduler):
        return {"loss": batch}

    with pytest.raises(ef.RecipeError) as err:
        make_engine(step_spec(ef.train_step(step)), {"model": 1, "optimizer": 2})
    message = str(err.value)
    assert "'scheduler'" in message and "step" in message
    assert "model, optimizer" in message and "batch" in message


def test_supervised_default_step_pieces_are_replaceable():
    calls = []

    def forward(model, x):
        calls.append("forward")
        return model(x)

    step = ef.supervised_train_step(forward=forward)
    model = torch.nn.Linear(4, 2)
    out = step(tiny_data(6), model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    assert calls == ["forward"]
    assert out["y_pred"].shape == (6, 2) and out["loss"].ndim == 0
    assert all(p.grad is None for p in model.parameters()), "the default update zeroes gradients"


WRAPPED_RECIPE = BASE_RECIPE + '''
import functools

CALLS = {"wrapper": 0, "inner": 0, "handler_wrapper": 0}


def counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS["wrapper"] += 1
        return fn(*args, **kwargs)
    return wrapper


def counted_handler(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS["handler_wrapper"] += 1
        return fn(*args, **kwargs)
    return wrapper


@counted
@ef.train_step
def train(batch, model, optimizer):
    CALLS["inner"] += 1
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@counted_handler
@ef.every_n_epochs(1)
def each_epoch(state):
    pass
'''


def test_a_step_wrapped_after_decoration_runs_through_its_wrapper(write_recipe):
    # functools.wraps copies engineflow's marker onto the wrapper; the wrapper is what must run.
    recipe = ef.load_recipe(write_recipe(_without_base_train(WRAPPED_RECIPE)))
    fit, _, _ = ef.build(recipe)
    fit.run(epochs=2)
    calls = recipe.module.CALLS
    assert calls["wrapper"] == calls["inner"] == 6, calls  # 3 batches x 2 epochs, each through the wrapper
    assert calls["handler_wrapper"] == 2


def test_a_wrapper_and_its_inner_step_both_at_top_level_are_one_step(write_recipe):
    source = _without_base_train(WRAPPED_RECIPE).replace("@counted\n@ef.train_step\ndef train(",
                                                         "@ef.train_step\ndef inner(")
    source += "\ntrain = counted(inner)\n"
    recipe = ef.load_recipe(write_recipe(source))
    assert recipe.steps["train"].fn is recipe.module.train


def _without_base_train(source: str) -> str:
    """BASE_RECIPE's own train step removed, so the recipe's wrapped one is its only train step."""
    start = source.index("@ef.train_step\ndef train(batch, model, optimizer):")
    end = source.index("@ef.eval_step", start)
    return source[:start] + source[end:]
