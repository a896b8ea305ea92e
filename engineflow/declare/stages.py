"""Stages: a recipe that trains in several steps declares them, in order, as a top-level ``stages``.

Each stage names its steps, its epochs and loaders, and may change the components before it
starts (``prepare``): a new optimizer, a lower learning rate, frozen or unfrozen layers, a new
head. Everything else carries over from stage to stage::

    stages = [
        ef.stage("pretrain", train=reconstruct, eval=reconstruction, epochs="pretrain_epochs"),
        ef.stage("frozen", train=classify, eval=evaluate, epochs=5, prepare=freeze_encoder,
                 loaders={"train": "labelled", "valid": "valid"}),
        ef.stage("finetune", train=classify, eval=evaluate, epochs=10, prepare=unfreeze,
                 loaders={"train": "labelled", "valid": "valid"}),
        ef.stage("test", eval=evaluate, loaders={"test": "test"}),
        ef.stage("predict", infer=predict, loaders={"unlabelled": "unlabelled"}),
    ]

A stage is one of three kinds, told by the steps it names:

- **train** (``train=``, optionally ``eval=`` for validation): epochs of the train step, as a
  recipe without stages runs them;
- **test** (``eval=`` alone): the eval step and its metrics over each of its loaders, once
  (default loader: "test");
- **infer** (``infer=`` alone): the infer step over each of its loaders without gradients, models
  in eval mode; the predictions are written to the run folder (default loader: "infer", else "test").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engineflow.declare.step_options import StepOptions
from engineflow.declare.steps import StepSpec, step_spec
from engineflow.errors import RecipeError

STAGE_KINDS = ("train", "test", "infer")


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, as :func:`stage` declared it.

    Attributes:
        name: the stage's name; its metrics are reported as ``<name>/<metric>``.
        kind: "train", "test" or "infer" (from the steps given).
        train: the train step (train stages).
        eval: the eval step: validation in a train stage, the metrics of a test stage.
        infer: the infer step (infer stages).
        epochs: how many epochs (train stages): a number, or the name of a config key that holds it.
        loaders: the stage's loaders, ``{name in this stage: name setup() gave it}``; None: setup's own.
        prepare: called before the stage starts, with components by name; returns the components it
            adds or replaces (or None).
        options: train stages: step options that override its train step's for this stage.

    Example:
        >>> import engineflow as ef
        >>> recipe = ef.load_recipe("recipes/pretrain_finetune.py")
        >>> [(stage.name, stage.kind) for stage in recipe.stages]
        [('pretrain', 'train'), ('frozen', 'train'), ('finetune', 'train'), ('test', 'test'), ('predict', 'infer')]
        >>> finetune = recipe.stages[2]
        >>> finetune.epochs, finetune.loaders, finetune.prepare.__name__
        ('finetune_epochs', {'train': 'labelled', 'valid': 'valid'}, 'unfreeze_encoder')
    """

    name: str
    kind: str
    train: StepSpec | None = None
    eval: StepSpec | None = None
    infer: StepSpec | None = None
    epochs: int | str = 1
    loaders: Mapping[str, str] | None = None
    prepare: Callable[..., Any] | None = None
    options: StepOptions = field(default_factory=StepOptions)

    def steps(self) -> tuple[StepSpec, ...]:
        """The stage's steps: train, eval, infer, those it has."""
        return tuple(s for s in (self.train, self.eval, self.infer) if s is not None)


