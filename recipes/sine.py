"""Fit y = sin(x) from noisy samples: a regression with no step code at all.

setup() returns model, optimizer and loss_fn, so engineflow's default supervised train step
(prepare -> forward -> loss -> backward -> step) trains it; the eval step below only names the
metrics. The data is generated, so nothing is downloaded.

    engineflow run recipes/sine.py
"""

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engineflow as ef

config = ef.config(epochs=30, batch_size=32, lr=0.01, hidden=64, samples=1024, noise=0.05, seed=0)


def make_data(n: int, noise: float, generator: torch.Generator) -> TensorDataset:
    x = torch.rand(n, 1, generator=generator) * 2 * math.pi - math.pi
    y = torch.sin(x) + noise * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    loaders = {
        "train": DataLoader(make_data(cfg.samples, cfg.noise, gen), batch_size=cfg.batch_size, shuffle=True,
                            generator=gen),
        "valid": DataLoader(make_data(cfg.samples // 4, 0.0, gen), batch_size=256),
    }
    model = nn.Sequential(nn.Linear(1, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(),
                          nn.Linear(cfg.hidden, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return dict(model=model, optimizer=optimizer, loss_fn=nn.functional.mse_loss, loaders=loaders)


evaluate = ef.supervised_eval_step(
    metrics={"mse": ef.metrics.MeanSquaredError(), "mae": ef.metrics.MeanAbsoluteError()},
    main_metric="valid/mse",
)


@ef.infer_step
def predict(x, model):
    return model(x)
