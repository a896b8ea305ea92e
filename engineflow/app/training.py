"""A run in this process, one of a world of processes: plan it, build it, train it, record it.

:func:`run_in_world` is :func:`engineflow.app.runner.run` once the processes exist: rank 0 plans a
recorded session (:mod:`engineflow.app.session`), builds the recipe
(:func:`engineflow.execute.build.build_pipeline`), records the run once it can start, trains with
the reporter, the recorder and the checkpointer attached, and marks how it ended; the other ranks
follow its plan. What the run folder holds is described in :mod:`engineflow.record.recorder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from engineflow.app.interrupts import Interrupts
from engineflow.app.launch import note_run
from engineflow.app.report import Reporter, format_duration, format_metrics, format_model, format_value, plural
from engineflow.app.run_result import RunResult
from engineflow.app.session import Session, exact_resume, find_resumable, new_session, resume_session
from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.recipe import Recipe, load_recipe
from engineflow.errors import RecipeError, TimeLimitReached
from engineflow.execute.build import build_pipeline, resolve_config
from engineflow.execute.fit import Fit
from engineflow.execute.inspection import model_summary
from engineflow.execute.notes import add_note
from engineflow.execute.parallel import ONE_PROCESS, World, max_over_ranks, share_json
from engineflow.execute.pipeline import Pipeline
from engineflow.naming import option
from engineflow.record.mirror import mirror_for
from engineflow.record.runs import resolve_runs_dir
from engineflow.record.setups import claim, release
from engineflow.runtime import deterministic_algorithms, using_run
from engineflow.state.checkpoint_files import load_record, verify
from engineflow.state.checkpointer import Checkpointer, every_iterations_policy, policy_of
from engineflow.state.resume import ResumeRecord
from engineflow.state.time_limit import TimeLimit


def run_in_world(recipe: str | Path, overrides: Mapping[str, Any] | None, world: World, *, check: bool,
                 device: str, seed: int | None, runs_dir: str | Path | None, progress: bool | None,
                 stream: IO[str] | None, force: bool, retrain: bool, resume: str | None, ignore_changes: bool,
                 checkpoint_every: int | None, stage: str | None, from_run: str | None,
                 mlflow: str | bool | None, deterministic: bool | None = None,
                 time_limit: float | None = None, precision: str | None = None,
                 sweep: Mapping[str, Any] | None = None) -> RunResult:
    """:func:`run` in this process, one of ``world``: rank 0 plans the run (new or resumed) and
    shares the plan; every rank trains; rank 0 alone records and prints.

    ``sweep``: the run is a trial of a sweep (:mod:`engineflow.app.sweep`): ``study``, ``trial``,
    ``params`` (recorded as the run's ``sweep``), and what its pruning needs
    (:func:`engineflow.app.pruning.trial_pruning`)."""
    from engineflow.record.store import RunStore

    if resume is not None and (force or retrain):
        given = option("force") if force else option("retrain")
        raise RecipeError(f"{option('resume', resume)} continues a recorded run; {given} is for starting a new one. "
                          "Drop one of them")
    loaded = load_recipe(recipe)
    cfg, seed_used = resolve_config(loaded, overrides, seed)  # a bad override is reported before anything else
    if resume is not None and stage is not None:
        raise RecipeError(f"{option('resume', resume)} continues a recorded run; {option('stage', stage)} starts a "
                          "new run of one stage. Drop one of them")
    if world.rank > 0:
        plan = share_json(None, world)
        with deterministic_algorithms(bool(plan.get("deterministic"))):
            return _follow(loaded, world, plan, stream=stream, runs_dir=runs_dir, checkpoint_every=checkpoint_every,
                           device=device, time_limit=time_limit, sweep=sweep)
    with RunStore.open(resolve_runs_dir(runs_dir)) as store, _sharing_plan(world) as share, \
            contextlib.ExitStack() as deterministic_run:
        origin = stage_origin(loaded, store, stage, from_run)
        start: Session | None = None
        note = None
        if resume is not None:
            record = find_resumable(loaded, store, resume, cfg, seed=seed_used, check=check)
            if record is None:
                note = f"no run of {loaded.name} to resume: starting a new one"
            else:
                # on for the resume before it is planned: the record's exact_resume says it
                deterministic_run.enter_context(deterministic_algorithms(bool(record.get("deterministic"))))
                if precision is not None and precision != record.get("precision"):
                    raise RecipeError(f"run {record['id']} trains in precision {record.get('precision')!r}; a "
                                      f"resume keeps it. Drop {option('precision', precision)}, or start a new run")
                precision = record.get("precision")
                start = resume_session(loaded, store, record, overrides, seed=seed, check=check or None,
                                       ignore_changes=ignore_changes, device=device, deterministic=deterministic)
                if start is None:
                    share({"completed": record["id"]})
                    return _completed_result(record, stream)
                started = record.get("start")
                if started:  # a run of one stage: it starts from the same state again
                    origin = stage_origin(loaded, store, started["stage"], started.get("from"))
        if start is None:
            deterministic_run.enter_context(deterministic_algorithms(bool(deterministic)))
            start = new_session(loaded, store, cfg, seed=seed_used, check=check, device=device, force=force,
                                deterministic=bool(deterministic),
                                retrain=retrain, start=None if origin is None else
                                {"stage": origin["stage"], "from": origin["from"]})
        start = _placed(dataclasses.replace(start, context=dataclasses.replace(start.context, precision=precision)),
                        world)
        share(_plan_of(start, origin))
        return _train(loaded, start, stream=stream, progress=progress, checkpoint_every=checkpoint_every, note=note,
                      origin=origin, mlflow=mlflow, world=world, time_limit=time_limit, sweep=sweep)


@contextlib.contextmanager
def _sharing_plan(world: World) -> Iterator[Callable[[Any], None]]:
    """Rank 0 shares the plan of the run with the other ranks exactly once: the plan, or the error
    that stopped it (every other rank raises it too, so none waits for a plan that never comes)."""
    shared = False

    def share(plan: Any) -> None:
        nonlocal shared
        shared = True
        share_json(plan, world)

    try:
        yield share
    except BaseException as err:
        if not shared and world.distributed:
            share_json({"error": f"{err}", "exit_code": getattr(err, "exit_code", 1)}, world)
        raise


def _placed(start: Session, world: World) -> Session:
    """The session with this process's rank and world in its context and record."""
    if not start.resumed:
        start.recorder.record.update(world_size=world.size, backend=world.backend,
                                     exact_resume=exact_resume(start.context.device, world.backend))
    if not world.distributed:
        return start
    import ignite.distributed as idist

    device = idist.device() if start.context.device.type == "cuda" else start.context.device
    context = dataclasses.replace(start.context, rank=world.rank, world_size=world.size, device=device)
    return dataclasses.replace(start, context=context)


def _plan_of(start: Session, origin: Mapping[str, Any] | None) -> dict[str, Any]:
    context = start.context
    return {"run_id": context.run_id, "experiment": context.experiment, "run_dir": str(context.run_dir),
            "seed": context.seed, "check": context.check, "config": start.cfg.to_dict(), "epochs": start.epochs,
            "stage_epochs": list(start.stage_epochs), "resumed": start.resumed,
            "deterministic": bool(start.recorder.record.get("deterministic")), "precision": context.precision,
            "origin": None if origin is None else {"stage": origin["stage"], "from": origin["from"]}}


def _follow(loaded: Recipe, world: World, plan: Mapping[str, Any], *, stream: IO[str] | None,
            runs_dir: str | Path | None, checkpoint_every: int | None, device: str,
            time_limit: float | None = None, sweep: Mapping[str, Any] | None = None) -> RunResult:
    """A rank other than 0: train the run rank 0 planned, recording and printing nothing."""
    import ignite.distributed as idist

    from engineflow.declare.configuration import flatten
    from engineflow.errors import EngineflowError
    from engineflow.record.store import RunStore
    from engineflow.runtime import RunContext, resolve_device

    if "error" in plan:
        error = EngineflowError(f"rank 0: {plan['error']}")
        error.exit_code = plan["exit_code"]
        raise error
    if "completed" in plan:
        return RunResult(plan["completed"], loaded.name, "completed", Path("."), {}, 0, "cpu")
    where = resolve_device(device)
    context = RunContext(plan["run_id"], plan["experiment"], Path(plan["run_dir"]),
                         idist.device() if where.type == "cuda" else where, plan["seed"], plan["check"],
                         rank=world.rank, world_size=world.size, runs_dir=resolve_runs_dir(runs_dir),
                         precision=plan.get("precision"))
    cfg = loaded.config.override(flatten(plan["config"]))
    start = Session(context, None, cfg, plan["epochs"], tuple(plan["stage_epochs"]),  # type: ignore[arg-type]
                    resumed=plan["resumed"])
    origin = None
    if plan["origin"] is not None:
        with RunStore.open(resolve_runs_dir(runs_dir)) as store:
            origin = stage_origin(loaded, store, plan["origin"]["stage"], plan["origin"]["from"])
    return _train(loaded, start, stream=stream, progress=False, checkpoint_every=checkpoint_every, origin=origin,
                  world=world, time_limit=time_limit, sweep=sweep)


def stage_origin(recipe: Recipe, store: Any, stage: str | None, from_run: str | None) -> dict[str, Any] | None:
    """``--stage NAME --from RUN``: the stage to run alone and the state it starts from (the state
    RUN's last train stage before it ended with: ``checkpoints/stages/<that stage>.pt``), or None.

    Raises:
        RecipeError: no such stage; ``--from`` missing where an earlier stage trained, or given for a
            stage that starts from setup(); that run never finished the stage before.
    """
    if stage is None:
        if from_run is not None:
            raise RecipeError(f"{option('from', from_run)} names the run whose state a stage starts from; give the "
                              f"stage too, e.g. {option('stage', 'finetune')}")
        return None
    names = [s.name for s in recipe.stages]
    if not names:
        raise RecipeError(f"{recipe.path} declares no stages, so {option('stage', stage)} has nothing to pick; "
                          "run it without it")
    if stage not in names:
        raise RecipeError(f"{recipe.path} has no stage {stage!r}; its stages are {', '.join(names)}")
    index = names.index(stage)
    trained = [s.name for s in recipe.stages[:index] if s.kind == "train"]
    if not trained:
        if from_run is not None:
            raise RecipeError(f"stage {stage!r} starts from what setup() builds, before any stage trains; drop "
                              f"{option('from', from_run)}")
        return {"stage": stage, "from": None, "state": None}
    if from_run is None:
        raise RecipeError(f"stage {stage!r} starts from the state stage {trained[-1]!r} ended with; name the run to "
                          f"take it from with {option('from', 'RUN')} (an id, or last)")
    record = store.resolve(from_run, recipe.name)
    path = Path(record["run_dir"]) / "checkpoints" / "stages" / f"{trained[-1]}.pt"
    problem = verify(path) if path.is_file() else "it has no such file"
    if problem is not None:
        raise RecipeError(f"run {record['id']} has no state from the end of stage {trained[-1]!r} ({path}: {problem}); "
                          f"pick a run that finished that stage")
    return {"stage": stage, "from": record["id"], "state": load_record(path)}


def _train(loaded: Recipe, start: Session, *, stream: IO[str] | None, progress: bool | None,
           checkpoint_every: int | None, note: str | None = None, origin: Mapping[str, Any] | None = None,
           mlflow: str | bool | None = None, world: World = ONE_PROCESS,
           time_limit: float | None = None, sweep: Mapping[str, Any] | None = None) -> RunResult:
    """Build and check the recipe, then record the run and train it.

    Nothing is recorded until the engines are built and the eval step's outputs fit its metrics: a
    recipe that cannot start (a bad setup(), a missing component, a metric that cannot read the eval
    output) leaves no run behind. A new run's folder exists during setup() (``run.run_dir``) and is
    removed again when the run does not start. On several processes only rank 0 records, prints and
    writes checkpoints (``start.recorder`` is None on the others).

    ``time_limit`` (seconds, ``--time-limit``): once spent, by rank 0's clock, every rank stops at the
    same iteration with a checkpoint (:mod:`engineflow.state.time_limit`); the run is then
    interrupted and its result returned, not raised (:class:`~engineflow.errors.TimeLimitReached`).
    """
    context, recorder = start.context, start.recorder
    leader = recorder is not None
    limit = TimeLimit(time_limit, decides=leader)  # started now: the budget counts the setup too
    policy = policy_of(loaded)
    if checkpoint_every is not None:
        policy = every_iterations_policy(policy, checkpoint_every)
    if leader:
        reporter = Reporter(stream, progress=progress, log_path=context.run_dir / "log.txt")
        recorder.use(mirror=mirror_for(mlflow, loaded, recorder.record, reporter.line),  # None: no MLflow mirror
                     best_in_checkpoints=policy.keep_best > 0)
    else:
        reporter = Reporter(open(os.devnull, "w"), progress=False)
    checkpointer = Checkpointer(context.run_dir / "checkpoints" / "state", policy, context.run_id, reporter.line,
                                writes=leader, agree=max_over_ranks if world.distributed else None,
                                deadline=limit.reached)
    # every rank takes part in each checkpoint (its own RNGs and sums are in it); rank 0 writes it
    extras = ((reporter.handlers, recorder.handlers, checkpointer.handlers, limit.attach) if leader
              else (checkpointer.handlers, limit.attach))
    listeners = (reporter, recorder, checkpointer) if leader else (checkpointer,)
    if sweep is not None:  # a sweep's trial: its main metric goes to Optuna after every epoch
        from engineflow.app.pruning import trial_pruning

        extras = (*extras, trial_pruning(sweep, world, context.run_id).attach)

    with using_run(context.run_id):
        pipeline = _prepare(loaded, start, extras=extras, listeners=listeners, origin=origin)
        # a checkpoint that does not fit (other stages, another number of processes mid-epoch) is refused
        # here, before the run's record says it resumed
        found = _continue_from(pipeline, checkpointer, world) if start.resumed else None
        if leader:
            if not start.resumed:
                options = pipeline.step_options()
                recorder.record.update(precision=_run_precision(context.precision, options), step_options=options)
                if sweep is not None:
                    recorder.record.update(sweep={k: sweep[k] for k in ("study", "trial", "params")},
                                           mlflow_parent=sweep.get("mlflow_parent"))
            start.begin()
            if start.resumed:  # on this number of processes now (each resume's entry says on how many)
                placed = {"world_size": world.size, "backend": world.backend,
                          "exact_resume": exact_resume(context.device, world.backend)}
                changed = {k: v for k, v in placed.items() if recorder.record.get(k) != v}
                if changed:
                    recorder.update(**changed)
            if world.distributed:
                note_run(context.run_id)
        if note is not None:
            reporter.line(note)
        verb = "resuming" if start.resumed else "run"
        stages = f" in {plural(len(loaded.stages), 'stage')}" if loaded.stages else ""
        if origin is not None:
            stages = f" of stage {origin['stage']}" + (f" from run {origin['from']}" if origin.get("from") else "")
        where = f"{context.device}" + (f", {world.size} processes ({world.backend})" if world.distributed else "")
        reporter.line(f"{verb} {context.run_id} ({loaded.name}) on {where}, seed {context.seed}, "
                      f"{plural(start.epochs, 'epoch')}{stages}" + (" [check]" if context.check else "")
                      + (f", {limit.describe()}" if limit.budget is not None else ""))
        model = model_summary(pipeline.components)  # as the run starts or resumes (a stage may have frozen some)
        for line in format_model(model):
            reporter.line(line)
        if leader:
            recorder.update(model=model)
        result = RunResult(context.run_id, loaded.name, "running", context.run_dir, start.cfg.to_dict(),
                           context.seed, str(context.device))
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            with reporter, Interrupts() as interrupts:
                interrupts.target = checkpointer
                with _writes_waited(checkpointer):
                    _fit(pipeline, found, start, reporter, only=origin is not None, world_size=world.size)
            result.status = "pruned" if sweep is not None and _pruned(pipeline) else "completed"
        except TimeLimitReached as err:  # a planned stop: recorded as interrupted, returned
            result.status, failure = "interrupted", err
        except KeyboardInterrupt as err:
            result.status, failure = "interrupted", err
            raise
        except BaseException as err:
            result.status, result.error, failure = "failed", f"{type(err).__name__}: {err}", err
            raise
        finally:
            if (unreported := checkpointer.close()) is not None and failure is not None:  # before best.pt's export
                add_note(failure, f"a checkpoint write also failed: {type(unreported).__name__}: {unreported}")
            trained = pipeline.epochs_run()
            result.duration_s = time.monotonic() - started
            result.history = pipeline.history()
            result.epochs = pipeline.epochs_completed()
            result.metrics = {**({"epoch": result.history[-1]["epoch"]} if result.history else {}),
                              **pipeline.metrics()}
            result.best = pipeline.best()
            if leader:
                _record_end(recorder, result, failure, fit=pipeline.last_fit, best_checkpoint=checkpointer.best_file())
        if leader and result.status == "completed":
            start.completed()
    if result.status == "interrupted":
        reporter.line(f"stopped at the time limit, with a checkpoint; continue with --resume {context.run_id}")
    _summarise(reporter, result, trained)
    return result


def _pruned(pipeline: Pipeline) -> bool:
    """Whether a trial's pruning stopped one of the run's stages (its ``stopped`` survives a resume)."""
    from engineflow.app.pruning import PRUNED_BY

    return any((summary.get("stopped") or {}).get("by") == PRUNED_BY for summary in pipeline.summaries)


def _run_precision(given: str | None, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The precision a run records: ``--precision``, else its train stages' when they all have one
    (None when they differ)."""
    if given is not None:
        return given
    found = {stage["precision"] for stage in options.values()}
    return found.pop() if len(found) == 1 else None


@contextlib.contextmanager
def _writes_waited(checkpointer: Checkpointer) -> Iterator[None]:
    """Wait for the checkpoints written in the background when the fit ends, however it ends.

    A write that failed was submitted at an earlier step than the error the fit may have ended with
    (which can be a consequence: another file finding the disk full), so it is the run's error, as
    it would have been had the file been written on the training thread; the later one is a note.
    """
    try:
        yield
    except BaseException as err:
        failed = checkpointer.close()
        if failed is None:
            raise
        add_note(failed, f"then: {type(err).__name__}: {err}")
        raise failed from None  # the later error is in the note
    checkpointer.wait()


def _record_end(recorder: Any, result: RunResult, failure: BaseException | None, *, fit: Fit | None,
                best_checkpoint: Path | None) -> None:
    """Record how the run ended (:meth:`~engineflow.record.recorder.RunRecorder.finish`).

    What fails while finishing (the weights files, TensorBoard, the index) fails a run that had
    completed, and is raised; a run that had failed or was interrupted keeps its own error as the
    one reported, with the other added to it as a note.
    """
    try:
        result.status = recorder.finish(result.status, error=result.error, final=result.metrics, fit=fit,
                                        best_checkpoint=best_checkpoint, best=result.best)
    except BaseException as err:
        if failure is None:
            result.status, result.error = recorder.record.get("status", "failed"), f"{type(err).__name__}: {err}"
            raise
        add_note(failure, f"while recording the run's end: {type(err).__name__}: {err}")


def _prepare(loaded: Recipe, start: Session, *, extras: tuple[Callable[[Fit], Iterable[HandlerSpec]], ...],
             listeners: tuple[Any, ...], origin: Mapping[str, Any] | None) -> Pipeline:
    """The built and checked pipeline of a session that is about to start; nothing recorded yet.

    ``origin`` (``--stage``): the stage to run alone, and the state to start it from.
    """
    context = start.context
    made_run_dir = not start.resumed and not context.run_dir.exists() and context.rank == 0
    made_experiment_dir = made_run_dir and not context.run_dir.parent.exists()
    if made_run_dir:
        claim(context.run_dir)  # noted, so that the next command removes it if this process is killed
    try:
        pipeline, _, _ = build_pipeline(loaded, start.cfg, seed=context.seed, check=context.check, context=context,
                                        extras=extras, listeners=listeners, epochs=list(start.stage_epochs))
        if origin is not None:
            index = pipeline.stage_index(origin["stage"])
            if origin.get("state") is not None:
                pipeline.start_from(index, origin["state"], origin["from"])
            elif index:
                pipeline.enter(index)
        if pipeline.fit is not None:
            pipeline.fit.check_eval_outputs()
    except BaseException:
        if made_run_dir:
            shutil.rmtree(context.run_dir, ignore_errors=True)
            release(context.run_dir)
        if made_experiment_dir:
            with contextlib.suppress(OSError):  # another run of the experiment may have started in it meanwhile
                context.run_dir.parent.rmdir()
        raise
    return pipeline


def _continue_from(pipeline: Pipeline, checkpointer: Checkpointer,
                   world: World) -> tuple[Path, ResumeRecord] | None:
    """Load a resumed run's latest valid checkpoint into the pipeline and the checkpointer; None when
    it has none. On several processes rank 0 picks the file and every rank reads that one (collective):
    the runs folder must be on a filesystem every node shares."""
    found = checkpointer.latest() if world.rank == 0 else None
    name = share_json(found[0].name if found is not None else None, world)
    if name is None:
        return None
    if found is None:
        path = checkpointer.folder / name
        problem = verify(path) if path.is_file() else "no such file"
        if problem is not None:
            raise RecipeError(f"rank {world.rank} cannot read the checkpoint rank 0 resumes from ({path}: {problem}); "
                              "resuming on several machines needs the runs folder on a filesystem they all share")
        found = path, load_record(path)
    checkpointer.load_state_dict(found[1])
    pipeline.load_state_dict(found[1])
    return found


def _fit(pipeline: Pipeline, found: tuple[Path, ResumeRecord] | None, start: Session, reporter: Reporter, *,
         only: bool, world_size: int = 1) -> None:
    """Run the stages from the start, or from the checkpoint a resumed run loaded (:func:`_continue_from`)."""
    if found is None:
        if start.resumed:
            reporter.line("no valid checkpoint: training from the first epoch")
        pipeline.run(only=only)
        return
    path, record = found
    position, where = record.position, record.stage
    stage = f"stage {where.name}, " if pipeline.staged else ""
    if record.finished:
        reporter.line(f"from checkpoint {path.name}: stage {where.name} had ended")
    else:
        saved = record.world_size  # the batches are those of the processes that saved it
        on = f" on {plural(saved, 'process', 'processes')}" if saved != world_size else ""
        reporter.line(f"from checkpoint {path.name}: {stage}epoch {position.epochs_completed + 1}, batch "
                      f"{position.batches_in_epoch + 1} of {position.epoch_length}{on}")
        partial = pipeline.fit.partial_metrics if pipeline.fit is not None else []
        if partial:
            reporter.line(f"note: {', '.join(partial)} cannot add up the states of the {plural(saved, 'process')} "
                          f"that saved this epoch: this epoch's value counts the steps since the resume and those "
                          f"of the first {min(saved, world_size)} processes before it")
    if start.recorder is not None:
        start.recorder.resumed_from(path, position.iteration, where.epochs_before + position.epochs_completed)
    pipeline.run(only=only)


def _summarise(reporter: Reporter, result: RunResult, trained: int) -> None:
    best = result.best
    reporter.line(f"completed {plural(trained, 'epoch')} in {format_duration(result.duration_s)}")
    if best.get("epoch") is not None:
        reporter.line(f"best epoch {best['epoch']}: {best['metric']} = {format_value(best['value'])} ({best['mode']})")
    if result.metrics:
        reporter.line(f"last epoch: {format_metrics(result.metrics)}")
    reporter.line(f"outputs: {result.run_dir}")


def _completed_result(record: dict[str, Any], stream: IO[str] | None) -> RunResult:
    reporter = Reporter(stream, progress=False)
    reporter.line(f"run {record['id']} already {record['status']}; nothing to resume")
    return RunResult(record["id"], record["experiment"], record["status"], Path(record["run_dir"]), record["config"],
                     record["seed"], (record.get("env") or {}).get("device", "cpu"), record.get("epochs", 0),
                     record.get("history", []), record.get("metrics", {}), record.get("best", {}))
