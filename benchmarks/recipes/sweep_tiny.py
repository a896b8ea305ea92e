"""A sweep's smallest useful trial, for ``python -m benchmarks.sweep``: one short epoch, so that what
surrounds the training (the run's start and end, the sweep's own work) is what is measured. The run
notes the time of its first iteration and of its end in ``$EF_BENCH_MARKS``."""

import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import engineflow as ef

config = ef.config(epochs=1, lr=0.1, hidden=16, seed=0)
space = {"lr": ef.search.loguniform(1e-3, 0.5), "hidden": ef.search.choice(16, 32)}


def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=gen), torch.randint(0, 4, (256,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(16, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, 4))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
                         "valid": DataLoader(TensorDataset(x, y), batch_size=256)})


def _mark(kind):
    with open(os.environ.get("EF_BENCH_MARKS", os.devnull), "a") as marks:
        marks.write(f"{kind} {time.perf_counter()}\n")


@ef.train_step
def train(batch, model, optimizer, state):
    if state.iteration == 1:
        _mark("first")
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


@ef.on(ef.Events.COMPLETED, order=2000)
def end(state):
    _mark("end")
