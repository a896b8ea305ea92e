"""The ``engineflow`` command line. Imports torch and Ignite only inside the commands that train.

Exit codes: 0 success; 1 training failed (e.g. the loss became NaN); 2 bad usage or a bad
recipe; 3 stopped at --time-limit (with a checkpoint: --resume continues it); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from engineflow.app.command_errors import guarded
from engineflow.errors import EXIT_TRAINING_FAILED

runs_dir_option = click.option(
    "--runs-dir", type=click.Path(file_okay=False, path_type=str), default="runs", show_default=True,
    envvar="ENGINEFLOW_RUNS_DIR", help="Folder of run folders and the store (or $ENGINEFLOW_RUNS_DIR).")
debug_option = click.option("--debug", is_flag=True, help="Show full tracebacks for recipe and usage errors.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
recipe_argument = click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
run_ref_option = click.option("--run", "run_ref", default=None, metavar="ID|last",
                              help="Which run (default: the recipe's latest).")
nproc_option = click.option("--nproc", type=int, default=None, metavar="N",
                            help="Run on N local processes, data parallel (gloo on CPU, NCCL on CUDA); at most "
                                 "the machine's CPUs (GPUs on CUDA) unless --oversubscribe.")
oversubscribe_option = click.option("--oversubscribe", is_flag=True,
                                    help="With --nproc: start more processes than CPUs (GPUs on CUDA).")
ignore_changes_option = click.option("--ignore-changes", is_flag=True,
                                     help="Use the run even if the recipe's code changed since.")
trust_code_option = click.option("--trust-code", is_flag=True,
                                 help="With --run ID: import that run's code snapshot even if another user or machine "
                                      "or an earlier engineflow version recorded it (review its code/ first).")


class OneLineUsageError(click.UsageError):
    """A usage error as one line naming the fix (click prints the usage block and a hint above it)."""

    def show(self, file: Any = None) -> None:
        where = self.ctx.command_path if self.ctx is not None else "engineflow"
        click.echo(f"error: {self.message} ({where} -h lists the options)", err=True)


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    try:
        yield
    except click.UsageError as err:
        raise OneLineUsageError(err.format_message(), err.ctx) from None


class _Command(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line():
            return super().parse_args(ctx, args)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are of this class too

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line():
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        with _one_line():
            return super().resolve_command(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="engineflow")
def main() -> None:
    """engineflow: train PyTorch models from plain step functions on Ignite engines.

    \b
    A recipe is a Python file with a config, a setup(cfg) and step functions:
      engineflow run recipes/digits.py
      engineflow run recipes/digits.py --set lr=0.1 --set epochs=5
      engineflow run recipes/digits.py --check      # 2 batches x 2 epochs smoke test
      engineflow test recipes/digits.py             # the latest run on the test loader
      engineflow runs list                          # every recorded run

    Exit codes: 0 ok, 1 training failed, 2 bad recipe or usage, 3 stopped at --time-limit, 130 interrupted.
    """


@main.command("run")
@recipe_argument
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a config value (repeatable); checked against the recipe's defaults.")
@click.option("--check", is_flag=True, help="Smoke test: 2 batches of each loader for 2 epochs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train; auto picks CUDA when available.")
@click.option("--seed", type=int, default=None, help="Seed for every RNG (default: the config's seed, else 0).")
@runs_dir_option
@click.option("--progress/--no-progress", default=None,
              help="Live progress bar (default: only when printing to a terminal).")
@click.option("--force", is_flag=True, help="Train even if a completed run has the same code and config.")
@click.option("--retrain", is_flag=True,
              help="Train the completed run with the same code and config again; the new run replaces it once it "
                   "completes.")
@click.option("--resume", default=None, metavar="RUN|last|auto",
              help="Continue a run from its latest valid checkpoint (same run id, mid-epoch included). "
                   "auto: the latest unfinished run of this recipe and config, else a new run.")
@click.option("--ignore-changes", is_flag=True, help="With --resume: continue even if code or config changed.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Checkpoint every N iterations (replaces the recipe's policy).")
@click.option("--stage", default=None, metavar="NAME",
              help="Run only this stage of a recipe with stages, from the state --from RUN had when it started.")
@click.option("--from", "from_run", default=None, metavar="RUN|last",
              help="With --stage: the run whose state at the start of that stage this run starts from.")
@click.option("--mlflow", "mlflow_uri", default=None, metavar="URI",
              help="Mirror the run to this MLflow tracking server (over the recipe's mlflow setting); "
                   "`engineflow runs sync` pushes what a server that was down missed.")
@click.option("--no-mlflow", is_flag=True, help="No MLflow mirror, even if the recipe sets one.")
@click.option("--deterministic", is_flag=True, default=None,
              help="torch.use_deterministic_algorithms(True) for the run (exact resume on one GPU); recorded, and "
                   "kept by --resume.")
@click.option("--time-limit", default=None, metavar="DURATION",
              help="Stop cleanly once this much time has passed (2h, 30m, 90s, 1h30m or seconds): a checkpoint, "
                   "status interrupted, exit 3; --resume continues with what is left (or a new --time-limit).")
@click.option("--precision", type=click.Choice(["32", "bf16", "fp16"]), default=None,
              help="Train every train stage in this precision (mixed precision: autocast; fp16 with a grad scaler), "
                   "over the steps' own; recorded, and kept by --resume.")
@nproc_option
@oversubscribe_option
@debug_option
def run_command(recipe: str, assignments: tuple[str, ...], check: bool, device: str, seed: int | None,
                runs_dir: str, progress: bool | None, force: bool, retrain: bool, resume: str | None,
                ignore_changes: bool, checkpoint_every: int | None, stage: str | None, from_run: str | None,
                mlflow_uri: str | None, no_mlflow: bool, deterministic: bool | None, precision: str | None,
                time_limit: str | None, nproc: int | None, oversubscribe: bool, debug: bool) -> None:
    """Train RECIPE (a .py file) and record the run under --runs-dir.

    A completed run with the same code and config is not repeated: --force makes a new run,
    --retrain a new run that replaces it once it completes. --resume continues an interrupted run
    exactly where its latest checkpoint left it (auto: this recipe's, config's and seed's latest
    unfinished run, or a new run); on CPU the final weights equal those of an uninterrupted run.
    A recipe with stages runs them in order; --stage NAME --from RUN runs one of them again as a
    new run, starting from the state RUN had at that stage's start.

    \b
    Examples:
      engineflow run recipes/digits.py
      engineflow run recipes/sine.py --set hidden=64 --seed 3 --device cpu
      engineflow run recipes/pretrain_finetune.py --stage finetune --from last --set finetune_lr=0.01
      engineflow run recipes/digits.py --mlflow http://127.0.0.1:5000
    """

    def go() -> None:
        from engineflow.app.runner import run
        from engineflow.declare.configuration import parse_assignments
        from engineflow.errors import EXIT_TIME_LIMIT, RecipeError
        from engineflow.state.time_limit import parse_duration

        if no_mlflow and mlflow_uri is not None:
            raise RecipeError("--mlflow and --no-mlflow exclude each other; give one of them")
        limit = None if time_limit is None else parse_duration(time_limit)
        result = run(recipe, parse_assignments(assignments), check=check, device=device, seed=seed,
                     runs_dir=runs_dir, progress=progress, force=force, retrain=retrain, resume=resume,
                     ignore_changes=ignore_changes, checkpoint_every=checkpoint_every, stage=stage, from_run=from_run,
                     mlflow=False if no_mlflow else mlflow_uri, deterministic=deterministic, precision=precision,
                     nproc=nproc,
                     oversubscribe=oversubscribe, time_limit=limit)
        if result.status == "interrupted":  # the time limit stopped it (an interrupt raises)
            sys.exit(EXIT_TIME_LIMIT)

    guarded(go, debug, "training failed")


@main.command("test")
@recipe_argument
@run_ref_option
@ignore_changes_option
@trust_code_option
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@runs_dir_option
@json_option
@nproc_option
@oversubscribe_option
@debug_option
def test_command(recipe: str, run_ref: str | None, ignore_changes: bool, trust_code: bool, device: str, runs_dir: str,
                 as_json: bool, nproc: int | None, oversubscribe: bool, debug: bool) -> None:
    """Evaluate a run's best weights on RECIPE's "test" loader and store the results with the run.

    Uses the latest run of the recipe; refuses if the recipe's code changed since that run,
    unless --ignore-changes (today's code, that run's weights) or --run ID (that run's code,
    checked against what the run recorded; --trust-code for a run this user did not record).
    """

    def go() -> None:
        from engineflow.app.launch import rank_of_this_process
        from engineflow.app.report import format_metrics
        from engineflow.app.testing import evaluate_test
        from engineflow.app.views import to_json

        result = evaluate_test(recipe, ref=run_ref, ignore_changes=ignore_changes, runs_dir=runs_dir, device=device,
                               nproc=nproc, oversubscribe=oversubscribe, trust_code=trust_code,
                               announce=None if as_json else "stdout")  # JSON names the run itself
        if rank_of_this_process() > 0:  # under torchrun: rank 0 prints
            return
        if as_json:
            click.echo(to_json(result))
        else:
            click.echo(f"run {result['run']}: {format_metrics(result['metrics'])}")
        if not result.get("stored", True):
            click.echo(f"note: {result['note']}", err=True)

    guarded(go, debug, "test failed")


@main.command("eval")
@recipe_argument
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False, path_type=str))
@run_ref_option
@ignore_changes_option
@trust_code_option
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Inputs per infer batch when INPUT is a folder.")
@runs_dir_option
@debug_option
def eval_command(recipe: str, input_path: str, output_path: str, run_ref: str | None, ignore_changes: bool,
                 trust_code: bool, device: str, batch_size: int, runs_dir: str, debug: bool) -> None:
    """Predict INPUT (a file, or every file of a folder) with a run's model and write OUTPUT.

    The recipe's load_sample(path) and store_result(path, predictions, files) read and write;
    by default .pt, .npy and .csv. OUTPUT is written only when every input succeeded.
    """

    def go() -> None:
        from engineflow.app.evaluation import predict_files
        from engineflow.app.report import plural

        result = predict_files(recipe, input_path, output_path, ref=run_ref, ignore_changes=ignore_changes,
                               runs_dir=runs_dir, device=device, batch_size=batch_size, trust_code=trust_code,
                               announce=click.echo)
        click.echo(f"run {result['run']}: {plural(result['inputs'], 'input')} -> {result['output']}")

    guarded(go, debug, "eval failed")


@main.command("serve")
@recipe_argument
@run_ref_option
@click.option("--stage", default=None, metavar="NAME",
              help="Serve this stage's infer step (default: the infer step; with stages, the inference stage's).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="The most samples in one call of the infer step.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the oldest queued sample waits for others to join its batch.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="The most samples waiting at once; past it, 429 with Retry-After.")
@click.option("--timeout-ms", type=click.FloatRange(min=0, min_open=True), default=10_000.0, show_default=True,
              help="A request's deadline when it sends no X-Timeout-Ms header; past it, 504.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=16 * 1024 * 1024, show_default=True,
              help="The largest request body; past it, 413.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes behind the one port, each with its own copy of the model.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs; auto picks CUDA when available.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One JSON line per request on stderr.")
@runs_dir_option
@ignore_changes_option
@trust_code_option
@debug_option
def serve_command(recipe: str, run_ref: str | None, stage: str | None, host: str, port: int, max_batch_size: int,
                  max_wait_ms: float, max_queue: int, timeout_ms: float, max_body_bytes: int, workers: int,
                  device: str, access_log: bool, runs_dir: str, ignore_changes: bool, trust_code: bool,
                  debug: bool) -> None:
    """Serve a run's infer step over HTTP: POST /predict, with concurrent requests batched.

    The run is the one `eval` would use (--run picks another), with its best weights. Requests
    are gathered into batches of up to --max-batch-size samples or --max-wait-ms, whichever comes
    first. GET /health, /ready (after a warm-up batch) and /metrics (Prometheus). SIGTERM or
    Ctrl-C answers every accepted request, then stops. Needs: pip install 'engineflow[serve]'.

    \b
    Examples:
      engineflow serve recipes/digits.py
      curl -s localhost:8000/predict -H 'Content-Type: application/json' -d '{"inputs": [0, 1, ...]}'
    """

    def go() -> None:
        from engineflow.app.serving import serve

        serve(recipe, run=run_ref, stage=stage, host=host, port=port, max_batch_size=max_batch_size,
              max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_ms=timeout_ms, max_body_bytes=max_body_bytes,
              workers=workers, device=device, runs_dir=runs_dir, ignore_changes=ignore_changes, trust_code=trust_code,
              access_log=access_log, announce=lambda line: click.echo(line))

    guarded(go, debug, "serve failed")


@main.command("lr-find")
@recipe_argument
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also draw the loss against the learning rate, suggestions marked (e.g. lr.png; matplotlib).")
@click.option("--start", type=float, default=1e-7, show_default=True, help="The first learning rate.")
@click.option("--end", type=float, default=10.0, show_default=True, help="The last learning rate.")
@click.option("--iterations", type=int, default=100, show_default=True,
              help="Train steps of the sweep at most (it stops early when the loss diverges).")
@click.option("--stage", default=None, metavar="NAME",
              help="Sweep this train stage of a recipe with stages (default: the first train stage).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a config value (repeatable); checked against the recipe's defaults.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to sweep; auto picks CUDA when available.")
@click.option("--seed", type=int, default=None, help="Seed for every RNG (default: the config's seed, else 0).")
@json_option
@debug_option
def lr_find_command(recipe: str, out: str | None, start: float, end: float, iterations: int, stage: str | None,
                    assignments: tuple[str, ...], device: str, seed: int | None, as_json: bool, debug: bool) -> None:
    """Sweep RECIPE's learning rate exponentially from --start to --end and print what the loss suggests.

    The recipe is built as ef.build builds it and its own train step runs for at most --iterations
    steps, every param group's learning rate growing each step, until the smoothed loss passes 4x its
    best. Nothing is recorded: the runs folder is not touched, and the model, optimizer and RNGs are
    put back as they were. One line per rule (valley, steep, minimum) says "suggest lr X".

    \b
    Examples:
      engineflow lr-find recipes/digits.py --out lr.png
      engineflow lr-find recipes/pretrain_finetune.py --stage finetune --iterations 50 --json
    """

    def go() -> None:
        from engineflow.app.lr_find import find_lr, sweep_lines
        from engineflow.app.views import to_json
        from engineflow.declare.configuration import parse_assignments

        sweep = find_lr(recipe, parse_assignments(assignments), start=start, end=end, iterations=iterations,
                        stage=stage, device=device, seed=seed, out=out)
        if as_json:
            click.echo(to_json(sweep.to_dict()))
            return
        for line in sweep_lines(sweep, recipe):
            click.echo(line)
        if out is not None:
            click.echo(f"wrote {out}")

    guarded(go, debug, "lr-find failed")


class _SweepGroup(_Group):
    """``engineflow sweep RECIPE ...`` runs a sweep; ``sweep show`` and ``sweep plot`` look at one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


