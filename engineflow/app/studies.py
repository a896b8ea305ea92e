"""Optuna's side of a sweep: storages, samplers, pruners, and which trial a worker runs next.

Every module of engineflow that touches Optuna goes through this one; nothing imports it but the
``sweep`` command, :func:`engineflow.sweep` and a sweep's trials, so ``import engineflow`` and the
other commands never import Optuna.

**Exactly N trials.** The worker that creates a study (creation is atomic in every storage: a
second creator gets Optuna's ``DuplicatedStudyError``) adds N trials in state WAITING without
parameters; a worker takes one by moving it to RUNNING, which the storage does for one worker only,
and samples its parameters then. No worker ever creates a trial otherwise, so the study never holds
more than N trials, whatever the number of workers, local or on other machines.

Checked against Optuna 5.0 (``study._storage`` and ``study._study_id``, the study's handles on its
storage, are the only private names used).

**A worker that died.** A RUNNING trial records its worker's host and pid. A worker on the same
host that finds that process gone takes the trial over (under a lock in the runs folder, so one
worker does) and continues its run from its checkpoint with the same parameters.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from engineflow.declare.search import Choice, Integer, Range, Uniform
from engineflow.errors import RecipeError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
PRUNERS = ("median", "hyperband", "successive-halving", "none")
PLANNED = "engineflow.trials"  # the study's user attribute: how many trials it is to hold
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)



def quiet() -> None:
    """Optuna's own log lines off (a sweep prints one line per trial); called by the sweep command only."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(storage: str | None, runs_dir: Path) -> str:
    """The storage's URL: the one given, else Optuna's journal file ``<runs>/sweeps.log`` (made with the runs
    folder), which kept up better than SQLite under several local workers (``benchmarks/README.md``)."""
    if storage:
        return storage
    runs_dir.mkdir(parents=True, exist_ok=True)
    return f"journal:///{(runs_dir / 'sweeps.log').resolve()}"


def open_storage(url: str) -> Any:
    """Optuna's storage for ``url``: RDB (``sqlite:///``, ``postgresql://``, ``mysql://``), or a journal
    file (``journal:///path``). SQLite waits for its lock instead of failing at once under several workers."""
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    if "://" not in url:
        raise RecipeError(f"--storage expects an Optuna storage URL (sqlite:///sweeps.db, postgresql://USER@HOST/DB, "
                          f"journal:///path/journal.log), got {url!r}")
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError):
            # workers that start together all create Optuna's tables in a new database; one wins, the others
            # read the tables it made
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def sampler_for(name: str | Any, seed: int, number: int, space: Mapping[str, Range] | None) -> Any:
    """The sampler that samples trial ``number``, seeded from (``seed``, ``number``) so that workers
    never draw alike and a sweep is repeatable; QMC keeps ``seed`` (it indexes its sequence by trial)."""
    if not isinstance(name, str):
        return name
    mixed = trial_seed(seed, number)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=mixed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=mixed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=mixed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "grid":
        if space is None:
            raise RecipeError("--sampler grid needs a space dict of ef.search.choice/integer ranges, not a function")
        return _Grid(grid_of(space), seed=mixed)
    raise RecipeError(f"--sampler expects one of {', '.join(SAMPLERS)}, got {name!r}")


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is spent, which only works
    inside ``study.optimize``: a sweep stops at its number of trials (a spent grid is sampled again)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def grid_of(space: Mapping[str, Range]) -> dict[str, list[Any]]:
    """The grid a space spans: every value of each choice and integer range."""
    grid: dict[str, list[Any]] = {}
    for key, value in space.items():
        if isinstance(value, Choice):
            grid[key] = list(value.values)
        elif isinstance(value, Integer):
            grid[key] = list(range(value.low, value.high + 1, value.step))
        else:
            raise RecipeError(f"--sampler grid needs countable ranges; space key {key!r} is {value!r}: use "
                              "ef.search.choice or ef.search.integer, or another sampler")
    return grid


