"""The benchmark workload as a recipe, so that it runs with every handler ``engineflow run`` attaches.

The config mirrors :class:`benchmarks.workloads.Workload`; :func:`benchmarks.loops.engineflow_recipe`
overrides it. Two handlers time the train engine from ``STARTED`` to ``COMPLETED``.
"""

import torch

import engineflow as ef
from benchmarks import timing
from benchmarks.loops import sgd_step
from benchmarks.workloads import Workload, make_data, make_loader, make_model, make_optimizer

config = ef.config(features=32, hidden=[], classes=10, samples=65536, batch_size=64, epochs=3, lr=0.01,
                   loader="dataloader", seed=0)


def setup(cfg):
    workload = Workload("recipe", cfg.features, tuple(cfg.hidden), cfg.classes, cfg.samples, cfg.batch_size,
                        cfg.epochs, cfg.lr)
    x, y, x_valid, y_valid = make_data(workload)
    model = make_model(workload)
    loaders = {
        "train": make_loader(x, y, kind=cfg.loader, batch_size=cfg.batch_size, shuffle=True),
        "valid": make_loader(x_valid, y_valid, kind=cfg.loader, batch_size=1024, shuffle=False),
    }
    return dict(model=model, optimizer=make_optimizer(model, workload), loaders=loaders)


@ef.train_step
def train(batch, model, optimizer):
    x, y = batch
    return {"loss": sgd_step(model, optimizer, x, y)}


@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy(), "loss": ef.metrics.Loss(torch.nn.functional.cross_entropy)})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}


# Outermost orders: the clock covers every other handler of the first and last events.
@ef.on(ef.Events.STARTED, order=-(10**9))
def start_clock():
    timing.start()


@ef.on(ef.Events.COMPLETED, order=10**9)
def stop_clock(state):
    timing.stop(state.iteration)