@main.group("sweep", cls=_SweepGroup)
def sweep_group() -> None:
    """Sweep a recipe's search space on Optuna: engineflow sweep RECIPE --trials N; sweep show; sweep plot.

    \b
    Examples:
      engineflow sweep recipes/digits.py --trials 12
      engineflow sweep recipes/digits.py --trials 40 --jobs 2 --storage postgresql://user@db/sweeps
      engineflow sweep show digits
      engineflow sweep plot digits --out sweep.png
    """


study_option = click.option("--study", default=None, help="The study's name (default: the recipe's experiment).")
storage_option = click.option("--storage", default=None, metavar="URL",
                              help="Optuna storage (default: journal:///<runs-dir>/sweeps.log).")


@sweep_group.command("start", hidden=True)
@recipe_argument
@click.option("--trials", type=int, required=True, metavar="N", help="Trials the study holds once done.")
@study_option
@storage_option
@click.option("--jobs", type=int, default=1, show_default=True, metavar="J", help="Trials at once, one process each.")
@nproc_option
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid", "cmaes", "qmc"]), default="tpe",
              show_default=True)
@click.option("--pruner", type=click.Choice(["median", "hyperband", "successive-halving", "none"]), default="median",
              show_default=True)
@click.option("--direction", type=click.Choice(["max", "min"]), default=None,
              help="Default: the main metric's mode.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A config value of every trial.")
