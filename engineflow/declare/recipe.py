"""Load a recipe file and collect what it declares: config, setup, steps and handlers.

A recipe is a plain Python module. engineflow imports it once per run and reads its top-level
names; nothing is registered globally, so two recipes never see each other's steps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from engineflow.declare.configuration import Config
from engineflow.declare.handlers import HandlerSpec, handler_specs
from engineflow.declare.stages import Stage, check_stages
from engineflow.declare.steps import STEP_KINDS, StepSpec, step_spec, wraps_around
from engineflow.declare.tools import collect_tools
from engineflow.errors import RecipeError


@dataclass(frozen=True)
class Recipe:
    """What a recipe file declares.

    Attributes:
        path: the recipe file, resolved.
        name: the experiment name: the module's ``experiment`` string, else the file's stem.
        module: the imported module.
        config: the config defaults (``config = ef.config(...)``), empty when absent.
        setup: ``setup(cfg, ...)``, the function that builds the components, or None.
        steps: the steps found, by kind ("train", "eval", "infer"); in a pipeline, a kind with
            several steps is left out (its stages name them).
        handlers: every handler attachment found, in declaration order.
        stages: the pipeline's stages in order (``stages = [ef.stage(...), ...]``); empty for a
            recipe of one fit.
        tools: the toolbox declarations at its top level (early stopping, EMA...), see
            :mod:`engineflow.declare.tools`.
    """

    path: Path
    name: str
    module: ModuleType
    config: Config
    setup: Callable[..., Any] | None
    steps: Mapping[str, StepSpec]
    handlers: tuple[HandlerSpec, ...]
    stages: tuple[Stage, ...] = ()
    tools: tuple[Any, ...] = ()


def load_recipe(path: str | Path) -> Recipe:
    """Import the recipe at ``path`` and collect its declarations.

    Raises:
        RecipeError: the file is missing, does not parse, fails on import, or declares two
            steps of one kind; the message names the file and line.

    Example:
        >>> import engineflow as ef
        >>> recipe = ef.load_recipe("recipes/sine.py")  # imported, nothing built or run
        >>> recipe.name, sorted(recipe.steps), recipe.config.epochs, recipe.setup.__name__
        ('sine', ['eval', 'infer'], 30, 'setup')
    """
    file = Path(path)
    if not file.is_file():
        hint = " (it is a directory)" if file.is_dir() else ""
        raise RecipeError(f"recipe file not found: {path}{hint}. Pass the path of a .py recipe, e.g. recipes/digits.py")
    file = file.resolve()
    module = _import(file)
    return collect(module, file)


def collect(module: ModuleType, file: Path) -> Recipe:
    """Read a recipe's declarations from an imported module."""
    found: dict[str, list[StepSpec]] = {}
    handlers: dict[int, HandlerSpec] = {}  # by declaration: a function and its wrapper share one
    stages = check_stages(module.stages, str(file)) if getattr(module, "stages", None) is not None else ()
    for attr, value in vars(module).items():
        spec = step_spec(value)
        if spec is not None:
            _add_step(found.setdefault(spec.kind, []), spec, attr, file, several=bool(stages))
        for handler in handler_specs(value):
            known = handlers.get(handler.seq)
            if known is None or wraps_around(handler.fn, known.fn):
                handlers[handler.seq] = handler
    if stages:
        stages = tuple(_running_wrappers(s, found) for s in stages)
    _check_handler_stages(handlers.values(), stages, file)
    return Recipe(
        path=file,
        name=_experiment_name(module, file),
        module=module,
        config=_config_of(module, file),
        setup=_setup_of(module, file),
        steps={kind: found[kind][0] for kind in STEP_KINDS if len(found.get(kind, ())) == 1},
        handlers=tuple(sorted(handlers.values(), key=lambda h: h.seq)),
        stages=stages,
        tools=collect_tools(vars(module).values(), [s.name for s in stages], str(file)),
    )


