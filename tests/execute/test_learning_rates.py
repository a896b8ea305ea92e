"""Schedules engineflow steps (ef.schedule) and the learning rates each fit shows."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ignite.handlers.param_scheduler import LinearCyclicalScheduler

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.record.store import RunStore
from tests.conftest import read_run, read_tensorboard
from tests.recipes import IMPORTS, accumulating_step, classifier_steps

# 10 samples, batches of 4: 3 iterations an epoch. SCHEDULE is setup()'s extra components; LR records the lr
# each iteration starts with (after an Ignite scheduler set it, before the step) in the component lrs.
HEAD = IMPORTS + '''
from torch.optim import lr_scheduler
from ignite.handlers import param_scheduler

config = ef.config(epochs=2, lr=0.1, batch_size=4, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    data = TensorDataset(x, y)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return dict(model=model, optimizer=optimizer, lrs=[], SCHEDULE
                loaders={"train": DataLoader(data, batch_size=cfg.batch_size, shuffle=True),
                         "valid": DataLoader(data, batch_size=cfg.batch_size)})

@ef.on(ef.Events.ITERATION_STARTED)
def note_lr(optimizer, lrs):
    lrs.append(optimizer.param_groups[0]["lr"])
'''
STEPS = classifier_steps()
RECIPE = HEAD + STEPS
EVAL_STEP = STEPS[STEPS.index("@ef.eval_step"):]


def recipe_with(write_recipe, schedule: str, tail: str = "", name: str = "recipe.py"):
    return write_recipe(RECIPE.replace("SCHEDULE", schedule) + tail, name)


def by_hand(make, steps: int) -> list[float]:
    """The lr a fresh SGD(lr=0.1) holds before each of ``steps`` hand-made steps of ``make(optimizer)``."""
    optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    scheduler, seen = make(optimizer), []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_an_epoch_schedule_steps_after_each_epoch(write_recipe):
    fit, _, _ = ef.build(recipe_with(write_recipe, 'scheduler=ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.5), '
                                                   'every="epoch"),'))
    fit.run(epochs=3)
    # the lr the epoch trained with is the one it ends with: an epoch schedule steps after it
    expected = by_hand(lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5), 4)
    assert [row["train/lr"] for row in fit.history] == expected[:3]
    assert fit.components["optimizer"].param_groups[0]["lr"] == expected[3]


def test_an_iteration_schedule_steps_after_each_iteration(write_recipe):
    path = recipe_with(write_recipe, 'scheduler=ef.schedule(lr_scheduler.CosineAnnealingLR(optimizer, T_max=6), '
                                     'every="iteration"),')
    fit, _, _ = ef.build(path)
    fit.run(epochs=2)
    expected = by_hand(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6), 7)
    assert fit.components["lrs"] == expected[:6]
    assert [row["train/lr"] for row in fit.history] == [expected[3], expected[6]]  # each epoch's end


def test_a_plain_scheduler_is_kept_but_not_stepped(write_recipe):
    fit, _, _ = ef.build(recipe_with(write_recipe, 'scheduler=lr_scheduler.StepLR(optimizer, 1, 0.5),'))
    fit.run(epochs=2)
    assert [row["train/lr"] for row in fit.history] == [0.1, 0.1]
    assert "scheduler" in fit.state_dict()["components"]


def test_warm_up_rises_linearly_then_hands_over_to_the_scheduler(write_recipe):
    path = recipe_with(write_recipe, 'scheduler=ef.schedule(lr_scheduler.StepLR(optimizer, 2, 0.5), '
                                     'every="iteration", warmup=3, warmup_start=0.1),')
    fit, _, _ = ef.build(path)
    fit.run(epochs=3)

    def torchs_own(optimizer):  # torch's warm-up: LinearLR, then the scheduler, in a SequentialLR
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        main = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[3])

    lrs = fit.components["lrs"]
    assert lrs == pytest.approx(by_hand(torchs_own, 9), rel=1e-12)
    assert lrs == pytest.approx([0.01, 0.04, 0.07, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


SCRIPTED = '''
SCRIPT = [0.5, 0.6, None, 0.6, 0.6, 0.6]  # the main metric of each epoch; None: the epoch has none

@ef.on(ef.Events.EPOCH_COMPLETED, order=-150)  # after validation, before history and the schedules
def scripted(state, metrics):
    value = SCRIPT[state.epoch - 1]
    if value is None:
        del metrics["valid/accuracy"]
    else:
        metrics["valid/accuracy"] = value
'''


def test_a_plateau_schedule_reads_the_main_metric_and_skips_an_epoch_without_it(write_recipe):
    path = recipe_with(write_recipe, 'scheduler=ef.schedule(lr_scheduler.ReduceLROnPlateau(optimizer, "max", '
                                     'factor=0.5, patience=1), every="epoch"),', SCRIPTED)
    fit, _, _ = ef.build(path)
    fit.run(epochs=6)
    optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    plateau, expected = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", factor=0.5, patience=1), []
    for value in (0.5, 0.6, None, 0.6, 0.6, 0.6):
        expected.append(optimizer.param_groups[0]["lr"])
        if value is not None:
            plateau.step(value)
    assert [row["train/lr"] for row in fit.history] == expected == [0.1, 0.1, 0.1, 0.1, 0.1, 0.05]
    assert fit.components["optimizer"].param_groups[0]["lr"] == 0.05


def test_a_plateau_schedule_against_the_main_metrics_mode_is_refused(write_recipe):
    path = recipe_with(write_recipe, 'scheduler=ef.schedule(lr_scheduler.ReduceLROnPlateau(optimizer), '
                                     'every="epoch"),')
    with pytest.raises(RecipeError, match=r"main metric valid/accuracy, which is better when higher: pass mode='max'"):
        ef.build(path)


@pytest.mark.parametrize(("scheduler", "message"), [
    ("optimizer", "takes a torch LR scheduler .* got SGD"),
    ("lr_scheduler.StepLR(optimizer, 1), every='often'", "every is 'iteration' or 'epoch'"),
    ("lr_scheduler.ReduceLROnPlateau(optimizer), every='iteration'", "use every='epoch'"),
    ("param_scheduler.LinearCyclicalScheduler(optimizer, 'lr', 0.1, 0.5, 4), every='iteration', warmup=2",
     "create_lr_scheduler_with_warmup"),
])
def test_a_bad_schedule_is_one_line_naming_the_fix(write_recipe, scheduler, message):
    every = "" if "every" in scheduler else ", every='epoch'"
    path = recipe_with(write_recipe, f"scheduler=ef.schedule({scheduler}{every}),")
    with pytest.raises(RecipeError, match=message):
        ef.build(path)


def test_an_ignite_parameter_scheduler_sets_the_lr_as_each_iteration_starts(write_recipe):
    path = recipe_with(write_recipe, 'scheduler=ef.schedule(param_scheduler.LinearCyclicalScheduler(optimizer, "lr", '
                                     '0.1, 0.5, cycle_size=4), every="iteration"),')
    fit, _, _ = ef.build(path)
    fit.run(epochs=2)
    ignites_own = LinearCyclicalScheduler.simulate_values(num_events=6, param_name="lr", start_value=0.1,
                                                          end_value=0.5, cycle_size=4)
    assert fit.components["lrs"] == [value for _, value in ignites_own]


# Gradients accumulated over 2 batches: of each epoch's 3 batches the 2nd and the 3rd (the epoch's last)
# step the optimizer; an iteration schedule moves only with it.
ACCUMULATED = accumulating_step(2)


def test_an_iteration_schedule_steps_only_when_the_optimizers_stepped(write_recipe):
    head = HEAD.replace("SCHEDULE", 'scheduler=ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.5), every="iteration"),')
    fit, _, _ = ef.build(write_recipe(head + EVAL_STEP + ACCUMULATED))
    fit.run(epochs=2)
    # the lr each of the 6 iterations starts with: halved after iterations 2, 3, 5 (and 6)
    assert fit.components["lrs"] == [0.1, 0.1, 0.05, 0.025, 0.025, 0.0125]


@pytest.mark.parametrize("schedule", [
    'ef.schedule(lr_scheduler.CosineAnnealingLR(optimizer, T_max=9), every="iteration", warmup=4)',
    'ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.5), every="epoch", warmup=1)',
    'ef.schedule(param_scheduler.LinearCyclicalScheduler(optimizer, "lr", 0.1, 0.5, 4), every="iteration")',
    'ef.schedule(param_scheduler.CosineAnnealingScheduler(optimizer, "lr", 0.1, 0.5, 2), every="epoch")',
])
def test_a_state_taken_mid_epoch_resumes_to_the_same_lr_and_weights(write_recipe, schedule):
    path = recipe_with(write_recipe, f"scheduler={schedule},")
    unbroken, _, _ = ef.build(path)
    saved = {}
    ef.on(ef.Events.ITERATION_COMPLETED(once=5), lambda: saved.update(state=copy.deepcopy(unbroken.state_dict())),
          engine=unbroken.train)
    unbroken.run(epochs=3)
    resumed, _, _ = ef.build(path)
    resumed.load_state_dict(saved["state"])
    resumed.run(epochs=3)
    assert resumed.components["lrs"] == unbroken.components["lrs"][5:]  # iterations 6 to 9
    assert resumed.history == unbroken.history
    for name in ("model", "optimizer", "scheduler"):
        assert_equal(resumed.components[name].state_dict(), unbroken.components[name].state_dict())


def assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal(x, y)
    else:
        assert a == b


GROUPS = HEAD.replace("optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)", """optimizer = torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.01}], lr=cfg.lr)
    extra = torch.nn.Linear(4, 2)
    extra_opt = torch.optim.Adam(extra.parameters(), lr=0.5)""").replace("SCHEDULE", """extra=extra,
                extra_opt=extra_opt, extra_schedule=ef.schedule(lr_scheduler.StepLR(extra_opt, 1, 0.5), every="epoch"),
                scheduler=ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.5), every="iteration"),""") + STEPS + """