@click.option("--space", "spaces", multiple=True, metavar="KEY=RANGE",
              help="Replace one entry of the recipe's space, e.g. --space 'lr=loguniform(1e-3, 1)'.")
@click.option("--seed", type=int, default=0, show_default=True, help="The sweep's seed (trial seeds come from it).")
@click.option("--timeout", type=str, default=None, metavar="DURATION", help="Start no trial after this long.")
@click.option("--resume", is_flag=True, help="Continue the study (the same command does too).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@runs_dir_option
@debug_option
def sweep_start(recipe: str, trials: int, study: str | None, storage: str | None, jobs: int, nproc: int | None,
                sampler: str, pruner: str, direction: str | None, assignments: tuple[str, ...],
                spaces: tuple[str, ...], seed: int, timeout: str | None, resume: bool, device: str, runs_dir: str,
                debug: bool) -> None:
    """Run trials of RECIPE over its search space until the study holds N finished trials."""

    def go() -> None:
        from engineflow.app.sweep import sweep
        from engineflow.declare.configuration import parse_assignments
        from engineflow.errors import RecipeError
        from engineflow.state.time_limit import parse_duration

        given = {}
        for item in spaces:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise RecipeError(f"--space expects KEY=RANGE, got {item!r} "
                                  "(for example --space 'lr=loguniform(1e-3, 1)')")
            given[key.strip()] = text
        limit = None if timeout is None else parse_duration(timeout, what="--timeout")
        sweep(recipe, trials, study=study, storage=storage, jobs=jobs, nproc=nproc, sampler=sampler, pruner=pruner,
              direction=direction, overrides=parse_assignments(assignments), space=given, seed=seed, timeout=limit,
              runs_dir=runs_dir, device=device, resume=resume)

    guarded(go, debug, "sweep failed")


@sweep_group.command("show")
@click.argument("study", required=False)
@storage_option
@runs_dir_option
@json_option
@debug_option
def sweep_show(study: str | None, storage: str | None, runs_dir: str, as_json: bool, debug: bool) -> None:
    """A study's trials (state, params, value, epochs, run id), its best trial and the parameters' importances."""

    def go() -> None:
        from pathlib import Path

        from engineflow.app.sweep import optuna_studies
        from engineflow.app.views import sweep_text, to_json

        studies = optuna_studies()
        studies.quiet()
        found = studies.load(_sweep_storage(storage, Path(runs_dir)), study)
        done = studies.summary(found)
        click.echo(to_json(done) if as_json else sweep_text(done, studies.importances(found)))

    guarded(go, debug, "sweep show failed")


@sweep_group.command("plot")
@click.argument("study", required=False)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=str), required=True,
              help="Image file to write (e.g. sweep.png).")
