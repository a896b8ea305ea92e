"""``engineflow sweep`` / ``ef.sweep``: many trials of one recipe over its search space, on Optuna.

Every trial is a recorded run (:func:`engineflow.app.training.run_in_world`) of the recipe with the
trial's parameters over its config, seeded from (the sweep's seed, the trial's number), its main
metric reported to the trial after every epoch (:mod:`engineflow.app.pruning`). How trials are
handed out, exactly N of them, and how a dead worker's trial is continued: :mod:`engineflow.app.studies`.

A worker's loop::

    open or create the study (N WAITING trials when new)
    until no trial is left to take (or --timeout passed):
        take a trial: one whose worker on this host died, else a WAITING one
        its parameters: the dead worker's, else sampled now (seeded from the sweep's seed and its number)
        run it: the dead worker's run resumed from its checkpoint, else a new run
        tell the study: complete (the run's best value), pruned, or failed (the sweep goes on)
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engineflow.app.launch import launch, process_group
from engineflow.app.report import format_value
from engineflow.declare.configuration import flatten
from engineflow.declare.recipe import Recipe, load_recipe
from engineflow.declare.search import Range, check_space, parse_range, space_values
from engineflow.errors import EngineflowError, RecipeError
from engineflow.naming import option
from engineflow.record.runs import resolve_runs_dir
from engineflow.state.best import infer_mode


@dataclass
class SweepSpec:
    """What every worker of a sweep runs (picklable, for ``jobs`` > 1)."""

    recipe: str
    trials: int
    study: str
    storage: str
    runs_dir: str
    direction: str
    metric: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, str] = field(default_factory=dict)  # --space KEY=RANGE, as given
    sampler: Any = "tpe"
    pruner: Any = "median"
    seed: int = 0
    timeout: float | None = None
    nproc: int | None = None
    device: str = "auto"


def sweep(recipe: str | Path, trials: int, *, study: str | None = None, storage: str | None = None, jobs: int = 1,
          nproc: int | None = None, sampler: str | Any = "tpe", pruner: str | Any = "median",
          direction: str | None = None, overrides: Mapping[str, Any] | None = None,
          space: Mapping[str, str] | None = None, seed: int = 0, timeout: float | None = None,
          runs_dir: str | Path | None = None, device: str = "auto", resume: bool = False,
          stream: IO[str] | None = None) -> dict[str, Any]:
    """Run a sweep of ``recipe`` until its study holds ``trials`` finished trials; the Python twin of
    ``engineflow sweep``.

    Args:
        recipe: path of a recipe that declares ``space``.
        trials: how many trials the study holds once done (complete, pruned and failed alike).
        study: the study's name (default: the recipe's experiment).
        storage: Optuna's storage URL (default: the journal file ``<runs>/sweeps.log``); ``postgresql://...``
            for workers on several machines; ``sqlite:///sweeps.db`` for SQLite.
        jobs: trials at once, each in a process of its own.
        nproc: processes per trial (data parallel).
        sampler: "tpe", "random", "grid", "cmaes", "qmc", or an Optuna sampler (``jobs`` 1).
        pruner: "median", "hyperband", "successive-halving", "none", or an Optuna pruner.
        direction: "max" or "min" (default: the main metric's mode).
        overrides: config values every trial gets (``--set``).
        space: entries that replace the recipe's (``{"lr": "loguniform(1e-3, 1)"}``).
        seed: the sweep's seed: trial seeds and samplers are drawn from it and the trial's number.
        timeout: seconds after which no new trial starts.
        runs_dir: where the trials' runs go.
        device: "auto", "cpu" or "cuda".
        resume: continue an existing study (refused when there is none); the same call without it does too.
        stream: where the trial lines go (default: stdout).

    Returns:
        the study as ``engineflow sweep show --json`` prints it.

    Raises:
        RecipeError: no space, a bad space, a bad option (CLI exit code 2).

    Example:
        >>> import io, tempfile
        >>> import engineflow as ef
        >>> done = ef.sweep("recipes/digits.py", 2, overrides={"epochs": 1}, runs_dir=tempfile.mkdtemp(),
        ...                 device="cpu", stream=io.StringIO())
        >>> done["study"], done["direction"], done["metric"], [t["state"] for t in done["trials"]]
        ('digits', 'max', 'valid/accuracy', ['complete', 'complete'])
        >>> done["best"]["value"] == max(t["value"] for t in done["trials"])
        True
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise RecipeError(f"{option('trials', 'N')} expects a whole number >= 1, got {trials!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise RecipeError(f"{option('jobs', 'J')} expects a whole number >= 1, got {jobs!r}")
    if direction not in (None, "max", "min"):
        raise RecipeError(f"{option('direction', 'max|min')} expects max or min, got {direction!r}")
    loaded = load_recipe(recipe)
    cfg = loaded.config.override(dict(overrides or {}))  # a bad --set is reported before anything starts
    checked = space_of(loaded, dict(space or {}))
    metric, mode = main_metric(loaded)
    folder = resolve_runs_dir(runs_dir)
    studies = optuna_studies()
    studies.quiet()
    # a sampler or pruner that cannot be made (grid over a float range) is refused before the study exists
    studies.sampler_for(sampler, seed, 0, checked if isinstance(checked, dict) else None)
    studies.pruner_for(pruner)
    url = studies.storage_url(storage, folder)
    name = study or loaded.name
    if resume:
        studies.load(url, name)  # refused, naming the studies there are, when there is none
    spec = SweepSpec(str(Path(recipe).resolve()), trials, name, url, str(folder), direction or mode, metric,
                     {k: v for k, v in flatten(cfg.to_dict()).items() if k in (overrides or {})},
                     dict(space or {}), sampler, pruner, seed, timeout, nproc, device)
    out = stream if stream is not None else _stdout()
    if jobs == 1:
        work(spec, out)
    else:
        if not (isinstance(sampler, str) and isinstance(pruner, str)):
            raise RecipeError("jobs > 1 takes the sampler and pruner by name (each job is a process of its own)")
        studies.open_study(url, name, direction=spec.direction, trials=trials, pruner=pruner)  # one creator
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_work_in_process, args=(spec,)) for _ in range(jobs)]
        for process in workers:
            process.start()
        for process in workers:
            process.join()
        failed = [p.exitcode for p in workers if p.exitcode]
        if failed:
            raise EngineflowError(f"{len(failed)} of {jobs} sweep jobs failed (exit codes {failed}); run the same "
                                  "command again to continue the study")
    done = studies.summary(studies.load(url, name))
    best = done["best"]
    if best is not None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in best["params"].items())
        out.write(f"best trial {best['number']} (run {best['run_id']}): {metric} = {format_value(best['value'])}; "
                  f"{params}\n")
    out.flush()
    return done


