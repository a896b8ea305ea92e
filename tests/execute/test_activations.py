"""ef.hooks: activation statistics against a hand computation, read back every N iterations, and
hooks that are gone when the fit ends, also when it fails."""

from __future__ import annotations

import json

import pytest
import torch

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.execute.forward_hooks import select_layers
from tests.conftest import BASE_RECIPE, read_tensorboard
from tests.recipes import IMPORTS

# Linear(4, 2) then ReLU; 10 samples in batches of 4: 3 iterations an epoch, 2 epochs.
RELU_RECIPE = BASE_RECIPE.replace("model = torch.nn.Linear(4, 2)",
                                  "model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())")

# The layers' outputs computed by hand (no module call, so no hook runs), saved with the run; and how
# many hooks are on the Linear at each iteration, seen by a recipe handler inside the iteration.
BY_HAND = '''
SEEN = {"outputs": [], "hooks": []}

@ef.on(ef.Events.ITERATION_STARTED)
def by_hand(batch, model):
    with torch.no_grad():
        linear = F.linear(batch[0], model[0].weight, model[0].bias)
    SEEN["outputs"].append({"0": linear, "1": linear.relu()})
    SEEN["hooks"].append(len(model[0]._forward_hooks))

@ef.on(ef.Events.COMPLETED)
def save(run):
    torch.save(SEEN, run.run_dir / "by_hand.pt")
'''


def expected(outputs: list[torch.Tensor], bins: int, low: float, high: float) -> dict:
    values = torch.cat([o.reshape(-1) for o in outputs]).double()
    return {"count": values.numel(), "mean": values.mean().item(), "std": values.std(correction=0).item(),
            "near_zero": (values.abs() < 1e-3).double().mean().item(),
            "histogram": torch.histc(values.clamp(low, high), bins, low, high).long().tolist()}


def run_recipe(write_recipe, tmp_path, tail: str):
    result = ef.run(write_recipe(RELU_RECIPE + BY_HAND + tail), runs_dir=tmp_path / "runs", device="cpu",
                    progress=False)
    lines = [json.loads(line) for line in (result.run_dir / "activations.jsonl").read_text().splitlines()]
    return result, lines, torch.load(result.run_dir / "by_hand.pt")


def test_the_statistics_are_those_of_the_window_computed_by_hand(write_recipe, tmp_path):
    tail = "stats = ef.hooks.activation_stats(every=2, window=2, bins=4, range=(-1.0, 1.0))\n"
    _, lines, seen = run_recipe(write_recipe, tmp_path, tail)
    assert [(line["iteration"], line["layer"]) for line in lines] == [(i, layer) for i in (2, 4, 6) for layer in "01"]
    for line in lines:
        i = line["iteration"]
        want = expected([seen["outputs"][k][line["layer"]] for k in (i - 2, i - 1)], 4, -1.0, 1.0)
        assert line["count"] == want["count"] and line["histogram"] == want["histogram"], line
        assert line["near_zero"] == pytest.approx(want["near_zero"]), line
        assert line["mean"] == pytest.approx(want["mean"], abs=1e-6), line
        assert line["std"] == pytest.approx(want["std"], abs=1e-6), line
        assert line["stage"] == "fit" and line["range"] == [-1.0, 1.0]
    # the ReLU's zeros are its near-zero share; validation (in eval mode, same data) is not counted
    assert any(line["near_zero"] > 0 for line in lines if line["layer"] == "1")
    assert sum(line["count"] for line in lines if line["layer"] == "0") == 10 * 2 * 2  # 2 epochs of 10 samples
    assert seen["hooks"] == [1] * 6  # a window of every iteration: hooked in each


def test_statistics_are_read_back_every_n_iterations_alone(write_recipe, tmp_path):
    result, lines, seen = run_recipe(write_recipe, tmp_path, "stats = ef.hooks.activation_stats(every=3)\n")
    # the default window is the read-back's own iteration: the third of each epoch, 2 samples
    assert [(line["iteration"], line["layer"], line["count"]) for line in lines] == [(3, "0", 4), (3, "1", 4),
                                                                                    (6, "0", 4), (6, "1", 4)]
    want = expected([seen["outputs"][5]["1"]], 50, -5.0, 5.0)
    assert lines[-1]["histogram"] == want["histogram"] and lines[-1]["mean"] == pytest.approx(want["mean"], abs=1e-6)
    assert seen["hooks"] == [0, 0, 1, 0, 0, 1]  # the hooks are on only in the iterations that count
    events = read_tensorboard(result.run_dir / "tb")
    for layer in "01":
        for key in ("mean", "std", "near_zero"):
            assert [e.step for e in events.Scalars(f"iteration/activations/{layer}/{key}")] == [3, 6]
        histograms = events.Histograms(f"iteration/activations/{layer}")
        assert [(h.step, h.histogram_value.num) for h in histograms] == [(3, 4), (6, 4)]
    assert [e.value for e in events.Scalars("iteration/activations/1/mean")] == pytest.approx(
        [line["mean"] for line in lines if line["layer"] == "1"])


FAILING_STEP = '''
from engineflow.declare.control import StopFit

SEEN = []

@ef.train_step
def train(batch, model, optimizer, state):
    SEEN.append(sum(len(m._forward_hooks) for m in model.modules()))
    if state.iteration == 2:
        raise FAILURE("in the step")
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}

stats = ef.hooks.activation_stats(every=1)
probe = ef.hooks.forward("*", lambda module, inputs, output: None)
'''