@storage_option
@runs_dir_option
@debug_option
def sweep_plot(study: str | None, out: str, storage: str | None, runs_dir: str, debug: bool) -> None:
    """Draw a study's optimization history, its parameters against the value and their importances."""

    def go() -> None:
        from pathlib import Path

        from engineflow.app.sweep import optuna_studies

        studies = optuna_studies()
        studies.quiet()
        studies.plot(studies.load(_sweep_storage(storage, Path(runs_dir)), study), Path(out))
        click.echo(f"wrote {out}")

    guarded(go, debug, "sweep plot failed")


def _sweep_storage(storage: str | None, runs_dir: Any) -> str:
    """The storage to read: the one given, else the runs folder's (which must exist: reading creates nothing)."""
    from engineflow.errors import RecipeError

    if storage:
        return storage
    path = runs_dir / "sweeps.log"
    if not path.is_file():
        raise RecipeError(f"no sweeps in {runs_dir} (no {path}); give --storage URL or --runs-dir DIR")
    return f"journal:///{path.resolve()}"


@main.group("runs")
def runs_group() -> None:
    """List, show, compare and plot recorded runs; rebuild the store from run folders; sync MLflow mirrors;
    trust a run's code."""


@runs_group.command("list")
@click.option("--experiment", default=None, help="Only runs of this experiment.")
@click.option("--status", type=click.Choice(["running", "completed", "failed", "interrupted", "pruned", "damaged"]),
              default=None)