def _stdout() -> IO[str]:
    import sys

    return sys.stdout


def optuna_studies() -> Any:
    """:mod:`engineflow.app.studies`, which needs Optuna (the sweep extra).

    Raises:
        RecipeError: Optuna is not installed (one line naming the extra).
    """
    try:
        from engineflow.app import studies
    except ModuleNotFoundError as err:
        if err.name != "optuna":
            raise
        raise RecipeError("engineflow sweep needs Optuna: pip install 'engineflow[sweep]'") from None
    return studies


def space_of(loaded: Recipe, given: Mapping[str, str]) -> dict[str, Range] | Callable[[Any], Mapping[str, Any]]:
    """The recipe's checked space with ``given`` entries (``--space KEY=RANGE``) over its own.

    Raises:
        RecipeError: no ``space``, a bad one, or ``--space`` over a function space.
    """
    where = str(loaded.path)
    declared = getattr(loaded.module, "space", None)
    if declared is None and not given:
        raise RecipeError(f"{where} declares no search space: add space = {{'lr': ef.search.loguniform(1e-4, 1.0)}} "
                          "(config keys to ef.search ranges) at its top level, or give --space KEY=RANGE")
    if callable(declared):
        if given:
            raise RecipeError(f"{where}: space is a function of the trial, which --space cannot change; edit it")
        return declared
    entries = dict(declared or {}) if isinstance(declared, Mapping) else declared
    if isinstance(entries, dict):
        entries.update({key: parse_range(text) for key, text in given.items()})
    return check_space(entries, loaded.config, where=where)


