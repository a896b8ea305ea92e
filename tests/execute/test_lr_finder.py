"""The LR sweep: every state it touches is put back, it stops when the loss diverges, it sweeps every
param group exponentially, and it runs a stage's own step after that stage's prepare."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

import engineflow as ef
from tests.recipes import IMPORTS, classifier_steps

# momentum and dropout: the optimizer has state and the step draws from the RNG; shuffled: the loader's generator
STATEFUL = IMPORTS + '''
config = ef.config(epochs=1, lr=0.1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 2, (12,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": cfg.lr / 4}]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    return dict(model=model, optimizer=optimizer, loaders={"train": loader, "valid": loader})
''' + classifier_steps()


def _state(fit):
    """Everything the sweep must leave as it was, copied."""
    model, optimizer = fit.components["model"], fit.components["optimizer"]
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "training": [m.training for m in model.modules()], "python": random.getstate(),
            "numpy": np.random.get_state()[1].copy(), "torch": torch.get_rng_state(),
            "loader": fit.loaders["train"].generator.get_state()}


def _assert_same(before, after):
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
    for key, state in before["optimizer"]["state"].items():
        assert all(torch.equal(value, after["optimizer"]["state"][key][name]) for name, value in state.items())
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before["grads"], after["grads"],
                                                                              strict=True))
    assert before["training"] == after["training"]
    assert before["python"] == after["python"]
    assert np.array_equal(before["numpy"], after["numpy"])
    assert torch.equal(before["torch"], after["torch"])
    assert torch.equal(before["loader"], after["loader"])


def test_a_sweep_leaves_every_state_as_it_was_and_training_goes_on_as_without_it(write_recipe):
    path = write_recipe(STATEFUL)
    fit, _, _ = ef.build(path)
    fit.run(epochs=1)  # momentum buffers, gradients and advanced RNGs: a state that is not the initial one
    before = _state(fit)
    sweep = ef.lr_find(fit, start=1e-3, end=1.0, iterations=6)
    assert len(sweep.lrs) == 6, "the sweep ran its steps"
    _assert_same(before, _state(fit))
    fit.run(epochs=2)

    untouched, _, _ = ef.build(path)
    untouched.run(epochs=1)
    untouched.run(epochs=2)
    for a, b in zip(fit.components["model"].parameters(), untouched.components["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_sweep_from_a_recipe_leaves_the_process_rngs_as_they_were(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sweep = ef.lr_find(write_recipe(STATEFUL), iterations=4)
    assert torch.equal(before, torch.get_rng_state())
    assert len(sweep.lrs) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.py"], "nothing recorded: no runs folder"


# the loss is a function of the learning rate the step runs with: a loss curve chosen by the test
SCRIPTED = IMPORTS + '''
config = ef.config(epochs=1, seed=0, curve="flat")

def setup(cfg):
    model = torch.nn.Linear(2, 1)
    groups = [{"params": [model.weight], "lr": 0.5}, {"params": [model.bias], "lr": 0.05}]
    seen = []
    return dict(model=model, optimizer=torch.optim.SGD(groups), seen=seen,
                loaders={"train": DataLoader(TensorDataset(torch.ones(6, 2)), batch_size=2)})

@ef.train_step
def train(batch, model, optimizer, seen, cfg):
    lrs = [group["lr"] for group in optimizer.param_groups]
    seen.append(lrs)
    lr = lrs[0]
    loss = {"flat": 1.0, "jump": 1.0 if lr < 1e-2 else 100.0, "nan": 1.0 if lr < 1e-2 else float("nan")}[cfg.curve]
    return {"loss": torch.tensor(loss)}
'''


def test_every_param_group_sweeps_exponentially_keeping_its_ratio(write_recipe):
    fit, _, _ = ef.build(write_recipe(SCRIPTED))
    sweep = ef.lr_find(fit, start=1e-4, end=1.0, iterations=9)  # 3 epochs of the 3-batch loader
    assert not sweep.diverged and len(sweep.lrs) == 9
    assert sweep.lrs == pytest.approx([10 ** (-4 + i / 2) for i in range(9)])
    seen = fit.components["seen"]
    assert [lrs[0] for lrs in seen] == pytest.approx(sweep.lrs)
    assert all(lrs[1] == pytest.approx(lrs[0] / 10) for lrs in seen), "the bias group keeps a tenth of the lr"
    assert [g["lr"] for g in fit.components["optimizer"].param_groups] == [0.5, 0.05]


def test_the_sweep_stops_at_the_first_smoothed_loss_past_four_times_its_best(write_recipe):
    fit, _, _ = ef.build(write_recipe(SCRIPTED), {"curve": "jump"})
    sweep = ef.lr_find(fit, start=1e-4, end=1.0, iterations=100)
    assert sweep.diverged and len(sweep.lrs) < 100
    best = min(sweep.losses)
    assert sweep.losses[-1] > 4 * best and all(loss <= 4 * best for loss in sweep.losses[:-1])
    assert sweep.lrs[-1] >= 1e-2 > sweep.lrs[-2] / 2, "it stopped a few steps after the loss jumped"
    assert "4 x its best" in sweep.stopped


def test_a_loss_that_is_not_finite_stops_the_sweep(write_recipe):
    fit, _, _ = ef.build(write_recipe(SCRIPTED), {"curve": "nan"})
    sweep = ef.lr_find(fit, start=1e-4, end=1.0, iterations=100)
    assert sweep.diverged and "nan" in sweep.stopped
    assert all(lr < 1e-2 for lr in sweep.lrs) and all(math.isfinite(loss) for loss in sweep.losses)
    assert len(fit.components["seen"]) == len(sweep.lrs) + 1, "no step after the first NaN"


def test_a_recipe_that_diverges_stops_early(write_recipe):
    # plain SGD on a regression with large inputs: the loss explodes once the lr passes ~1e-2
    recipe = IMPORTS + '''
config = ef.config(epochs=1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x = 10 * torch.randn(32, 4, generator=gen)
    y = x.sum(1, keepdim=True)
    model = torch.nn.Linear(4, 1)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                loaders={"train": DataLoader(TensorDataset(x, y), batch_size=8)})

@ef.train_step
def train(batch, model, optimizer):
    x, y = batch
    loss = F.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
'''
    sweep = ef.lr_find(write_recipe(recipe), start=1e-6, end=10.0, iterations=100)
    assert sweep.diverged and len(sweep.lrs) < 100
    assert sweep.lrs[-1] < 1.0
    assert 1e-6 <= sweep.suggestions["valley"] < sweep.lrs[-1]


STAGED = IMPORTS + '''
config = ef.config(seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)
    model = torch.nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loaders={"train": loader, "valid": loader, "test": loader})

def new_head(model):
    head = torch.nn.Linear(3, 2)
    return {"head": head, "optimizer": torch.optim.SGD(head.parameters(), lr=0.02)}

@ef.train_step
def pretrain(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    return {"loss": loss}

@ef.train_step
def finetune(batch, model, head, optimizer):
    x, _ = batch
    loss = (head(model(x)) * 0).sum() + 7.0   # 7, whatever the weights: this step's mark
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    return {"loss": loss}

@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}

stages = [ef.stage("pretrain", train=pretrain, eval=evaluate, epochs=1),
          ef.stage("finetune", train=finetune, epochs=1, prepare=new_head),
          ef.stage("test", eval=evaluate)]
'''


def test_lr_find_on_a_stage_runs_its_step_after_its_prepare(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(write_recipe(STAGED))
    result = cli("lr-find", path, "--stage", "finetune", "--iterations", "5", "--json")
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert sweep["stage"] == "finetune" and sweep["raw_losses"] == [7.0] * 5
    first = cli("lr-find", path, "--iterations", "5", "--json")  # default: the first train stage
    assert json.loads(first.stdout)["stage"] == "pretrain"
    assert 7.0 not in json.loads(first.stdout)["raw_losses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.py"], "nothing recorded: no runs folder"


@pytest.mark.parametrize(("args", "says"), [
    (["--stage", "test"], "test pass"),
    (["--stage", "nope"], "no stage named 'nope'"),
])
def test_lr_find_refuses_a_stage_it_cannot_sweep(cli, write_recipe, args, says):
    result = cli("lr-find", str(write_recipe(STAGED)), *args)
    assert result.exit_code == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_step_that_raises_mid_sweep_still_leaves_the_state_as_it_was(write_recipe):
    boom = SCRIPTED.replace('"nan": 1.0', '"boom": 1.0 if lr < 1e-2 else 1 / 0, "nan": 1.0')
    fit, _, _ = ef.build(write_recipe(boom), {"curve": "boom"})
    weight = fit.components["model"].weight.clone()
    with pytest.raises(ZeroDivisionError):
        ef.lr_find(fit, start=1e-4, end=1.0, iterations=20)
    assert len(fit.components["seen"]) > 1, "the sweep had started"
    assert [g["lr"] for g in fit.components["optimizer"].param_groups] == [0.5, 0.05]
    assert torch.equal(weight, fit.components["model"].weight)