@click.option("--sweep", "sweep", default=None, metavar="STUDY", help="Only the trials of this sweep's study.")
@runs_dir_option
@json_option
@debug_option
def runs_list(experiment: str | None, status: str | None, sweep: str | None, runs_dir: str, as_json: bool,
              debug: bool) -> None:
    """List runs, newest first."""

    def go() -> None:
        from pathlib import Path

        from engineflow.app.launch_folders import remove_abandoned
        from engineflow.app.views import list_table, public, to_json
        from engineflow.record.runs import list_runs, no_runs_message

        remove_abandoned()  # with the runs found dead, the folders their killed launchers left
        if not Path(runs_dir).is_dir() and not as_json:  # nothing is created: a mistyped folder lists no runs
            click.echo(no_runs_message(Path(runs_dir)), err=True)
        records = list_runs(runs_dir, experiment=experiment, status=status)
        if sweep is not None:
            records = [r for r in records if (r.get("sweep") or {}).get("study") == sweep]
        click.echo(to_json([public(r) for r in records]) if as_json else list_table(records))

    guarded(go, debug, "runs list failed")


@runs_group.command("show")
@click.argument("run_ref", metavar="RUN")
@runs_dir_option
@json_option
@debug_option
def runs_show(run_ref: str, runs_dir: str, as_json: bool, debug: bool) -> None:
    """Show one run (an id, a unique id prefix, or "last")."""

    def go() -> None:
        from engineflow.app.launch_folders import remove_abandoned
        from engineflow.app.views import public, show_text, to_json
        from engineflow.record.runs import get_run

        remove_abandoned()
        record = get_run(runs_dir, run_ref)
        click.echo(to_json(public(record)) if as_json else show_text(record))

    guarded(go, debug, "runs show failed")


