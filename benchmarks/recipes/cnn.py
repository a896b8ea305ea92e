"""The toolbox benchmark's small CNN as a recipe: a hand-written step that calls ``backprop``, its step
options read from the config, so that one recipe trains with and without each option.

``setup`` returns the model, optimizer and loader that :func:`benchmarks.toolbox_loops.shared` made for
this process, which the raw loops it is paired with train too. ``cnn_ema.py`` and
``cnn_activations.py`` are this recipe with one toolbox declaration more.
"""

import torch.nn.functional as F

import engineflow as ef
from benchmarks.toolbox_loops import shared

config = ef.config(samples=3200, batch_size=32, lr=0.01, epochs=1, seed=0, precision="32", accumulate=1,
                   clip_norm=None)


def setup(cfg):
    model, optimizer, train = shared(cfg.samples, cfg.batch_size, cfg.lr)
    return dict(model=model, optimizer=optimizer, loaders={"train": train})


@ef.train_step(precision="precision", accumulate="accumulate", clip_norm="clip_norm")
def train(batch, model, optimizer, backprop):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return {"loss": loss}
