"""``cnn.py`` with an EMA of the weights (``ef.ema(0.999)``)."""

import engineflow as ef
from benchmarks.recipes.cnn import config, setup, train  # noqa: F401  (the recipe's declarations)

average = ef.ema(0.999)