@pytest.mark.parametrize("failure", ["RuntimeError", "KeyboardInterrupt", "StopFit"])
def test_the_hooks_are_gone_after_the_fit_also_when_a_step_fails(write_recipe, failure):
    recipe = ef.load_recipe(write_recipe(RELU_RECIPE + FAILING_STEP.replace("FAILURE", failure)))
    fit, _, _ = ef.build(recipe)
    if failure == "StopFit":
        fit.run(epochs=2)  # stops cleanly: COMPLETED
    else:
        with pytest.raises(KeyboardInterrupt if failure == "KeyboardInterrupt" else RuntimeError, match="in the step"):
            fit.run(epochs=2)
    # both tools hooked every layer (the Sequential, the Linear, the ReLU) while the step ran
    assert recipe.module.SEEN == [5, 5]
    assert [len(m._forward_hooks) for m in fit.components["model"].modules()] == [0, 0, 0]


def test_the_hooks_are_gone_after_a_completed_fit_and_back_for_the_next(write_recipe):
    recipe = ef.load_recipe(write_recipe(RELU_RECIPE + FAILING_STEP.replace("FAILURE", "RuntimeError")
                                         .replace("state.iteration == 2", "state.iteration == 99")))
    fit, _, _ = ef.build(recipe)
    fit.run(epochs=1)
    assert [len(m._forward_hooks) for m in fit.components["model"].modules()] == [0, 0, 0]
    fit.run(epochs=2)  # a second run of the fit hooks them again
    assert recipe.module.SEEN == [5] * 6
    assert [len(m._forward_hooks) for m in fit.components["model"].modules()] == [0, 0, 0]
    assert recipe.module.stats.latest["1"]["count"] == 4  # built, not recorded: the last read-back in Python


def test_a_resumed_fit_reads_back_as_an_unbroken_one(write_recipe):
    path = write_recipe(RELU_RECIPE + "stats = ef.hooks.activation_stats(every=2)\n")
    unbroken, _, _ = ef.build(recipe := ef.load_recipe(path))
    unbroken.run(epochs=2)
    first, _, _ = ef.build(path)
    first.run(epochs=1)
    resumed, _, _ = ef.build(again := ef.load_recipe(path))
    resumed.load_state_dict(first.state_dict())
    resumed.run(epochs=2)
    assert again.module.stats.latest == recipe.module.stats.latest and again.module.stats.latest["0"]["count"] == 4


SEVERAL = IMPORTS + '''
import torch.nn as nn

config = ef.config(epochs=1)

def setup(cfg):
    data = TensorDataset(torch.randn(4, 4), torch.randint(0, 2, (4,)))
    encoder = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    head = nn.Linear(3, 2)
    return dict(encoder=encoder, head=head, optimizer=torch.optim.SGD([*encoder.parameters(), *head.parameters()], 0.1),
                loaders={"train": DataLoader(data, batch_size=2)})

@ef.train_step
def train(batch, encoder, head, optimizer):
    loss = F.cross_entropy(head(encoder(batch[0])), batch[1])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}
'''


@pytest.mark.parametrize(("modules", "names"), [
    (None, ["encoder.0", "encoder.1", "encoder.2.0", "encoder.2.1", "head"]),
    ("encoder.2*", ["encoder.2", "encoder.2.0", "encoder.2.1"]),
    (["head", "*.1"], ["encoder.1", "encoder.2.1", "head"]),
    (torch.nn.Linear, ["encoder.0", "encoder.2.0", "head"]),
    ((torch.nn.ReLU, torch.nn.Tanh), ["encoder.1", "encoder.2.1"]),
])
def test_layers_are_chosen_by_name_type_or_as_the_leaves(write_recipe, modules, names):
    fit, _, _ = ef.build(write_recipe(SEVERAL))
    assert list(select_layers(fit.components, modules, "here")) == names
    probe = ef.hooks.forward(modules, lambda module, inputs, output: None)
    probe.attach(fit)
    assert list(probe.hooks[0].layers) == names


def test_one_module_component_gives_bare_names_and_nothing_matched_is_a_recipe_error(write_recipe):
    fit, _, _ = ef.build(write_recipe(BASE_RECIPE))
    assert list(select_layers(fit.components, None, "here")) == ["model"]  # the component is the one leaf
    with pytest.raises(RecipeError, match=r"here: no layer of the fit matches modules='enc\*'; its layers: model"):
        select_layers(fit.components, "enc*", "here")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ef.hooks.activation_stats(every=0), "every= takes a whole number >= 1, got 0"),
    (lambda: ef.hooks.activation_stats(every=5, window=6), "window=6 is more than every=5"),
    (lambda: ef.hooks.activation_stats(range=(1.0, -1.0)), "range= takes (low, high)"),
    (lambda: ef.hooks.activation_stats(modules=3), "modules= takes a layer name pattern"),
    (lambda: ef.hooks.forward("x", "not a function"), "fn must be a function"),
])
def test_bad_declarations_are_recipe_errors(call, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_a_forward_hook_runs_for_the_fit_alone(write_recipe):
    calls = '''
CALLS = []
probe = ef.hooks.forward(torch.nn.ReLU, lambda module, inputs, output: CALLS.append((module.training, len(output))))
'''
    recipe = ef.load_recipe(write_recipe(RELU_RECIPE + calls))
    fit, _, _ = ef.build(recipe)
    relu = fit.components["model"][1]
    relu(torch.zeros(1, 2))
    assert recipe.module.CALLS == [] and len(relu._forward_hooks) == 0  # not hooked before the fit runs
    fit.run(epochs=1)
    # each train batch (4, 4, 2 samples), then validation's (eval mode), then nothing after the fit
    assert recipe.module.CALLS == [(True, 4), (True, 4), (True, 2), (False, 4), (False, 4), (False, 2)]
    relu(torch.zeros(1, 2))
    assert len(recipe.module.CALLS) == 6 and len(relu._forward_hooks) == 0
