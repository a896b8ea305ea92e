"""Metrics: per loader, per epoch, weighted by batch size, equal to a hand computation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import engineflow as ef

# 10 samples, batch size 4: batches of 4, 4 and 2 (the uneven last batch).
# The "model" is a fixed lookup so the expected values are computed by hand below.
RECIPE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=3)
Y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
PRED = torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 1, 1])  # right: 1,1,0,1 | 1,0,0,0 | 1,1 -> 6 of 10
TARGET = torch.tensor([0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])

def setup(cfg):
    idx = torch.arange(10)
    data = TensorDataset(idx, Y)
    return dict(scale=torch.nn.Parameter(torch.ones(())), loaders={"train": DataLoader(data, batch_size=4),
                "valid": DataLoader(data, batch_size=4), "extra": DataLoader(data, batch_size=3)})

@ef.train_step(metrics={"accuracy": ef.metrics.Accuracy()})
def train(batch):
    idx, y = batch
    return {"loss": TARGET[idx].mean(), "y_pred": torch.nn.functional.one_hot(PRED[idx], 2).float(), "y": y}

@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy(),
                       "mse": ef.metrics.MeanSquaredError(),
                       "loss": ef.metrics.Loss(torch.nn.functional.l1_loss)},
              main_metric="valid/mse")
def evaluate(batch, state):
    idx, y = batch
    return {"y_pred": PRED[idx].float(), "y": y.float()}
'''


def by_hand():
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1]).float()
    pred = torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 1, 1]).float()
    per_sample_err = (pred - y).abs()  # 0/1, squared is the same
    return {"accuracy": 6 / 10, "mse": per_sample_err.pow(2).sum().item() / 10,
            "loss": per_sample_err.sum().item() / 10}


def test_eval_metrics_equal_a_hand_computation_with_uneven_last_batch(write_recipe):
    path = write_recipe(RECIPE)
    fit, _, _ = ef.build(path)
    # Accuracy on 0/1 floats: ignite treats them as binary labels.
    got = fit.evaluate("valid")
    expected = by_hand()
    assert got == pytest.approx({f"valid/{k}": v for k, v in expected.items()})
    # the unweighted mean of batch accuracies would be (3/4 + 1/4 + 2/2) / 3 = 0.667, not 0.6
    assert got["valid/accuracy"] != pytest.approx((3 / 4 + 1 / 4 + 2 / 2) / 3)


def test_every_eval_loader_is_reported_each_epoch_with_its_prefix(write_recipe, tmp_path):
    result = ef.run(write_recipe(RECIPE), runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO())
    expected = by_hand()
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for row in result.history:
        for loader in ("valid", "extra"):  # batch 3 on "extra": 3,3,3,1
            for name, value in expected.items():
                assert row[f"{loader}/{name}"] == pytest.approx(value)
        assert "test/accuracy" not in row
        assert row["train/accuracy"] == pytest.approx(0.6)
        # train/loss is the mean of the batch losses: TARGET means 1.5, 5.5, 8.5
        assert row["train/loss"] == pytest.approx((1.5 + 5.5 + 8.5) / 3)
    assert result.best == {"metric": "valid/mse", "mode": "min", "epoch": 1, "value": pytest.approx(0.4)}


def test_main_metric_picks_the_best_epoch(write_recipe, tmp_path):
    from tests.conftest import BASE_RECIPE

    result = ef.run(write_recipe(BASE_RECIPE), {"epochs": 6}, runs_dir=tmp_path, device="cpu", stream=io.StringIO())
    values = [row["valid/accuracy"] for row in result.history]
    assert result.best["metric"] == "valid/accuracy" and result.best["mode"] == "max"
    assert result.best["value"] == max(values)
    assert result.best["epoch"] == values.index(max(values)) + 1, "the first epoch reaching the best"


def test_unknown_main_metric_lists_available(write_recipe):
    path = write_recipe(RECIPE.replace('main_metric="valid/mse"', 'main_metric="valid/f1"'))
    with pytest.raises(ef.RecipeError, match=r"main_metric 'valid/f1' is not reported; available: .*valid/mse"):
        ef.build(path)


def test_loss_metric_weights_by_batch_size():
    loss = ef.metrics.Loss(torch.nn.functional.mse_loss)
    loss.update((torch.zeros(3), torch.ones(3)))  # mean 1 over 3 samples
    loss.update((torch.zeros(1), torch.full((1,), 3.0)))  # mean 9 over 1 sample
    assert loss.compute() == pytest.approx((3 * 1 + 1 * 9) / 4)


# 64 features, batches of 4, 4 and 2: Ignite's own error metrics sum over the features (64x here).
ERRORS = [
    ("MeanSquaredError", lambda p, y: F.mse_loss(p, y)),
    ("MeanAbsoluteError", lambda p, y: F.l1_loss(p, y)),
    ("RootMeanSquaredError", lambda p, y: F.mse_loss(p, y).sqrt()),
]


def uneven_batches(features: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, features, generator=gen), torch.randn(n, features, generator=gen)) for n in (4, 4, 2)]


def joined(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([y_pred for y_pred, _ in batches]), torch.cat([y for _, y in batches])


@pytest.mark.parametrize(("name", "torch_fn"), ERRORS, ids=[name for name, _ in ERRORS])
def test_error_metrics_equal_torch_losses_over_features_and_uneven_batches(name, torch_fn):
    batches = uneven_batches()
    metric = getattr(ef.metrics, name)()
    for batch in batches:
        metric.update(batch)
    y_pred, y = joined(batches)
    assert metric.compute() == pytest.approx(torch_fn(y_pred, y).item(), rel=1e-6)
    # the uneven last batch is weighed by its elements: the mean of the three batch values is not it
    assert metric.compute() != pytest.approx(sum(torch_fn(*b).item() for b in batches) / 3, rel=1e-6)


def test_error_metrics_compare_n_by_1_with_n_element_by_element():
    mse = ef.metrics.MeanSquaredError()
    mse.update((torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0])))  # broadcasting would give (2, 2)
    assert mse.compute() == pytest.approx((1 + 4) / 2)
    with pytest.raises(ValueError, match=r"y_pred has shape \(2, 1\) but y has shape \(3,\)"):
        mse.update((torch.zeros(2, 1), torch.zeros(3)))


def test_error_metric_state_survives_state_dict_mid_loader():
    batches = uneven_batches()
    first, *rest = batches
    saved = ef.metrics.MeanSquaredError()
    saved.update(first)
    restored = ef.metrics.MeanSquaredError()
    restored.load_state_dict(saved.state_dict())
    for batch in rest:
        restored.update(batch)
    y_pred, y = joined(batches)
    assert restored.compute() == pytest.approx(F.mse_loss(y_pred, y).item(), rel=1e-6)


MULTI_FEATURE_RECIPE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=1)

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(10, 64, generator=gen), torch.randn(10, 64, generator=gen))
    return dict(data=data, scale=torch.nn.Parameter(torch.ones(())),
                loaders={"train": DataLoader(data, batch_size=4), "valid": DataLoader(data, batch_size=4)})

@ef.train_step
def train(batch):
    return {"loss": torch.zeros(())}

@ef.eval_step(metrics={"mse": ef.metrics.MeanSquaredError(), "mae": ef.metrics.MeanAbsoluteError(),
                       "rmse": ef.metrics.RootMeanSquaredError(),
                       "loss": ef.metrics.Loss(torch.nn.functional.mse_loss)})
def evaluate(batch):
    y_pred, y = batch
    return {"y_pred": y_pred, "y": y}
'''


def test_eval_run_error_metrics_equal_torch_losses_on_the_whole_loader(write_recipe):
    fit, _, _ = ef.build(write_recipe(MULTI_FEATURE_RECIPE))
    y_pred, y = fit.components["data"].tensors  # 10 samples in batches of 4, 4, 2
    mse = F.mse_loss(y_pred, y).item()
    assert fit.evaluate("valid") == pytest.approx({
        "valid/mse": mse, "valid/mae": F.l1_loss(y_pred, y).item(), "valid/rmse": mse ** 0.5, "valid/loss": mse,
    }, rel=1e-6)
    assert fit.best.metric == "valid/mse" and fit.best.mode == "min"


def test_best_tracker_min_and_max_and_state_dict():
    best = ef.Best("valid/loss", "min")
    assert [best.update(e, v) for e, v in enumerate([0.5, 0.7, 0.2, float("nan"), 0.2], start=1)] == [
        True, False, True, False, False]
    restored = ef.Best("x")
    restored.load_state_dict(best.state_dict())
    assert restored == best and restored.epoch == 3
