"""engineflow: PyTorch training from plain step functions on pytorch-ignite engines.

A recipe declares a config, a ``setup(cfg)`` that builds the components, and step functions;
decorators attach handlers. ``engineflow run recipe.py`` (or :func:`engineflow.run`) trains it.

Public names are imported on first use, so ``import engineflow`` and ``engineflow --help`` stay
fast; the table below is the whole public API. Importing engineflow changes nothing else in the
process: no import hook, signal handler, logging set-up or seeding.

``ef.Events`` is Ignite's own ``Events``, its filters included, for ``ef.on``:

Example:
    >>> import ignite.engine
    >>> import engineflow as ef
    >>> ef.Events is ignite.engine.Events
    True
    >>> @ef.on(ef.Events.EPOCH_COMPLETED(every=5))  # a recipe's handler: every 5th epoch of its fit
    ... def report(state, metrics):
    ...     print(state.epoch, metrics["valid/accuracy"])
    >>> @ef.train_step
    ... def train(batch):
    ...     return {"loss": batch}
    >>> @ef.on(ef.Events.ITERATION_COMPLETED(every=2))
    ... def every_other(state):
    ...     print("iteration", state.iteration)
    >>> _ = ef.engine(train, every_other).run([1.0, 2.0, 3.0, 4.0])
    iteration 2
    iteration 4
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "engineflow.declare.configuration",
    "config": "engineflow.declare.configuration",
    "train_step": "engineflow.declare.steps",
    "eval_step": "engineflow.declare.steps",
    "infer_step": "engineflow.declare.steps",
    "StepSpec": "engineflow.declare.steps",
    "on": "engineflow.declare.handlers",
    "every_n_epochs": "engineflow.declare.handlers",
    "every_n_iterations": "engineflow.declare.handlers",
    "stage": "engineflow.declare.stages",
    "schedule": "engineflow.declare.schedules",
    "Schedule": "engineflow.declare.schedules",
    "Stage": "engineflow.declare.stages",
    "Pipeline": "engineflow.execute.pipeline",
    "Progress": "engineflow.execute.stage",
    "SkipBatch": "engineflow.declare.control",
    "EndEpoch": "engineflow.declare.control",
    "StopFit": "engineflow.declare.control",
    "EngineflowError": "engineflow.errors",
    "RecipeError": "engineflow.errors",
    "ConfigError": "engineflow.errors",
    "TrainingError": "engineflow.errors",
    "NonFiniteLossError": "engineflow.errors",
    "HandlerError": "engineflow.errors",
    "SetupError": "engineflow.errors",
    "StepCheckError": "engineflow.errors",
    "StoreError": "engineflow.errors",
    "supervised_train_step": "engineflow.declare.supervised",
    "supervised_eval_step": "engineflow.declare.supervised",
    "prepare_batch": "engineflow.declare.supervised",
    "Best": "engineflow.state.best",
    "Fit": "engineflow.execute.fit",
    "RunContext": "engineflow.runtime",
    "RunResult": "engineflow.app.run_result",
    "build": "engineflow.execute.build",
    "run": "engineflow.app.runner",
    "load_recipe": "engineflow.declare.recipe",
    "make_engine": "engineflow.execute.engine",
    "engine": "engineflow.execute.engine",
    "checkpoints": "engineflow.state.checkpointer",
    "CheckpointPolicy": "engineflow.state.checkpointer",
    "early_stopping": "engineflow.execute.stopping",
    "EarlyStopping": "engineflow.execute.stopping",
    "TensorLoader": "engineflow.data",
    "LoadedRun": "engineflow.record.load",
    "load_run": "engineflow.record.load",
    "evaluate_test": "engineflow.app.testing",
    "predict_files": "engineflow.app.evaluation",
    "serve": "engineflow.app.serving",
    "lr_find": "engineflow.execute.lr_finder",
    "sweep": "engineflow.app.sweep",
    "ema": "engineflow.execute.ema",
    "backprop": "engineflow.execute.backprop",
    "Backprop": "engineflow.execute.backprop",
    "StepOptions": "engineflow.declare.step_options",
    "Events": "ignite.engine",
}
# public submodules: name -> module
_SUBMODULES = {"metrics": "engineflow.metrics", "data": "engineflow.data", "hooks": "engineflow.execute.hooks",
               "search": "engineflow.declare.search"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
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
    from engineflow.app.evaluation import predict_files
    from engineflow.app.run_result import RunResult
    from engineflow.app.runner import run
    from engineflow.app.serving import serve
    from engineflow.app.sweep import sweep
    from engineflow.app.testing import evaluate_test
    from engineflow.data import TensorLoader
    from engineflow.declare import search
    from engineflow.declare.configuration import Config, config
    from engineflow.declare.control import EndEpoch, SkipBatch, StopFit
    from engineflow.declare.handlers import every_n_epochs, every_n_iterations, on
    from engineflow.declare.recipe import load_recipe
    from engineflow.declare.schedules import Schedule, schedule
    from engineflow.declare.stages import Stage, stage
    from engineflow.declare.step_options import StepOptions
    from engineflow.declare.steps import StepSpec, eval_step, infer_step, train_step
    from engineflow.declare.supervised import prepare_batch, supervised_eval_step, supervised_train_step
    from engineflow.errors import (
        ConfigError,
        EngineflowError,
        HandlerError,
        NonFiniteLossError,
        RecipeError,
        SetupError,
        StepCheckError,
        StoreError,
        TrainingError,
    )
    from engineflow.execute import hooks
    from engineflow.execute.backprop import Backprop, backprop
    from engineflow.execute.build import build
    from engineflow.execute.ema import ema
    from engineflow.execute.engine import engine, make_engine
    from engineflow.execute.fit import Fit
    from engineflow.execute.lr_finder import lr_find
    from engineflow.execute.pipeline import Pipeline
    from engineflow.execute.stage import Progress
    from engineflow.execute.stopping import EarlyStopping, early_stopping
    from engineflow.record.load import LoadedRun, load_run
    from engineflow.runtime import RunContext
    from engineflow.state.best import Best
    from engineflow.state.checkpointer import CheckpointPolicy, checkpoints