def stage(
    name: str,
    *,
    train: Callable[..., Any] | None = None,
    eval: Callable[..., Any] | None = None,
    infer: Callable[..., Any] | None = None,
    epochs: int | str = 1,
    loaders: Mapping[str, str] | None = None,
    prepare: Callable[..., Any] | None = None,
    precision: str | None = None,
    accumulate: int | str | None = None,
    clip_norm: float | str | None = None,
    clip_value: float | str | None = None,
    compile: bool | Mapping[str, Any] | None = None,
    channels_last: bool | None = None,
) -> Stage:
    """Declare a stage of a pipeline (put it in the recipe's top-level ``stages`` list).

    Args:
        name: a plain name ("pretrain", "finetune"); metrics show as ``finetune/valid/accuracy``.
        train: a function decorated with ``@ef.train_step``.
        eval: a function decorated with ``@ef.eval_step``: validation for a train stage, or alone,
            a test pass over the stage's loaders.
        infer: a function decorated with ``@ef.infer_step``, alone: an inference pass.
        epochs: train stages: a whole number, or the name of a config key (``epochs="finetune_epochs"``,
            so ``--set finetune_epochs=3`` changes it).
        loaders: which of setup()'s loaders the stage uses, ``{"train": "labelled", "valid": "valid"}``;
            the keys are the names in this stage (and in its metric names). Default: setup()'s
            loaders as they are named (a test stage: "test"; an infer stage: "infer", else "test").
        prepare: ``prepare(encoder, head, cfg, ...) -> dict | None``, run when the stage starts (and
            again when a resumed run rebuilds the stages before the one it continues). It takes
            components by name, may change them in place (``requires_grad_``), and returns the
            components it adds or replaces, e.g. ``{"optimizer": torch.optim.SGD(...)}``. Its RNGs
            start from the run's seed and the stage's index, so a new head starts the same on resume.
        precision, accumulate, clip_norm, clip_value, compile, channels_last: train stages: step
            options for this stage, over those its train step declares (see :func:`engineflow.train_step`).

    Example:
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch, model, optimizer):
        ...     return {"loss": model(batch).sum()}
        >>> ef.stage("warmup", train=train, epochs=2).kind
        'train'
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise RecipeError(f"ef.stage(name): a stage's name must be a plain name such as 'finetune' (letters, "
                          f"digits, underscores), got {name!r}")
    where = f"stage {name!r}"
    train_spec = _step(train, "train", where)
    eval_spec = _step(eval, "eval", where)
    infer_spec = _step(infer, "infer", where)
    if train_spec is None and eval_spec is None and infer_spec is None:
        raise RecipeError(f"{where} has no step: give it train=<@ef.train_step function> (optionally with "
                          "eval=), eval= alone for a test pass, or infer= alone for an inference pass")
    if infer_spec is not None and (train_spec is not None or eval_spec is not None):
        raise RecipeError(f"{where}: infer= makes an inference pass, which takes no train= or eval= step; "
                          "declare the inference as a stage of its own")
    kind = "train" if train_spec is not None else "test" if eval_spec is not None else "infer"
    if isinstance(epochs, bool) or not isinstance(epochs, (int, str)) or (isinstance(epochs, int) and epochs < 1):
        raise RecipeError(f"{where}: epochs= expects a whole number >= 1 or the name of a config key, got {epochs!r}")
    if kind != "train" and epochs != 1:
        raise RecipeError(f"{where} is a {kind} pass, which runs once over its loaders; it takes no epochs=")
    if loaders is not None:
        if not isinstance(loaders, Mapping) or not loaders or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in loaders.items()):
            raise RecipeError(f"{where}: loaders= expects a dict of names, {{name in the stage: name setup() "
                              f"returned}}, e.g. {{'train': 'labelled', 'valid': 'valid'}}; got {loaders!r}")
        if kind == "infer" and ("train" in loaders or "train" in loaders.values()):
            raise RecipeError(f"{where} is an inference pass (no gradients, eval mode); it takes no train loader "
                              f"(got loaders={dict(loaders)!r}). Name the loaders to predict on, "
                              "e.g. loaders={'test': 'test'}")
        if kind == "train" and "train" not in loaders:
            raise RecipeError(f"{where}: loaders= must name the loader it trains on as 'train', e.g. "
                              f"{{'train': 'labelled', 'valid': 'valid'}}; got {dict(loaders)!r}")
        loaders = dict(loaders)
    if prepare is not None and not callable(prepare):
        raise RecipeError(f"{where}: prepare= expects a function returning a dict of components, got {prepare!r}")
    given = dict(precision=precision, accumulate=accumulate, clip_norm=clip_norm, clip_value=clip_value,
                 compile=compile, channels_last=channels_last)
    if kind != "train" and any(v is not None for v in given.values()):
        raise RecipeError(f"{where} is a {kind} pass, which takes no step options (precision=, accumulate=...); "
                          "give them to a train stage")
    options = StepOptions.declared(where, **given)
    return Stage(name, kind, train_spec, eval_spec, infer_spec, epochs, loaders, prepare, options)


def _step(fn: Any, kind: str, where: str) -> StepSpec | None:
    if fn is None:
        return None
    spec = step_spec(fn)
    if spec is None or spec.kind != kind:
        what = "a plain function" if spec is None else f"the {spec.kind} step {getattr(fn, '__name__', fn)!r}"
        raise RecipeError(f"{where}: {kind}= expects a function decorated with @ef.{kind}_step, got {what}")
    return spec


def check_stages(value: Any, where: str) -> tuple[Stage, ...]:
    """A recipe's ``stages``: a non-empty list of :func:`stage` values with distinct names."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(s, Stage) for s in value):
        raise RecipeError(f"{where}: 'stages' must be a non-empty list of ef.stage(...), got {value!r}")
    seen: set[str] = set()
    for s in value:
        if s.name in seen:
            raise RecipeError(f"{where}: two stages are named {s.name!r}; each stage needs its own name")
        seen.add(s.name)
    if not any(s.kind == "train" for s in value):
        raise RecipeError(f"{where}: 'stages' has no train stage; a pipeline trains in at least one stage "
                          "(test and infer passes alone are `engineflow test` and `engineflow eval`)")
    return tuple(value)