@ef.on(ef.Events.ITERATION_COMPLETED)
def step_extra(extra_opt):
    extra_opt.step()  # it has no gradients: its parameters stay, but torch sees it step before its scheduler
"""


def test_each_param_groups_lr_is_in_the_history_the_index_and_tensorboard(write_recipe, tmp_path):
    result = ef.run(write_recipe(GROUPS), runs_dir=tmp_path / "runs", device="cpu", progress=False)
    names = ["train/lr", "train/lr.1", "train/extra_opt/lr"]
    expected = [{"train/lr": 0.1 * 0.5 ** (3 * e), "train/lr.1": 0.01 * 0.5 ** (3 * e),
                 "train/extra_opt/lr": 0.5 ** e} for e in (1, 2)]
    # halving is exact in binary floating point
    assert [{k: row[k] for k in names} for row in result.history] == expected
    record = read_run(tmp_path / "runs")  # metrics.jsonl and run.json
    assert [{k: row[k] for k in names} for row in record["history"]] == expected
    assert record["metrics"]["train/lr.1"] == pytest.approx(0.01 * 0.5 ** 6)
    with RunStore.open(tmp_path / "runs") as store:
        assert store.get_run(result.run_id)["metrics"]["train/extra_opt/lr"] == 0.25
    events = read_tensorboard(result.run_dir / "tb")
    assert [(e.step, e.value) for e in events.Scalars("train/lr.1")] == [
        (1, pytest.approx(0.01 * 0.5 ** 3)), (2, pytest.approx(0.01 * 0.5 ** 6))]
    # by iteration: the lr each step used (the scheduler steps after it)
    assert [(e.step, e.value) for e in events.Scalars("iteration/train/lr")] == [
        (i, pytest.approx(0.1 * 0.5 ** (i - 1))) for i in range(1, 7)]
    # a learning rate that holds is written where it changes (and the iteration before) and at each epoch's end:
    # the same line as a point each iteration
    assert [(e.step, e.value) for e in events.Scalars("iteration/train/extra_opt/lr")] == [
        (1, 0.5), (3, 0.5), (4, 0.25), (6, 0.25)]


def test_the_readmes_schedule_example_warms_up_then_anneals(write_recipe):
    from tests.test_readme import python_block_after

    example = python_block_after("<!-- schedules -->")
    recipe = IMPORTS + '''
from torch import nn

def make_loaders(cfg):
    data = TensorDataset(torch.randn(40, 64, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 10)
    return {"train": DataLoader(data, batch_size=10), "valid": DataLoader(data, batch_size=20)}
''' + example.replace("epochs=10", "epochs=3").replace("warmup=20", "warmup=4") + STEPS
    fit, _, _ = ef.build(write_recipe(recipe))
    fit.run(epochs=3)
    # 12 iterations: 4 of warm-up from 0.01 to 0.1, then 8 of the cosine, which ends at 0
    assert [row["train/lr"] for row in fit.history] == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 2)) / 2, 0])


STAGED = RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(").replace(
    "SCHEDULE", 'scheduler=ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.5), every="epoch"),') + '''
def new_optimizer(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return {"optimizer": optimizer,
            "scheduler": ef.schedule(lr_scheduler.StepLR(optimizer, 1, 0.1), every="epoch", warmup=1)}

stages = [ef.stage("first", train=train, eval=evaluate, epochs=2),
          ef.stage("second", train=train, eval=evaluate, epochs=3, prepare=new_optimizer)]
'''


def test_a_stages_prepare_returns_a_new_schedule_for_its_new_optimizer(write_recipe):
    pipeline, _, _ = ef.build(write_recipe(STAGED))
    first_optimizer = pipeline.fit.components["optimizer"]
    pipeline.run()
    history = pipeline.history()
    assert [row.get("first/train/lr") for row in history[:2]] == [0.1, 0.05]
    assert [row["second/train/lr"] for row in history[2:]] == pytest.approx([0.1, 1.0, 0.1])  # warm-up, then 0.1x
    assert first_optimizer.param_groups[0]["lr"] == 0.025  # the first stage's schedule stopped with its stage
