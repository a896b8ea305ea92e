"""Load a past run as it was: its recipe from the code snapshot, its config, its trained weights.

Also the rule ``test`` and ``eval`` follow to pick a run: the latest completed run of the recipe
(``--check`` smoke runs aside; ``--run last`` means the newest of any kind), refused
when the recipe's code changed since, unless ``--ignore-changes`` (today's code, that run's
weights) or ``--run ID`` (that run's own code from its snapshot).

A snapshot is imported only once :mod:`engineflow.record.trust` has checked it, and its imports write
no ``__pycache__`` into it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from engineflow.declare.configuration import Config
from engineflow.declare.recipe import Recipe, load_recipe
from engineflow.errors import RecipeError
from engineflow.execute.fit import Fit
from engineflow.naming import option
from engineflow.record.snapshot import capture
from engineflow.record.store import RunStore
from engineflow.record.trust import checked_recipe, writing_no_bytecode
from engineflow.runtime import runs_in_use, using_run
from engineflow.state.checkpoint_files import (
    best_checkpoint,
    checkpoint_files,
    load_checkpoint_weights,
    load_weights,
    newest_intact,
    saved_flags,
)
from engineflow.state.components import modules_of, set_trainable
from engineflow.state.resume import ResumeRecord
from engineflow.state.rng import rng_state, set_rng_state


@dataclass
class LoadedRun:
    """A past run, ready for testing, inference or fine-tuning.

    Attributes:
        record: the run record (as ``runs show --json`` prints it).
        module: the recipe module, imported from the run's code snapshot (or today's file).
        recipe: the recipe's declarations read from ``module``.
        config: the run's resolved config.
        model: the ``model`` component with the chosen weights (None if setup returned none).
        components: everything ``setup`` returned (and a pipeline's stages prepared), modules loaded
            with the weights.
        fit: the engines, built on ``components`` (``fit.evaluate("test")`` and so on); for a
            recipe with stages, those of its last train stage.
        run_dir: the run's folder.

    Example:
        >>> import io, tempfile
        >>> import engineflow as ef
        >>> runs = tempfile.mkdtemp()
        >>> result = ef.run("recipes/sine.py", {"epochs": 1, "samples": 64}, device="cpu", runs_dir=runs,
        ...                 stream=io.StringIO())
        >>> past = ef.load_run(result.run_id, runs_dir=runs, which="last")
        >>> isinstance(past, ef.LoadedRun), past.record["status"], past.run_dir == result.run_dir
        (True, 'completed', True)
        >>> sorted(past.components), past.model is past.components["model"]
        (['loaders', 'loss_fn', 'model', 'optimizer'], True)
        >>> past.config.epochs, past.module.config.epochs  # the run's config; the recipe's defaults
        (1, 30)
    """

    record: dict[str, Any]
    module: ModuleType
    recipe: Recipe
    config: Config
    model: torch.nn.Module | None
    components: dict[str, Any]
    fit: Fit
    run_dir: Path


def load_run(
    ref: str = "last",
    *,
    runs_dir: str | Path | None = None,
    which: str = "best",
    device: str = "cpu",
    experiment: str | None = None,
    recipe: str | Path | None = None,
    trust_code: bool = False,
    ema: bool = False,
) -> LoadedRun:
    """Load run ``ref`` ("last", an id or a unique id prefix) with its code, config and weights.

    Args:
        ref: which run.
        runs_dir: the runs folder (default ``$ENGINEFLOW_RUNS_DIR`` or ``./runs``).
        which: "best" weights (the main metric's best epoch) or "last".
        device: where to put the model.
        experiment: restrict "last" to one experiment.
        recipe: use this recipe file instead of the run's snapshot (today's code).
        trust_code: import the snapshot although nothing shows that this user recorded it: a run of
            another user or machine, or of an earlier engineflow version. Its files must still be
            those the run recorded, when it recorded them (see :mod:`engineflow.record.trust`).
        ema: each module the run kept an EMA of (:func:`engineflow.ema`) gets its average, as the
            ``which`` weights file holds it, instead of its own weights.

    Raises:
        UntrustedCodeError: the snapshot changed since the run was recorded, or needs ``trust_code``.

    Example:
        >>> import io, tempfile
        >>> import torch
        >>> import engineflow as ef
        >>> runs = tempfile.mkdtemp()
        >>> _ = ef.run("recipes/sine.py", {"epochs": 1, "samples": 64}, device="cpu", runs_dir=runs,
        ...            stream=io.StringIO())
        >>> past = ef.load_run("last", runs_dir=runs)
        >>> past.model(torch.zeros(3, 1)).shape     # the trained model, best weights
        torch.Size([3, 1])
        >>> from pathlib import Path
        >>> Path(past.module.__file__).is_relative_to(past.run_dir / "code")  # the recipe from its snapshot
        True
        >>> sorted(past.fit.evaluate("valid"))      # any of setup()'s loaders
        ['valid/mae', 'valid/mse']
    """
    from engineflow.execute.build import build_pipeline
    from engineflow.record.runs import resolve_runs_dir
    from engineflow.runtime import RunContext, resolve_device

    if which not in ("best", "last"):
        raise RecipeError(f"which= expects 'best' or 'last', got {which!r}")
    root = resolve_runs_dir(runs_dir)
    with RunStore.open(root) as store:
        record = _resolve_not_in_use(store, ref, experiment)
    run_dir = Path(record["run_dir"])
    snapshot = None if recipe is not None else checked_recipe(record, run_dir, trust_code=trust_code)
    context = RunContext(record["id"], record["experiment"], run_dir, resolve_device(device), record["seed"],
                         runs_dir=root)
    # build() seeds every RNG with the past run's seed; a setup() loading a run for fine-tuning must
    # go on drawing from its own seed's RNGs afterwards.
    caller_rngs, hash_seed = rng_state(), os.environ.get("PYTHONHASHSEED")
    importing = writing_no_bytecode() if snapshot is not None else nullcontext()  # setup() may import from it too
    try:
        with using_run(record["id"]), importing:
            loaded = load_recipe(recipe) if snapshot is None else _snapshot_recipe(record, snapshot)
            pipeline, cfg, _ = build_pipeline(loaded, record["config"], seed=record["seed"], context=context)
            # a pipeline's components are what its stages' prepare made them (a new head, an optimizer)
            pipeline.enter(max(i for i, s in enumerate(loaded.stages) if s.kind == "train") if loaded.stages else 0)
            pipeline.prepare_all()
    finally:
        set_rng_state(caller_rngs)
        if hash_seed is None:  # build() sets it for the run's processes; the caller's children keep theirs
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = hash_seed
    fit = pipeline.last_fit
    assert fit is not None  # a pipeline has a train stage
    modules = modules_of(fit.components)
    if modules:
        _load_chosen_weights(record, run_dir, which, modules, ema=ema)
        _train_as_it_ended(run_dir, modules)
    model = fit.components.get("model")
    return LoadedRun(record, loaded.module, loaded, cfg, model, dict(fit.components), fit, run_dir)


def _resolve_not_in_use(store: RunStore, ref: str, experiment: str | None) -> dict[str, Any]:
    """``store.resolve``, except that "last" skips, and an id refuses, a run this process is training
    or loading now: ``setup()`` loading "last" gets the run before its own, never itself."""
    in_use = runs_in_use()
    if ref == "last" and in_use:
        for candidate in store.list_runs(experiment=experiment):
            if candidate["id"] not in in_use:
                return store.get_run(candidate["id"])
        where = f" of experiment {experiment!r}" if experiment else ""
        raise RecipeError(f"load_run('last'): no run{where} other than the one being trained or loaded now "
                          f"({', '.join(in_use)}); train the run to load first, or name it by id")
    record = store.resolve(ref, experiment)
    if record["id"] in in_use:
        raise RecipeError(
            f"load_run({ref!r}) resolves to run {record['id']}, which this process is training or loading now "
            "(a setup() that loads its own run would never finish); name another run, e.g. "
            "ef.load_run('last', runs_dir=run.runs_dir, experiment='pretrain')"
        )
    return record


def _load_chosen_weights(record: dict[str, Any], run_dir: Path, which: str,
                         modules: dict[str, torch.nn.Module], *, ema: bool) -> None:
    weights = record.get("artifacts", {}).get(f"weights_{which}")
    if weights is not None and (run_dir / weights).is_file():
        load_weights(run_dir / weights, modules, ema=ema)
        return
    # The weights files are written when a run ends; a run still going, or killed, has checkpoints.
    folder = run_dir / "checkpoints" / "state"
    damaged: list[tuple[Path, str]] = []

    def skip(path: Path, problem: str) -> None:
        damaged.append((path, problem))

    found = newest_intact(folder, skip) if which == "last" else best_checkpoint(folder, skip)
    if found is None:
        raise RecipeError(_no_checkpoint(record["id"], which, folder, damaged))
    if damaged:  # as --resume does: an older file than the newest is used, and why is said
        print(f"run {record['id']}: {_damaged(damaged)}; its {which} weights come from {found[0].name}",
              file=sys.stderr, flush=True)
    load_checkpoint_weights(ResumeRecord.from_dict(found[1]), modules, found[0], best=which == "best", ema=ema)


def _train_as_it_ended(run_dir: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Which parameters train, as at the run's end (a frozen encoder comes back frozen, whatever
    froze it): from ``last.pt``, or from a run still going or killed, its newest intact checkpoint.
    Runs recorded before engineflow kept them get the flags their setup() and stages give."""
    flags = saved_flags(run_dir / "checkpoints" / "last.pt")
    if flags is None:
        found = newest_intact(run_dir / "checkpoints" / "state", lambda path, problem: None)
        flags = ResumeRecord.from_dict(found[1]).requires_grad if found is not None else None
    if flags:
        set_trainable(modules, flags, strict=False)


def _damaged(damaged: list[tuple[Path, str]]) -> str:
    if len(damaged) == 1:
        return f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]})"
    return "checkpoints " + ", ".join(f"{path} ({problem})" for path, problem in damaged) + " are damaged"


