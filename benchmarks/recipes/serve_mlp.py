"""The model ``benchmarks/serving.py`` serves: an MLP on 784 inputs, trained briefly (its weights do not matter).

``hidden=4096`` (the default) is a model where batching pays: one sample ~8 ms, 16 samples ~27 ms on one
core; ``--set hidden=16`` a small one, where HTTP dominates.
"""

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engineflow as ef

config = ef.config(hidden=4096, layers=3, samples=64, epochs=1, lr=0.01, seed=0)


def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(cfg.samples, 784, generator=gen), torch.randint(0, 10, (cfg.samples,), generator=gen)
    sizes = [784, *[cfg.hidden] * cfg.layers]
    model = nn.Sequential(*[layer for a, b in pairwise(sizes) for layer in (nn.Linear(a, b), nn.ReLU())],
                          nn.Linear(sizes[-1], 10))
    data = TensorDataset(x, y)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(data, batch_size=32), "valid": DataLoader(data, batch_size=64)})


@ef.train_step
def train(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}


@ef.infer_step
def predict(x, model):
    return model(x)