@runs_group.command("compare")
@click.argument("run_refs", metavar="RUN RUN [RUN...]", nargs=-1, required=True)
@runs_dir_option
@json_option
@debug_option
def runs_compare(run_refs: tuple[str, ...], runs_dir: str, as_json: bool, debug: bool) -> None:
    """Config differences and metrics of two or more runs side by side."""

    def go() -> None:
        from engineflow.app.views import compare, compare_text, to_json
        from engineflow.errors import RecipeError
        from engineflow.record.runs import get_run

        if len(run_refs) < 2:
            raise RecipeError(f"runs compare takes two runs or more; got only {run_refs[0]!r}")
        diff = compare(*(get_run(runs_dir, ref) for ref in run_refs))
        click.echo(to_json(diff) if as_json else compare_text(diff))

    guarded(go, debug, "runs compare failed")


@runs_group.command("plot")
@click.argument("run_refs", metavar="RUN...", nargs=-1, required=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=str), required=True,
              help="Image file to write (e.g. curves.png).")
@click.option("--activations", is_flag=True,
              help="Draw one run's activation statistics (ef.hooks.activation_stats) instead of its metrics.")
@runs_dir_option
@debug_option
def runs_plot(run_refs: tuple[str, ...], out: str, activations: bool, runs_dir: str, debug: bool) -> None:
    """Draw the per-epoch metric curves of runs, or with --activations one run's activation statistics per
    layer (needs the optional matplotlib extra)."""

    def go() -> None:
        from pathlib import Path

        from engineflow.app.views import plot, plot_activations
        from engineflow.errors import RecipeError
        from engineflow.record.runs import get_run

        if activations:
            if len(run_refs) != 1:
                raise RecipeError(f"runs plot --activations draws one run; got {len(run_refs)} ({' '.join(run_refs)})")
            plot_activations(get_run(runs_dir, run_refs[0]), Path(out))
        else:
            plot([get_run(runs_dir, ref) for ref in run_refs], Path(out))
        click.echo(f"wrote {out}")

    guarded(go, debug, "runs plot failed")