def _add_step(known: list[StepSpec], spec: StepSpec, attr: str, file: Path, *, several: bool) -> None:
    """Add a step to those of its kind; a wrapper and the function it wraps are one step (the wrapper runs)."""
    for index, other in enumerate(known):
        if other.fn is spec.fn or wraps_around(spec.fn, other.fn):
            known[index] = spec
            return
        if wraps_around(other.fn, spec.fn):
            return  # the inner function of a wrapper already found: the wrapper runs
    if known and not several:
        raise RecipeError(
            f"{file}: two {spec.kind} steps, {known[0].fn.__name__!r} and {attr!r}; a recipe has one of each "
            "(a recipe with several declares which stage runs which: stages = [ef.stage(...), ...])"
        )
    known.append(spec)


def _running_wrappers(stage: Stage, found: Mapping[str, list[StepSpec]]) -> Stage:
    """A stage naming a step that the module wraps (``functools.wraps``) runs the wrapper."""
    def running(spec: StepSpec | None) -> StepSpec | None:
        if spec is None:
            return None
        return next((s for s in found.get(spec.kind, ()) if wraps_around(s.fn, spec.fn)), spec)

    return replace(stage, train=running(stage.train), eval=running(stage.eval), infer=running(stage.infer))


def _check_handler_stages(handlers: Iterable[HandlerSpec], stages: tuple[Stage, ...], file: Path) -> None:
    names = [s.name for s in stages]
    for handler in handlers:
        if handler.stage is None or handler.stage in names:
            continue
        if not stages:
            raise RecipeError(f"{file}: handler {handler.fn.__name__!r} is for stage {handler.stage!r}, but the recipe "
                              "declares no stages; drop stage= or declare stages = [ef.stage(...), ...]")
        raise RecipeError(f"{file}: handler {handler.fn.__name__!r} is for stage {handler.stage!r}, which is not one "
                          f"of the recipe's stages ({', '.join(names)})")


def _import(file: Path) -> ModuleType:
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {file}: {err}") from None
    try:
        code = compile(source, str(file), "exec")
    except SyntaxError as err:
        text = f"\n    {err.text.rstrip()}" if err.text else ""
        raise RecipeError(f"{file}:{err.lineno}: syntax error in the recipe: {err.msg}{text}") from None
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]
    name = f"engineflow_recipe_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None:
        raise RecipeError(f"cannot import recipe {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered so pickling (DataLoader workers) and dataclasses can find the module; the recipe's
    # folder goes on sys.path so it can import helper modules that sit beside it.
    sys.modules[name] = module
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        exec(code, module.__dict__)
    except RecipeError as err:  # a declaration engineflow refused (ef.stage, ef.config) says what is wrong
        sys.modules.pop(name, None)
        raise RecipeError(f"{_where(err, file)}: {err}") from None
    except Exception as err:
        sys.modules.pop(name, None)
        raise RecipeError(f"{_where(err, file)}: the recipe raised while being imported: "
                          f"{type(err).__name__}: {err}") from err
    return module


def _where(err: BaseException, file: Path) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(file)]
    return f"{file}:{frames[-1].lineno}" if frames else str(file)


def _experiment_name(module: ModuleType, file: Path) -> str:
    name = getattr(module, "experiment", None)
    if name is None:
        return file.stem
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise RecipeError(f"{file}: 'experiment' must be a plain name usable as a folder, got {name!r}")
    return name


def _config_of(module: ModuleType, file: Path) -> Config:
    value = getattr(module, "config", None)
    if value is None:
        return Config({})
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return Config(value)
    raise RecipeError(f"{file}: 'config' must be ef.config(...) or a dict, got {type(value).__name__}")


def _setup_of(module: ModuleType, file: Path) -> Callable[..., Any] | None:
    value = getattr(module, "setup", None)
    if value is not None and not callable(value):
        raise RecipeError(f"{file}: 'setup' must be a function setup(cfg) returning a dict, got {value!r}")
    return value