def main_metric(loaded: Recipe) -> tuple[str | None, str]:
    """The recipe's main metric as its eval step declares it, and its mode (the last train stage's
    in a pipeline); the metric is None when only the built recipe knows it (the first metric's name
    on the first validation loader), and the mode then ``max`` unless the metric's name says otherwise."""
    spec = loaded.steps.get("eval")
    for stage in reversed(loaded.stages):
        if stage.kind == "train" and stage.eval is not None:
            spec = stage.eval
            break
    if spec is None:
        return None, "max"
    metric = spec.main_metric
    if metric is None and spec.metrics:
        metric = f"valid/{next(iter(spec.metrics))}"
    mode = spec.mode or (infer_mode(metric) if metric else "max")
    return metric, mode


def _work_in_process(spec: SweepSpec) -> None:
    from engineflow.app import studies

    studies.quiet()
    work(spec, _stdout())


def work(spec: SweepSpec, out: IO[str]) -> None:
    """One worker: take trials from the study and run them until none is left (see the module)."""
    from engineflow.app import studies

    loaded = load_recipe(spec.recipe)
    space = space_of(loaded, spec.space)
    fixed = space if isinstance(space, dict) else None
    study = studies.open_study(spec.storage, spec.study, direction=spec.direction, trials=spec.trials,
                               pruner=spec.pruner)
    if spec.metric is not None and study.user_attrs.get("engineflow.metric") is None:
        study.set_user_attr("engineflow.metric", spec.metric)
    uri = _mirror_uri(loaded)
    parent = None
    if uri is not None:  # the recipe mirrors its runs: the trials nest under one MLflow run of the study
        from engineflow.record.push import sweep_parent

        parent = sweep_parent(uri, loaded.name, spec.study)
    started = time.monotonic()
    runs_dir = Path(spec.runs_dir)
    while spec.timeout is None or time.monotonic() - started < spec.timeout:
        claimed = studies.claim(study, runs_dir,
                                lambda number: studies.sampler_for(spec.sampler, spec.seed, number, fixed))
        if claimed is None:
            break
        _trial(spec, loaded, study, claimed, space, out, parent)
    if parent is not None and studies.counts(study)[1] == 0:
        from engineflow.record.push import end_sweep_parent

        end_sweep_parent(uri, parent)


def _mirror_uri(loaded: Recipe) -> str | None:
    """The MLflow URI the recipe's runs mirror to (its ``mlflow`` setting), when MLflow is installed."""
    import importlib.util
    from types import ModuleType

    from engineflow.record.mirror import RECIPE_SETTING, mirror_uri

    setting = getattr(loaded.module, RECIPE_SETTING, None)
    uri = mirror_uri(None, None if isinstance(setting, ModuleType) else setting)
    return uri if uri is not None and importlib.util.find_spec("mlflow") is not None else None


def _trial(spec: SweepSpec, loaded: Recipe, study: Any, claimed: Any, space: Any, out: IO[str],
           parent: str | None) -> None:
    """Run one trial to its end and tell the study; a bad recipe (exit 2) fails the trial and stops the sweep."""
    from engineflow.app import studies

    number = claimed.number
    run_id = claimed.run_id or _run_of(spec, number)
    try:
        params = claimed.params if claimed.params is not None else studies.suggest(claimed.trial, space)
        values = _checked(params, loaded)
        claimed.trial.set_user_attr("values", values)  # a worker that takes the trial over runs these
        claimed.trial.set_user_attr("seed", studies.trial_seed(spec.seed, number))
        ended = _ended(spec, run_id)
        if ended is None:
            ended = _run(spec, claimed, values, run_id, parent)
    except RecipeError:
        studies.finish(study, number, "failed", None)
        raise
    except KeyboardInterrupt:
        raise  # the trial stays RUNNING: the same command continues it from its checkpoint
    except Exception as err:  # a failed trial (NaN, an exception in the recipe): recorded, the sweep goes on
        run_id = run_id or _run_of(spec, number)
        if run_id:
            claimed.trial.set_user_attr("run_id", run_id)
        studies.finish(study, number, "failed", None)
        out.write(f"trial {number}: failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})\n")
        out.flush()
        return
    state, value, run_id, epochs = ended
    claimed.trial.set_user_attr("run_id", run_id)
    studies.finish(study, number, state, value)
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in values.items())
    out.write(f"trial {number} (run {run_id}): {state}, {spec.metric or 'value'} = {format_value(value)} after "
              f"{epochs} epoch{'s' if epochs != 1 else ''}; {shown}\n")
    out.flush()


