"""``recipes/digits.py`` with engineflow's in-memory loader: the same config, setup, model and steps.

Only the loaders differ: the recipe's own ``setup`` runs, then its ``DataLoader``s are swapped for
:class:`engineflow.data.TensorLoader`s over the same tensors, in the same batch sizes.

    engineflow run benchmarks/recipes/digits_tensor.py
"""

from pathlib import Path

from engineflow.data import TensorLoader
from engineflow.declare.recipe import load_recipe

digits = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "digits.py").module

config = digits.config
train = digits.train
evaluate = digits.evaluate
predict = digits.predict


def setup(cfg):
    components = digits.setup(cfg)
    components["loaders"] = {
        name: TensorLoader(*loader.dataset.tensors, batch_size=loader.batch_size, shuffle=name == "train",
                           seed=cfg.seed)
        for name, loader in components["loaders"].items()
    }
    return components