def _no_checkpoint(run_id: str, which: str, folder: Path, damaged: list[tuple[Path, str]]) -> str:
    """Why run ``run_id`` has no checkpoint to take its ``which`` weights from."""
    skipped = {path for path, _ in damaged}
    intact = [path for path in checkpoint_files(folder) if path not in skipped]
    if not damaged and not intact:
        return f"run {run_id} has no {which} weights; it ended before its first epoch completed"
    if not intact:
        return (f"run {run_id} has no {which} weights: every checkpoint is damaged ({_damaged(damaged)}); "
                "restore them from a copy, or train the run again")
    lost = f": {_damaged(damaged)}" if damaged else " (the files its newest intact checkpoint ranks best are gone)"
    return (f"run {run_id} has no intact checkpoint of its best epoch{lost}; "
            f"ef.load_run({run_id!r}, which='last') loads the newest intact one, {intact[-1].name}")


def _snapshot_recipe(record: dict[str, Any], path: Path) -> Recipe:
    """Import the recipe ``path`` of run ``record``'s snapshot, once :func:`checked_recipe` allowed it."""
    recipe_rel = record["code"]["files"][0]
    if not path.is_file():
        raise RecipeError(f"run {record['id']} has no code snapshot at {path}; it cannot be loaded as it was")
    # The snapshot's helper modules must win over today's copies that may already be imported.
    for rel in record["code"]["files"][1:]:
        name = Path(rel).relative_to(Path(recipe_rel).parent).with_suffix("").as_posix().replace("/", ".") \
            if Path(rel).is_relative_to(Path(recipe_rel).parent) else None
        if name:
            sys.modules.pop(name, None)
    return load_recipe(path)


