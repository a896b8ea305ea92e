"""engineflow: PyTorch training from plain step functions on pytorch-ignite engines.

A recipe declares a config, a ``setup(cfg)`` that builds the components, and step functions;
decorators attach handlers. ``engineflow run recipe.py`` (or :func:`engineflow.run`) trains it.

Public names are imported on first use, so ``import engineflow`` and ``engineflow --help`` stay
fast; the table below is the whole public API. Importing engineflow changes nothing else in the
process: no import hook, signal handler, logging set-up or seeding.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "engineflow.configuration",
    "config": "engineflow.configuration",
    "train_step": "engineflow.steps",
    "eval_step": "engineflow.steps",
    "infer_step": "engineflow.steps",
    "StepSpec": "engineflow.steps",
    "on": "engineflow.handlers",
    "every_n_epochs": "engineflow.handlers",
    "every_n_iterations": "engineflow.handlers",
    "SkipBatch": "engineflow.control",
    "EndEpoch": "engineflow.control",
    "StopFit": "engineflow.control",
    "EngineflowError": "engineflow.errors",
    "RecipeError": "engineflow.errors",
    "ConfigError": "engineflow.errors",
    "TrainingError": "engineflow.errors",
    "NonFiniteLossError": "engineflow.errors",
    "HandlerError": "engineflow.errors",
    "supervised_train_step": "engineflow.supervised",
    "supervised_eval_step": "engineflow.supervised",
    "prepare_batch": "engineflow.supervised",
    "Best": "engineflow.best",
    "Fit": "engineflow.fit",
    "RunContext": "engineflow.runtime",
    "RunResult": "engineflow.runner",
    "build": "engineflow.runner",
    "run": "engineflow.runner",
    "load_recipe": "engineflow.recipe",
    "make_engine": "engineflow.engine",
    "checkpoints": "engineflow.checkpointer",
    "CheckpointPolicy": "engineflow.checkpointer",
    "TensorLoader": "engineflow.data",
    "LoadedRun": "engineflow.registry.load",
    "load_run": "engineflow.registry.load",
    "evaluate_test": "engineflow.evaluation",
    "predict_files": "engineflow.evaluation",
    "Events": "ignite.engine",
}
_SUBMODULES = {"metrics", "data"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"engineflow.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engineflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS
    from ignite.engine import Events

    from engineflow import data, metrics
    from engineflow.best import Best
    from engineflow.checkpointer import CheckpointPolicy, checkpoints
    from engineflow.configuration import Config, config
    from engineflow.control import EndEpoch, SkipBatch, StopFit
    from engineflow.data import TensorLoader
    from engineflow.engine import make_engine
    from engineflow.errors import (
        ConfigError,
        EngineflowError,
        HandlerError,
        NonFiniteLossError,
        RecipeError,
        TrainingError,
    )
    from engineflow.evaluation import evaluate_test, predict_files
    from engineflow.fit import Fit
    from engineflow.handlers import every_n_epochs, every_n_iterations, on
    from engineflow.recipe import load_recipe
    from engineflow.registry.load import LoadedRun, load_run
    from engineflow.runner import RunResult, build, run
    from engineflow.runtime import RunContext
    from engineflow.steps import StepSpec, eval_step, infer_step, train_step
    from engineflow.supervised import prepare_batch, supervised_eval_step, supervised_train_step
