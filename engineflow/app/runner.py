"""``ef.run``: a recipe file in, a trained model and its record out.

``run`` starts the processes (``nproc``, see :mod:`engineflow.app.launch`) and, in each, the run
(:func:`engineflow.app.training.run_in_world`). A launcher imports neither torch nor the engines:
its processes start sooner.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from engineflow.app.launch import distributed_env, launch, process_group
from engineflow.app.run_result import RunResult
from engineflow.app.workers import check_nproc
from engineflow.errors import RecipeError
from engineflow.naming import option
from engineflow.state.time_limit import parse_duration


def run(
    recipe: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    check: bool = False,
    device: str = "auto",
    seed: int | None = None,
    runs_dir: str | Path | None = None,
    progress: bool | None = None,
    stream: IO[str] | None = None,
    force: bool = False,
    retrain: bool = False,
    resume: str | None = None,
    ignore_changes: bool = False,
    checkpoint_every: int | None = None,
    stage: str | None = None,
    from_run: str | None = None,
    mlflow: str | bool | None = None,
    deterministic: bool | None = None,
    precision: str | None = None,
    nproc: int | None = None,
    oversubscribe: bool = False,
    time_limit: float | str | None = None,
) -> RunResult:
    """Train a recipe and record the run; the Python twin of ``engineflow run``.

    Args:
        recipe: path of the recipe file.
        overrides: config values to change, as values or strings (``{"lr": "0.1"}``).
        check: smoke run: 2 batches of each loader for 2 epochs.
        device: "auto", "cpu" or "cuda".
        seed: overrides the config's ``seed`` (default: the config's, else 0).
        runs_dir: where run folders and the store go (default ``$ENGINEFLOW_RUNS_DIR`` or ``./runs``).
        progress: live progress bar (default: when the output is a terminal).
        stream: where progress and the summary are printed (default: stdout).
        force: train even if a completed run already has this code and config.
        retrain: train that completed run again as a new run, which replaces it once it completes.
        resume: continue run "last", "auto" or an id from its latest valid checkpoint (same run id); see
            :func:`engineflow.app.session.find_resumable`.
        ignore_changes: with ``resume``, continue even if the recipe's code or config changed.
        checkpoint_every: write a checkpoint every N iterations instead of the recipe's policy.
        stage: a recipe with stages: run only this stage, as a new run.
        from_run: with ``stage``: the run ("last", an id) whose state at the start of that stage this
            run starts from (its components as that run's previous train stage left them).
        mlflow: mirror the run to this MLflow tracking URI (over the recipe's ``mlflow`` setting; a
            resumed run keeps its own); False: no mirror. See :mod:`engineflow.record.mirror`.
        deterministic: ``torch.use_deterministic_algorithms(True)`` while the run trains (on CUDA, what
            makes a resume on one GPU exact; see :func:`engineflow.runtime.deterministic_algorithms`);
            recorded in ``run.json``. A resumed run keeps its own (None); True on a run started without
            it is refused.
        precision: "32", "bf16" or "fp16": every train stage's precision, over what its step and stage
            declare (see :func:`engineflow.train_step`); recorded in ``run.json``. A resumed run keeps its
            own; another one is refused.
        nproc: train on this many local processes (data parallel, see :mod:`engineflow.app.launch`);
            None or 1: this process. Under ``torchrun`` every process is already one of them. More
            processes than the machine has CPUs (GPUs on CUDA) are refused unless ``oversubscribe``.
        oversubscribe: start ``nproc`` processes even if they are more than the CPUs (GPUs).
        time_limit: stop cleanly once this much time has passed (seconds, or ``"2h"``, ``"30m"``,
            ``"90s"``, ``"1h30m"``): a checkpoint at the end of the iteration, status
            "interrupted", the result returned; ``resume`` continues it (see
            :mod:`engineflow.state.time_limit`).

    Returns:
        the :class:`RunResult`; the run's record is in ``<run_dir>/run.json`` and the store.

    Raises:
        RecipeError: a bad recipe or override, a repeat of a completed run, a resume of changed
            code (CLI exit code 2).
        TrainingError: training failed, e.g. the loss became NaN (CLI exit code 1).

    Example:
        >>> import io, tempfile
        >>> import engineflow as ef
        >>> result = ef.run("recipes/sine.py", {"epochs": 2, "samples": 64}, device="cpu",
        ...                 runs_dir=tempfile.mkdtemp(), stream=io.StringIO())  # the summary goes to stream
        >>> result.status, result.epochs, result.best["metric"], result.best["mode"]
        ('completed', 2, 'valid/mse', 'min')
        >>> (result.run_dir / "run.json").is_file(), (result.run_dir / "checkpoints" / "last.pt").is_file()
        (True, True)
    """

    if isinstance(mlflow, str) and mlflow.strip():  # a mistyped URI: refused before anything is made
        from engineflow.record.mirror import check_uri

        check_uri(mlflow.strip())
    if precision is not None:
        from engineflow.declare.step_options import PRECISIONS, precision_value

        if precision_value(precision) is None:
            raise RecipeError(f"run(precision={precision!r}): expected one of {', '.join(map(repr, PRECISIONS))}")
        precision = precision_value(precision)
    if ignore_changes and resume is None:
        raise RecipeError(f"{option('ignore_changes')} goes with {option('resume', 'RUN')}: it continues a run whose "
                          "code or config changed since (a new run always uses today's). Drop it, or add "
                          f"{option('resume', 'last')}")
    limit = None if time_limit is None else parse_duration(time_limit, what="ef.run(time_limit=...)")
    if nproc is not None and not distributed_env():
        check_nproc(nproc, device, oversubscribe=oversubscribe)
    if nproc is not None and nproc > 1 and not distributed_env():
        kwargs = dict(recipe=str(recipe), overrides=dict(overrides or {}), check=check, device=device, seed=seed,
                      runs_dir=None if runs_dir is None else str(runs_dir), progress=progress, force=force,
                      retrain=retrain, resume=resume, ignore_changes=ignore_changes,
                      checkpoint_every=checkpoint_every, stage=stage, from_run=from_run, mlflow=mlflow,
                      deterministic=deterministic, time_limit=limit,
                      precision=precision)
        done = launch("run", kwargs, nproc, runs_dir=runs_dir, stream=stream)
        return RunResult(**{**done, "run_dir": Path(done["run_dir"])})
    from engineflow.app.training import run_in_world  # torch and the engines: not in a launcher

    with process_group(device) as world:
        return run_in_world(recipe, overrides, world, check=check, device=device, seed=seed, runs_dir=runs_dir,
                            progress=progress, stream=stream, force=force, retrain=retrain, resume=resume,
                            ignore_changes=ignore_changes, checkpoint_every=checkpoint_every, stage=stage,
                            from_run=from_run, mlflow=mlflow, deterministic=deterministic, time_limit=limit,
                            precision=precision)