def _checked(params: Mapping[str, Any], loaded: Recipe) -> dict[str, Any]:
    """A trial's parameters as config values; a key the config does not declare is a bad space."""
    keys = flatten(loaded.config.to_dict())
    unknown = [k for k in params if k not in keys]
    if unknown:
        raise RecipeError(f"{loaded.path}: space(trial) returned {unknown[0]!r}, which is not a config key; the config "
                          f"declares {', '.join(keys) or 'nothing'}")
    return space_values(params, loaded.config)


def _run_of(spec: SweepSpec, number: int) -> str | None:
    """The run of trial ``number`` in this runs folder, if one was recorded (a worker died during it)."""
    from engineflow.record.runs import list_runs

    for record in list_runs(spec.runs_dir):
        tag = record.get("sweep") or {}
        if tag.get("study") == spec.study and tag.get("trial") == number:
            return record["id"]
    return None


def _ended(spec: SweepSpec, run_id: str | None) -> tuple[str, float | None, str, int] | None:
    """How trial's run ended, when it did before its worker could tell the study; None: to run (on)."""
    if run_id is None:
        return None
    from engineflow.record.runs import get_run

    record = get_run(spec.runs_dir, run_id)
    state = {"completed": "complete", "pruned": "pruned", "failed": "failed"}.get(record["status"])
    if state is None:
        return None
    return state, (record.get("best") or {}).get("value"), run_id, record.get("epochs") or 0


def _run(spec: SweepSpec, claimed: Any, values: Mapping[str, Any], run_id: str | None, parent: str | None
         ) -> tuple[str, float | None, str, int]:
    """Train the trial's run (resumed when ``run_id`` is set); (state, value, run id, epochs)."""
    from engineflow.app import studies

    tag = {"study": spec.study, "trial": claimed.number, "params": dict(values), "storage": spec.storage,
           "pruner": spec.pruner if isinstance(spec.pruner, str) else "median", "mlflow_parent": parent}
    kwargs = dict(recipe=spec.recipe, overrides={**spec.overrides, **values}, check=False, device=spec.device,
                  seed=studies.trial_seed(spec.seed, claimed.number), runs_dir=spec.runs_dir, progress=False,
                  force=run_id is None, retrain=False, resume=run_id, ignore_changes=False, checkpoint_every=None,
                  stage=None, from_run=None, mlflow=None, deterministic=None, time_limit=None, precision=None)
    if spec.nproc is not None and spec.nproc > 1:
        if not isinstance(spec.pruner, str):
            raise RecipeError("a sweep with nproc > 1 takes its pruner by name (each rank 0 opens the study)")
        with open(os.devnull, "w") as quiet:
            done = launch("trial", {**kwargs, "sweep": tag}, spec.nproc, runs_dir=spec.runs_dir, stream=quiet)
        status, best, run_id, epochs = done["status"], done["best"], done["run_id"], done["epochs"]
    else:
        from engineflow.app.training import run_in_world

        with process_group(spec.device) as world:
            result = run_in_world(world=world, stream=io.StringIO(), **kwargs,  # type: ignore[arg-type]
                                  sweep={**tag, "handle": claimed.trial})
        status, best, run_id, epochs = result.status, result.best, result.run_id, result.epochs
    state = {"completed": "complete", "pruned": "pruned"}.get(status, "failed")
    return state, (best or {}).get("value"), run_id, epochs


def run_trial(**kwargs: Any) -> dict[str, Any]:
    """A trial's run in one process of its ``--nproc`` launch (see :mod:`engineflow.app.launched`)."""
    from engineflow.app.training import run_in_world

    with process_group(kwargs["device"]) as world:
        return run_in_world(world=world, stream=None, **kwargs).to_dict()