def pruner_for(name: str | Any) -> Any:
    """Optuna's pruner by name (Optuna's defaults), or a pruner object as given."""
    if not isinstance(name, str):
        return name
    made = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "successive-halving": optuna.pruners.SuccessiveHalvingPruner, "none": optuna.pruners.NopPruner}
    if name not in made:
        raise RecipeError(f"--pruner expects one of {', '.join(PRUNERS)}, got {name!r}")
    return made[name]()


def trial_seed(seed: int, number: int) -> int:
    """Trial ``number``'s seed in a sweep of seed ``seed`` (a run's seed, below 2**31).

    Example:
        >>> trial_seed(0, 3) == trial_seed(0, 3), trial_seed(0, 3) != trial_seed(1, 3)
        (True, True)
    """
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0] % 2**31)


def open_study(url: str, name: str, *, direction: str, trials: int, pruner: str | Any = "median") -> Any:
    """The study ``name`` in ``url``, created with ``trials`` WAITING trials if new; an existing one
    grows to ``trials`` when it planned fewer (one worker at a time should grow a study)."""
    storage = open_storage(url)
    wanted = "maximize" if direction == "max" else "minimize"
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=wanted, pruner=pruner_for(pruner))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner_for(pruner))
        created = False
        if study.direction.name.lower() != wanted:
            raise RecipeError(f"study {name!r} in {url} maximizes/minimizes the other way "
                              f"({study.direction.name.lower()}); drop --direction or name another --study") from None
    planned = study.user_attrs.get(PLANNED)
    if created or (planned is not None and trials > planned):
        _add_waiting(study, trials - (planned or 0))
        study.set_user_attr(PLANNED, trials)
    elif planned is None:  # created by another worker that has not added its trials yet
        deadline = time.monotonic() + 60
        while study.user_attrs.get(PLANNED) is None and time.monotonic() < deadline:
            time.sleep(0.2)
    return study


def _add_waiting(study: Any, count: int) -> None:
    storage, study_id = study._storage, study._study_id
    for _ in range(max(count, 0)):
        storage.create_new_trial(study_id, template_trial=optuna.trial.create_trial(state=TrialState.WAITING))


@dataclass
class Claimed:
    """A trial this worker runs: Optuna's trial, and the run to continue when it was another worker's."""

    trial: Any
    number: int
    params: dict[str, Any] | None  # known when continued (the config values it ran with); None: to be sampled
    run_id: str | None


@contextlib.contextmanager
def _host_lock(runs_dir: Path, study: str) -> Iterator[None]:
    folder = runs_dir / ".sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{study}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(study: Any, runs_dir: Path, sampler_of: Callable[[int], Any]) -> Claimed | None:
    """The next trial for this worker: one whose worker on this host died (continued), else a WAITING one
    (moved to RUNNING by this worker alone); None when every trial is taken. ``sampler_of(number)``
    is the sampler that samples trial ``number``."""
    storage, study_id = study._storage, study._study_id
    host, pid = socket.gethostname(), os.getpid()
    with _host_lock(runs_dir, study.study_name):
        for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = frozen.user_attrs
            # this very process: a sweep interrupted earlier in it (ef.sweep from Python after a Ctrl-C)
            if attrs.get("host") != host or (attrs.get("pid") != pid and _alive(attrs.get("pid"))):
                continue
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            # read again now that its worker is known dead: it may have finished the trial before it ended
            if storage.get_trial(trial_id).state != TrialState.RUNNING:
                continue
            storage.set_trial_user_attr(trial_id, "pid", pid)
            study.sampler = sampler_of(frozen.number)
            known = attrs.get("values", frozen.params)  # what the dead worker ran: its config values
            return Claimed(optuna.trial.Trial(study, trial_id), frozen.number, dict(known) or None,
                           attrs.get("run_id"))
        for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                storage.set_trial_user_attr(trial_id, "host", host)
                storage.set_trial_user_attr(trial_id, "pid", pid)
                study.sampler = sampler_of(frozen.number)
                return Claimed(optuna.trial.Trial(study, trial_id), frozen.number, None, None)
    return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def suggest(trial: Any, space: Mapping[str, Range] | Callable[[Any], Mapping[str, Any]]) -> dict[str, Any]:
    """The trial's parameters: each range suggested by its key, or what ``space(trial)`` returns."""
    if callable(space):
        return dict(space(trial))
    params: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, Uniform):
            params[key] = trial.suggest_float(key, value.low, value.high, log=value.log)
        elif isinstance(value, Integer):
            params[key] = trial.suggest_int(key, value.low, value.high, step=value.step, log=value.log)
        else:
            params[key] = trial.suggest_categorical(key, list(value.values))
    return params