def _latest_trained(store: RunStore, recipe: Recipe) -> tuple[dict[str, Any], str]:
    """The newest completed run of the recipe that is not a ``--check`` smoke run, and why it is the
    one: a run of every stage before a run of one stage alone (``--stage``), whatever their order."""
    alone = None
    for record in store.list_runs(experiment=recipe.name, status="completed"):
        if record.get("check"):
            continue
        if not record.get("start"):
            every = " that ran every stage" if recipe.stages else ""
            return store.get_run(record["id"]), f"the latest completed run of {recipe.name}{every}"
        alone = alone or record
    if alone is not None:
        started = alone["start"]
        origin = f" from run {started['from']}" if started.get("from") else ""
        return store.get_run(alone["id"]), (f"the latest completed run of {recipe.name}, which ran stage "
                                            f"{started['stage']} alone{origin}: no run of every stage completed")
    raise RecipeError(
        f"no completed run of {recipe.name!r} yet; train it with 'engineflow run {recipe.path}', "
        f"or pick a run with {option('run', 'ID')} ({option('check')} runs are not used unless named)"
    )


def select_run(
    recipe_path: str | Path,
    *,
    ref: str | None,
    ignore_changes: bool,
    runs_dir: str | Path | None,
    device: str = "cpu",
    which: str = "best",
    trust_code: bool = False,
    announce: Callable[[dict[str, Any], str], None] | None = None,
) -> LoadedRun:
    """The run ``test``/``eval`` use (see the module docstring); refuses when the code changed.

    ``trust_code``: for ``ref`` an id, import its snapshot as :func:`load_run` does with it.
    ``announce``: told the chosen run's record and why it is the one, before it is loaded.
    """
    from engineflow.record.runs import resolve_runs_dir

    recipe = load_recipe(recipe_path)
    root = resolve_runs_dir(runs_dir)
    with RunStore.open(root) as store:
        if ref is None:
            record, why = _latest_trained(store, recipe)
        else:
            record = store.resolve(ref, recipe.name)
            why = f"the latest run of {recipe.name}" if ref == "last" else option("run", ref)
    if announce is not None:
        announce(record, why)
    if ref is not None and ref != "last":
        return load_run(record["id"], runs_dir=root, which=which, device=device, trust_code=trust_code)
    today = capture(recipe.path).source
    if today != record["code"]["source"] and not ignore_changes:
        raise RecipeError(
            f"the code of {recipe.path.name} changed since run {record['id']} ({record['run_dir']}). "
            f"Train it again with 'engineflow run', pass {option('ignore_changes')} to use today's code with that "
            f"run's weights, or {option('run', 'ID')} to use that run's own code."
        )
    return load_run(record["id"], runs_dir=root, which=which, device=device, recipe=recipe.path)
