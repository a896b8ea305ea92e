"""``ef.build``: a recipe and its config in, the engines of its fit out, nothing run.

``build`` resolves the config, seeds every RNG, calls ``setup`` and wires the engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from engineflow.declare.configuration import Config
from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe, load_recipe
from engineflow.errors import EngineflowError, RecipeError, SetupError
from engineflow.execute.fit import Fit
from engineflow.execute.injection import check_component_names, describe, make_caller
from engineflow.execute.parallel import World, shard_loaders, train_loader_names
from engineflow.execute.pipeline import CHECK_BATCHES, Pipeline, stage_epochs, to_device
from engineflow.execute.wiring import take
from engineflow.runtime import RunContext, resolve_device
from engineflow.state.rng import seed_everything


def resolve_config(recipe: Recipe, overrides: Mapping[str, Any] | None, seed: int | None) -> tuple[Config, int]:
    """Apply overrides and the seed to the recipe's defaults; returns (config, seed)."""
    # a Config is already resolved (a resumed run's); anything else overrides the defaults
    cfg = overrides if isinstance(overrides, Config) else recipe.config.override(overrides or {})
    if seed is not None and "seed" in cfg:
        cfg = cfg.override({"seed": seed})
    if seed is None:
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"{recipe.path}: config 'seed' must be an int, got {seed!r}")
    epochs = cfg.get("epochs", 1)
    if not recipe.stages and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise RecipeError(f"{recipe.path}: config 'epochs' must be an int >= 1, got {epochs!r}")
    return cfg, seed


def build(
    recipe: str | Path | Recipe,
    overrides: Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    check: bool = False,
    extras: tuple[Callable[[Fit], Iterable[HandlerSpec]], ...] = (),
    context: RunContext | None = None,
) -> tuple[Fit | Pipeline, Config, RunContext]:
    """Load a recipe and build its engines without running them.

    Returns:
        ``(fit, cfg, context)``: the engines and records, the resolved config, the run's context.
        For a recipe with ``stages``, a :class:`~engineflow.execute.pipeline.Pipeline` in place
        of the fit: its first stage is prepared and built (``pipeline.fit``), ``pipeline.run()``
        runs every stage.

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64, "hidden": 8})
        >>> cfg.hidden, cfg.epochs, type(fit).__name__
        (8, 30, 'Fit')
        >>> sorted(fit.evaluate("valid"))        # the untrained model
        ['valid/mae', 'valid/mse']
        >>> state = fit.run(epochs=2)            # the train engine, with validation each epoch
        >>> state.epoch, sorted(state.metrics)   # plain Ignite underneath
        (2, ['train/loss', 'train/lr', 'valid/mae', 'valid/mse'])
    """
    pipeline, cfg, context = build_pipeline(recipe, overrides, device=device, seed=seed, check=check, extras=extras,
                                            context=context)
    return (pipeline if pipeline.staged else pipeline.fit), cfg, context


def build_pipeline(
    recipe: str | Path | Recipe,
    overrides: Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    check: bool = False,
    extras: tuple[Callable[[Fit], Iterable[HandlerSpec]], ...] = (),
    listeners: Iterable[Any] = (),
    context: RunContext | None = None,
    epochs: list[int] | None = None,
) -> tuple[Pipeline, Config, RunContext]:
    """:func:`build` for any recipe: a :class:`Pipeline` (one stage, "fit", for a recipe without
    stages) whose first stage is prepared and built; ``listeners`` hear of stage boundaries;
    ``epochs`` (each stage's) replaces what the config says (a resumed run keeps its own)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    cfg, seed = resolve_config(recipe, overrides, seed)
    epochs = epochs if epochs is not None else stage_epochs(recipe, cfg, check=check)
    if context is None:
        context = RunContext("interactive", recipe.name, Path("."), resolve_device(device), seed, check)
    seed_everything(seed)
    provided = {"cfg": cfg, "device": context.device, "run": context}  # what setup() and every stage may ask for
    components = _setup(recipe, provided)
    world = World(context.rank, context.world_size)
    # sharded before --check cuts them: each rank's first batches are of its own share
    if world.distributed and isinstance(components["loaders"], Mapping):
        components["loaders"] = shard_loaders(components["loaders"], world, train=train_loader_names(recipe))
    if check:
        components["loaders"] = {name: take(loader, CHECK_BATCHES) for name, loader in components["loaders"].items()}
    pipeline = Pipeline(recipe, components, provided, epochs=epochs, seed=seed, extras=extras,
                        listeners=listeners)
    pipeline.check_stages()  # a later stage's loader names, before any stage trains
    pipeline.enter(0)
    return pipeline, cfg, context


def _setup(recipe: Recipe, provided: Mapping[str, Any]) -> dict[str, Any]:
    if recipe.setup is None:
        raise RecipeError(
            f"{recipe.path}: no setup(cfg) function; define one that returns the model, optimizer and "
            "loaders=dict(train=..., valid=...)"
        )
    call = make_caller(recipe.setup, provided=provided, what="setup")
    try:
        components = call({})
    except EngineflowError:
        raise  # already says what is wrong (a config key the recipe does not declare, a nested load_run)
    except Exception as err:
        raise SetupError(f"setup {describe(recipe.setup)} failed: {type(err).__name__}: {err}") from err
    if not isinstance(components, Mapping):
        raise RecipeError(
            f"setup {describe(recipe.setup)} returned {type(components).__name__}; it must return a dict "
            "such as dict(model=..., optimizer=..., loaders={'train': ..., 'valid': ...})"
        )
    components = dict(components)
    check_component_names(components, f"setup {describe(recipe.setup)}")
    if "loaders" not in components:
        raise RecipeError(
            f"setup {describe(recipe.setup)} returned no 'loaders'; return "
            "loaders={'train': train_loader, 'valid': valid_loader} with the other components"
        )
    return {name: to_device(value, provided["device"]) if name != "loaders" else value
            for name, value in components.items()}