def finish(study: Any, number: int, state: str, value: float | None) -> None:
    """Tell the study how trial ``number`` ended: "complete" (with ``value``), "pruned" or "failed"."""
    states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
    if state == "complete" and (value is None or not math.isfinite(value)):
        state = "failed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns when a failed trial carries no value
        study.tell(number, value if state == "complete" else None, state=states[state], skip_if_finished=True)


def counts(study: Any) -> tuple[int, int]:
    """(finished trials, trials not finished yet) of the study."""
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in FINISHED for t in trials)
    return done, len(trials) - done


def report(trial: Any, value: float, step: int) -> bool:
    """Report an epoch's value to the trial; whether its pruner says stop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resumed epoch already reported: Optuna keeps the first value
        trial.report(value, step)
    return bool(trial.should_prune())


def load(url: str, name: str | None) -> Any:
    """An existing study (the only one of the storage when ``name`` is None).

    Raises:
        RecipeError: no such study (one line naming those there are).
    """
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise RecipeError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
        name = names[0]
    if name not in names:
        raise RecipeError(f"no study {name!r} in {url}; it holds {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def summary(study: Any) -> dict[str, Any]:
    """The study as ``sweep show --json`` prints it."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        trials.append({"number": t.number, "state": STATES.get(t.state, t.state.name.lower()), "params": t.params,
                       "value": t.value if t.state == TrialState.COMPLETE else t.intermediate_values.get(
                           max(t.intermediate_values), None) if t.intermediate_values else None,
                       "epochs": len(t.intermediate_values), "run_id": t.user_attrs.get("run_id")})
    best = None
    with contextlib.suppress(ValueError):
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_id": b.user_attrs.get("run_id")}
    return {"study": study.study_name, "direction": "max" if study.direction.name == "MAXIMIZE" else "min",
            "metric": study.user_attrs.get("engineflow.metric"), "best": best, "trials": trials}


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances (empty with fewer than two complete trials or one parameter value)."""
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def plot(study: Any, out: Path) -> None:
    """The optimization history, the parameters against the value, and the importances, one figure.

    Raises:
        RecipeError: matplotlib is not installed (the plot extra), or the study has no finished trial.
    """
    try:
        import matplotlib
    except ImportError:
        raise RecipeError("sweep plot needs matplotlib: pip install 'engineflow[plot]'") from None
    if not any(t.state in FINISHED for t in study.get_trials(deepcopy=False)):
        raise RecipeError(f"study {study.study_name!r} has no finished trial to plot yet")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figures = [ovm.plot_optimization_history(study).figure, ovm.plot_slice(study)]
        if importances(study):
            figures.append(ovm.plot_param_importances(study).figure)
    pages = []
    for item in figures:
        fig = item.figure if hasattr(item, "figure") and not hasattr(item, "savefig") else item
        if hasattr(fig, "__len__"):  # plot_slice returns one axis per parameter
            fig = fig[0].figure
        fig.canvas.draw()
        pages.append(np.asarray(fig.canvas.buffer_rgba()))
        plt.close(fig)
    width = max(p.shape[1] for p in pages)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pages]
    plt.imsave(out, np.concatenate(padded, axis=0))


def trial_handle(sweep: Mapping[str, Any]) -> Any:
    """Optuna's trial a trial's run reports to: the one the worker holds (same process), else trial
    ``sweep["trial"]`` of ``sweep["study"]`` opened from its storage (a run on several processes)."""
    if sweep.get("handle") is not None:
        return sweep["handle"]
    storage = open_storage(sweep["storage"])
    study = optuna.load_study(study_name=sweep["study"], storage=storage, pruner=pruner_for(sweep["pruner"]))
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, sweep["trial"])
    return optuna.trial.Trial(study, trial_id)