@runs_group.command("reindex")
@runs_dir_option
@debug_option
def runs_reindex(runs_dir: str, debug: bool) -> None:
    """Rebuild the store from the run folders (the folders are the source of truth)."""

    def go() -> None:
        from engineflow.app.report import plural
        from engineflow.record.runs import rebuild

        done = rebuild(runs_dir)
        if done.moved_aside is not None:
            click.echo(f"the unusable index was moved aside to {done.moved_aside}")
        for problem in done.problems:
            click.echo(f"damaged: {problem}")
        damaged = f" ({len(done.damaged)} damaged: {', '.join(done.damaged)})" if done.damaged else ""
        click.echo(f"indexed {plural(done.runs, 'run')}{damaged} into {runs_dir}/engineflow.db")

    guarded(go, debug, "runs reindex failed")


@runs_group.command("trust")
@click.argument("run_ref", metavar="RUN")
@runs_dir_option
@debug_option
def runs_trust(run_ref: str, runs_dir: str, debug: bool) -> None:
    """Sign RUN's code snapshot as it is now with your key, once you have reviewed its code/ folder.

    Loading a run imports its snapshot: one recorded by another user or machine, or by an earlier
    engineflow version, needs --trust-code until it is signed; a snapshot changed since the run was
    recorded is refused until it is signed again.
    """

    def go() -> None:
        from pathlib import Path

        from engineflow.record.trust import key_path, trust_run

        record = trust_run(runs_dir, run_ref)
        files = len(record["code"]["digests"]["files"])
        click.echo(f"signed run {record['id']}: the {files} files of {Path(record['run_dir']) / 'code'} as they are "
                   f"now, with your key {key_path()}")

    guarded(go, debug, "runs trust failed")


@runs_group.command("sync")
@click.argument("run_ref", metavar="[RUN]", required=False)
@runs_dir_option
@debug_option
def runs_sync(run_ref: str | None, runs_dir: str, debug: bool) -> None:
    """Push what MLflow has not received yet, for RUN or every run that mirrors to MLflow.

    One line per run: what was pushed, "up to date", or why its server could not be reached. Runs
    found dead are marked KILLED there first. Exit 1 when something is still pending.
    """

    def go() -> None:
        from engineflow.record.mirror import sync

        results = sync(runs_dir, run_ref)
        for done in results:
            click.echo(done.line())
        if not results:
            click.echo("no run mirrors to MLflow")
        if any(done.result.error is not None for done in results):
            sys.exit(EXIT_TRAINING_FAILED)

    guarded(go, debug, "runs sync failed")


def entry() -> None:
    """The ``engineflow`` console script: :func:`main`, then an exit without the module teardown
    (see :mod:`engineflow.app.fast_exit`). The command, not the library, opts in to Ignite's shorter
    first import (see :mod:`engineflow.app.ignite_import`)."""
    from engineflow.app import ignite_import
    from engineflow.app.fast_exit import exit_process

    ignite_import.install()
    try:
        main()
    except SystemExit as done:  # click's standalone mode always ends this way
        exit_process(done.code)
    exit_process(0)


if __name__ == "__main__":
    entry()
