"""Recipes the benchmarks run with ``engineflow run`` / :func:`engineflow.run`."""
