"""Several losses from one train step: each checked, averaged and logged under its own name."""

from __future__ import annotations

import math

import pytest

import engineflow as ef
from engineflow.execute.losses import LossMonitor
from engineflow.state.resume import ResumeRecord
from tests.conftest import BASE_RECIPE, read_run

TWO_LOSSES = BASE_RECIPE.replace('''    optimizer.step()
    return {"loss": loss}''', '''    optimizer.step()
    return {"g_loss": loss, "d_loss": 2 * loss.detach() + BAD.get(state.iteration, 0.0)}''').replace(
    "def train(batch, model, optimizer):", "def train(batch, model, optimizer, state):") + "\nBAD = {}\n"


def test_each_loss_is_averaged_per_epoch_under_its_own_name(write_recipe, tmp_path):
    result = ef.run(write_recipe(TWO_LOSSES), device="cpu", runs_dir=tmp_path / "runs",
                    stream=open(tmp_path / "out.txt", "w"))
    history = read_run(tmp_path / "runs")["history"]
    names = [sorted(k for k in row if k.startswith("train/") and k != "train/lr") for row in history]
    assert names == [["train/d_loss", "train/g_loss"]] * 2
    for row in history:
        assert math.isclose(row["train/d_loss"], 2 * row["train/g_loss"], rel_tol=1e-6)
    assert "train/d_loss" in result.metrics and "train/loss" not in result.metrics


def test_a_non_finite_second_loss_stops_the_run_naming_it(write_recipe, tmp_path):
    recipe = write_recipe(TWO_LOSSES.replace("BAD = {}", "BAD = {4: float('inf')}"))
    with pytest.raises(ef.NonFiniteLossError, match="the loss 'd_loss' became inf at iteration 4"):
        ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))


def test_the_state_of_single_loss_checkpoints_still_loads():
    # the checkpoint's record reads the single-loss layout (total, count) as today's
    old = {"format": 1, "engine": {"iteration": 3, "epochs_completed": 0, "batches_in_epoch": 3}, "rng": {},
           "loss": {"running": 0.5, "total": 1.5, "count": 3}}
    monitor = LossMonitor()
    monitor.load_state_dict(ResumeRecord.from_dict(old).ranks[0].loss)
    assert monitor.epoch_means() == {"train/loss": 0.5} and monitor.running == 0.5
    again = LossMonitor()
    again.load_state_dict(monitor.state_dict())
    assert again.epoch_means() == monitor.epoch_means()


# g_loss becomes NaN at iteration 5 (epoch 2's second batch) and is backpropagated: the weights are NaN after it
NAN_AT_5 = BASE_RECIPE.replace("""    optimizer.step()
    return {"loss": loss}""", """    optimizer.step()
    return {"g_loss": loss}""").replace(
    "    loss = F.cross_entropy(model(x), y)",
    '    loss = F.cross_entropy(model(x), y) * (float("nan") if state.iteration == 5 else 1.0)').replace(
    "def train(batch, model, optimizer):", "def train(batch, model, optimizer, state):") + \
    "\ncheckpoints = ef.checkpoints(every_iterations=1, keep_last=10)\n"


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_names_iteration_and_output(write_recipe, tmp_path):
    import torch

    from engineflow.state.checkpoint_files import checkpoint_files, load_state

    with pytest.raises(ef.NonFiniteLossError, match=r"the loss 'g_loss' became nan at iteration 5 \(epoch 2\)") as err:
        ef.run(write_recipe(NAN_AT_5), device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "o", "w"))
    assert "no checkpoint holds that iteration or a later one" in str(err.value)
    (folder,) = (tmp_path / "runs").glob("*/*/checkpoints/state")
    files = checkpoint_files(folder)
    assert [f.name for f in files][-1] == "state-000000004.pt"  # none from iteration 5
    weights = load_state(files[-1])["components"]["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert read_run(tmp_path / "runs")["status"] == "failed"


def test_losses_kept_on_the_device_are_read_back_in_order_and_name_the_right_iteration():
    import torch

    steps = [{"g_loss": torch.tensor(v), "d_loss": torch.tensor(2 * v)} for v in (0.5, 0.25, 1.0, 0.75, 0.125)]
    at_once, deferred = LossMonitor(), LossMonitor(read_every=4)  # the accelerator's path, run on the CPU
    for i, out in enumerate(steps, start=1):
        at_once.observe(out, epoch=1, iteration=i)
        deferred.observe(out, epoch=1, iteration=i)
        if i == 2:
            assert deferred.totals == {} and deferred._pending  # nothing read back yet
    assert deferred.state_dict() == at_once.state_dict() and deferred.last == at_once.last == 0.125
    # a NaN at iteration 6, found only when read back, at iteration 9: the error names 6
    late = LossMonitor(read_every=4)
    for i in range(6, 9):
        late.observe({"g_loss": torch.tensor(float("nan") if i == 6 else 1.0)}, epoch=2, iteration=i)
    with pytest.raises(ef.NonFiniteLossError, match=r"the loss 'g_loss' became nan at iteration 6 \(epoch 2\)"):
        late.observe({"g_loss": torch.tensor(1.0)}, epoch=2, iteration=9)
    # and a checkpoint's state reads back first: a NaN kept on the device is never saved
    saving = LossMonitor(read_every=100)
    saving.observe({"loss": torch.tensor(float("inf"))}, epoch=1, iteration=3)
    with pytest.raises(ef.NonFiniteLossError, match="became inf at iteration 3"):
        saving.state_dict()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_does_not_sync_the_host_for_its_loss_check(write_recipe):
    import torch

    recipe = write_recipe(BASE_RECIPE.replace(
        "model = torch.nn.Linear(4, 2)", "model = torch.nn.Linear(4, 2).cuda()").replace(
        "data = TensorDataset(x, y)", "x, y = x.cuda(), y.cuda()\n    data = ef.data.TensorLoader(x, y, batch_size=4)"
    ).replace('''loaders={"train": DataLoader(data, batch_size=cfg.batch_size),
                         "valid": DataLoader(data, batch_size=cfg.batch_size)}''',
              '''loaders={"train": data, "valid": data}''') + '''
@ef.on(ef.Events.ITERATION_STARTED, order=-10**6)
def strict(state):
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the step or the loss check raises

@ef.on(ef.Events.ITERATION_COMPLETED, order=10**6)
def relaxed(state):
    torch.cuda.set_sync_debug_mode("default")
''')
    fit, _, _ = ef.build(recipe)
    try:
        fit.run(epochs=2)  # 3 iterations an epoch, fewer than READ_EVERY: read back at each epoch's end
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(fit.history) == 2 and math.isfinite(fit.history[-1]["train/loss"])
