"""WeightAverage: what it averages, copies and keeps exact; its state; the weights files' "ema" entry."""

from __future__ import annotations

import pytest
import torch

from engineflow.errors import RecipeError
from engineflow.state.averages import WeightAverage
from engineflow.state.checkpoint_files import load_weights, save_weights


def batch_normed() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_floating_point_tensors_are_averaged_integer_buffers_copied_and_frozen_weights_stay_exact():
    model = batch_normed()
    model[0].bias.requires_grad_(False)
    average = WeightAverage("model")
    assert average.follow(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(4, 3))  # running statistics and num_batches_tracked move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(0.75)
    now = model.state_dict()
    for name in ("0.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(average.weights[name], 0.75 * start[name] + 0.25 * now[name], rtol=0, atol=1e-6)
    assert average.weights["1.num_batches_tracked"].item() == 1
    for _ in range(50):
        average.update(0.999)
    assert torch.equal(average.weights["0.bias"], model[0].bias), "an unchanged weight is not moved by rounding"


def test_the_average_is_swapped_in_and_the_models_own_weights_come_back_also_after_an_error():
    model = batch_normed()
    average = WeightAverage("model")
    average.follow(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError), average.swapped_in():
        assert torch.equal(model[0].weight, average.weights["0.weight"])
        raise ValueError
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_a_stage_with_the_same_shapes_carries_the_average_on_and_another_architecture_starts_again():
    average = WeightAverage("model")
    average.follow(torch.nn.Linear(3, 2))
    average.update(0.5)
    assert not average.follow(torch.nn.Linear(3, 2)) and average.updates == 1
    assert average.follow(torch.nn.Linear(3, 4)) and average.updates == 0


def test_a_state_loads_into_an_average_of_the_same_component_only():
    model = torch.nn.Linear(3, 2)
    saved = WeightAverage("model")
    saved.follow(model)
    saved.update(0.5)
    loaded = WeightAverage("model")
    loaded.follow(torch.nn.Linear(3, 2))
    loaded.load_state_dict(saved.state_dict())
    assert loaded.updates == 1 and all(torch.equal(loaded.weights[k], v) for k, v in saved.weights.items())
    other = WeightAverage("encoder")
    other.follow(model)
    with pytest.raises(RecipeError, match="the checkpoint's EMA averages component 'model'"):
        other.load_state_dict(saved.state_dict())


def test_a_weights_file_without_an_average_refuses_ema_loads(tmp_path):
    path = tmp_path / "last.pt"
    save_weights(path, {"model": torch.nn.Linear(4, 2)}, {"epoch": 1})
    assert "ema" not in torch.load(path, weights_only=True)
    with pytest.raises(RecipeError, match="holds no EMA of the weights"):
        load_weights(path, {"model": torch.nn.Linear(4, 2)}, ema=True)
