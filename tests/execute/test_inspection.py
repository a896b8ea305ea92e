"""Seeing the model: the parameter summary a run starts with, the gradients' norm by iteration, and
TensorBoard's hparams with the best epoch's main metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_run, read_tensorboard
from tests.recipes import IMPORTS, classifier_steps

# A model with a frozen bias, a nested config group and a list value; a handler of the recipe takes the
# gradients' norm by hand after each step and keeps it in the run folder.
RECIPE = IMPORTS + '''
config = ef.config(epochs=2, lr=0.1, batch_size=4, seed=0, optim={"momentum": 0.5, "nesterov": False},
                   widths=[3, 2], name="tiny")

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    data = TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.optim.momentum)
    return dict(model=model, optimizer=optimizer, norms=[],
                loaders={"train": DataLoader(data, batch_size=cfg.batch_size, shuffle=True),
                         "valid": DataLoader(data, batch_size=cfg.batch_size)})

@ef.on(ef.Events.ITERATION_COMPLETED)
def by_hand(model, norms):
    squares = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None)
    norms.append(squares ** 0.5)

@ef.on(ef.Events.COMPLETED)
def keep(norms, run):
    (run.run_dir / "norms.json").write_text(json.dumps(norms))

import json
''' + classifier_steps()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from tests.conftest import invoke_cli

    folder = tmp_path_factory.mktemp("inspection")
    (folder / "recipe.py").write_text(RECIPE)
    result = invoke_cli(["run", str(folder / "recipe.py"), "--runs-dir", str(folder / "runs"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return folder / "runs", result.output


def test_the_run_starts_with_a_summary_of_the_models_parameters(recorded, cli):
    runs, output = recorded
    # Linear(4, 3): 12 weights and 3 biases (frozen); Linear(3, 2): 6 + 2
    assert output.splitlines()[1] == "model: Sequential, 23 parameters (20 trainable): 0 Linear 15 (12 trainable), " \
                                     "2 Linear 8"
    record = read_run(runs)
    assert record["model"]["parameters"] == 23 and record["model"]["trainable"] == 20
    (model,) = record["model"]["modules"]
    assert (model["name"], model["type"]) == ("model", "Sequential")
    assert [(c["name"], c["type"], c["parameters"], c["trainable"]) for c in model["children"]] == [
        ("0", "Linear", 15, 12), ("1", "ReLU", 0, 0), ("2", "Linear", 8, 8)]
    shown = cli("runs", "show", record["id"], "--runs-dir", str(runs), "--json")
    assert json.loads(shown.stdout)["model"] == record["model"]


def test_tensorboard_has_the_gradients_norm_of_each_iteration(recorded):
    runs, _ = recorded
    run_dir = Path(read_run(runs)["run_dir"])
    by_hand = json.loads((run_dir / "norms.json").read_text())
    events = read_tensorboard(run_dir / "tb")
    shown = events.Scalars("iteration/train/grad_norm")
    assert [e.step for e in shown] == list(range(1, 7))
    assert [e.value for e in shown] == pytest.approx(by_hand, rel=1e-6)
    assert len(set(by_hand)) == 6  # each iteration's own


def test_tensorboards_hparams_hold_the_config_and_the_best_epochs_main_metric(recorded):
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs, _ = recorded
    record = read_run(runs)
    events = read_tensorboard(Path(record["run_dir"]) / "tb" / "hparams")
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert set(hparams) == {"epochs", "lr", "batch_size", "seed", "optim.momentum", "optim.nesterov", "widths", "name"}
    assert hparams["optim.momentum"].number_value == 0.5 and hparams["optim.nesterov"].bool_value is False
    assert hparams["widths"].string_value == "[3, 2]" and hparams["name"].string_value == "tiny"
    best = events.Scalars("hparam/best/valid/accuracy")
    assert record["best"]["metric"] == "valid/accuracy"
    assert [e.value for e in best] == [pytest.approx(record["best"]["value"])]
    assert [e.value for e in events.Scalars("hparam/train/lr")] == [pytest.approx(0.1)]


def test_a_model_summary_counts_shared_parameters_once():
    from engineflow.execute.inspection import model_summary

    encoder = torch.nn.Linear(4, 3)
    shared = {"encoder": encoder, "models": {"a": torch.nn.Sequential(encoder), "b": torch.nn.Linear(3, 1)}}
    summary = model_summary(shared)
    assert [(m["name"], m["parameters"]) for m in summary["modules"]] == [("encoder", 15), ("models.a", 15),
                                                                          ("models.b", 4)]
    assert summary["parameters"] == summary["trainable"] == 19
