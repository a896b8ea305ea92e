"""The GPU family's MLP as a recipe whose step uses engineflow's step options: bf16 autocast and
``torch.compile``, fed by a ``DataLoader`` that prefetches in worker processes into pinned memory.

:func:`benchmarks.gpu.measure` times it against the raw loop doing the same by hand.
"""

import torch.nn.functional as F

import engineflow as ef
from benchmarks.workloads import Workload, make_data, make_loader, make_model, make_optimizer

config = ef.config(features=784, hidden=[1024, 1024], classes=10, samples=65536, batch_size=256, epochs=2, lr=0.01,
                   seed=0)


def setup(cfg):
    workload = Workload("mlp-gpu", cfg.features, tuple(cfg.hidden), cfg.classes, cfg.samples, cfg.batch_size,
                        cfg.epochs, cfg.lr)
    x, y, _, _ = make_data(workload)
    model = make_model(workload)
    train = make_loader(x, y, kind="prefetch", batch_size=cfg.batch_size, shuffle=True)
    return dict(model=model, optimizer=make_optimizer(model, workload), loaders={"train": train})


@ef.train_step(precision="bf16", compile=True)
def train(batch, model, optimizer, backprop, device):
    x, y = ef.prepare_batch(batch, device)  # non_blocking copies from the pinned batches
    loss = F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return {"loss": loss}
