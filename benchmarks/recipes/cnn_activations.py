"""``cnn.py`` with activation statistics at their defaults (every leaf layer, read back every 50 iterations)."""

import engineflow as ef
from benchmarks.recipes.cnn import config, setup, train  # noqa: F401  (the recipe's declarations)

stats = ef.hooks.activation_stats()
