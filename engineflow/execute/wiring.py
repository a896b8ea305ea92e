"""What a fit is made of, read from a recipe and what its ``setup`` returned: the train and eval
steps (or the supervised defaults), the loaders, the validation loaders and the main metric; and
``take``, the first batches of a loader for ``--check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from engineflow.declare.recipe import Recipe
from engineflow.declare.stages import Stage
from engineflow.declare.step_options import StepOptions
from engineflow.declare.steps import StepSpec, step_spec
from engineflow.declare.supervised import supervised_eval_step, supervised_train_step
from engineflow.errors import RecipeError
from engineflow.execute.injection import describe
from engineflow.execute.losses import is_loss
from engineflow.state.best import infer_mode

HELD_OUT = ("train", "test")


def resolve_steps(recipe: Recipe, components: Mapping[str, Any]) -> tuple[StepSpec, StepSpec | None]:
    """The recipe's train and eval steps, or the supervised defaults when it declares none."""
    train = recipe.steps.get("train")
    evaluate = recipe.steps.get("eval")
    has_supervised = all(name in components for name in ("model", "optimizer", "loss_fn"))
    if train is None:
        if not has_supervised:
            raise RecipeError(
                f"{recipe.path}: no train step. Decorate a function with @ef.train_step, or return "
                "'model', 'optimizer' and 'loss_fn' from setup() to use the default supervised step "
                f"(setup returned: {', '.join(components) or 'nothing'})"
            )
        train = step_spec(supervised_train_step())
    if evaluate is None and "model" in components and "loss_fn" in components:
        from engineflow.metrics import Loss

        evaluate = step_spec(supervised_eval_step(metrics={"loss": Loss(components["loss_fn"])}))
    assert train is not None  # step_spec of a freshly decorated function
    return train, evaluate


def step_options(train: StepSpec, stage: Stage | None, cfg: Mapping[str, Any], *,
                 precision: str | None = None) -> StepOptions:
    """A train stage's step options as values: the stage's over its step's, config keys read from
    ``cfg``; ``precision`` (``--precision``) over both. RecipeError naming the step or the stage."""
    declared = stage.options.over(train.options) if stage is not None else train.options
    where = f"stage {stage.name!r} (train step {describe(train.fn)})" if stage is not None else \
        f"train step {describe(train.fn)}"
    return declared.resolve(cfg, where, precision=precision)


def loaders_of(components: Mapping[str, Any], recipe: Recipe) -> dict[str, Iterable[Any]]:
    loaders = components.get("loaders")
    if not isinstance(loaders, Mapping) or "train" not in loaders:
        got = "nothing" if loaders is None else repr(type(loaders).__name__)
        if isinstance(loaders, Mapping):
            got = f"loaders {', '.join(map(str, loaders)) or '(none)'}"
        raise RecipeError(
            f"{recipe.path}: setup() must return loaders={{'train': ..., 'valid': ...}} with at least a "
            f"'train' loader; got {got}"
        )
    for name, loader in loaders.items():
        if not isinstance(loader, Iterable):
            raise RecipeError(f"{recipe.path}: loader {name!r} is {type(loader).__name__}, not iterable")
    return dict(loaders)


def eval_loaders_of(spec: StepSpec | None, loaders: Mapping[str, Any], recipe: Recipe) -> tuple[str, ...]:
    if spec is None:
        return ()
    if spec.loaders is None:
        return tuple(name for name in loaders if name not in HELD_OUT)
    missing = [name for name in spec.loaders if name not in loaders]
    if missing:
        raise RecipeError(
            f"{recipe.path}: @eval_step(loaders=...) names {', '.join(missing)}, but setup() returned "
            f"loaders {', '.join(loaders)}"
        )
    return spec.loaders


def main_metric(
    eval_spec: StepSpec | None, eval_loaders: tuple[str, ...], train_spec: StepSpec, recipe: Recipe
) -> tuple[str, str]:
    available = ["train/loss", *(f"train/{n}" for n in train_spec.metrics)]
    available += [f"{loader}/{n}" for loader in eval_loaders for n in (eval_spec.metrics if eval_spec else {})]
    wanted = eval_spec.main_metric if eval_spec is not None else None
    if wanted is None:
        name = available[len(train_spec.metrics) + 1] if len(available) > len(train_spec.metrics) + 1 else "train/loss"
    elif "/" not in wanted and eval_loaders:
        name = f"{eval_loaders[0]}/{wanted}"
    else:
        name = wanted
    if name not in available and not (name.startswith("train/") and is_loss(name.removeprefix("train/"))):
        raise RecipeError(
            f"{recipe.path}: main_metric {wanted!r} is not reported; available: {', '.join(available)}"
        )
    mode = (eval_spec.mode if eval_spec is not None else None) or infer_mode(name)
    return name, mode


def take(loader: Iterable[Any], n: int) -> Iterable[Any]:
    """The first ``n`` batches of ``loader``, re-iterable, with a length (for ``--check``)."""
    return _Take(loader, n)


class _Take:
    def __init__(self, loader: Iterable[Any], n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if index >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        try:
            return min(self.n, len(self.loader))  # type: ignore[arg-type]
        except TypeError:
            return self.n
