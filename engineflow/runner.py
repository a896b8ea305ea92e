"""``ef.run`` and ``ef.build``: a recipe file in, a trained model and its record out.

``build`` loads a recipe, seeds every RNG, calls ``setup`` and wires the engines, without
running anything. ``run`` does that, trains, and writes the run folder
``<runs_dir>/<experiment>/<run_id>/`` (``config.json``, ``history.json``, ``summary.json``,
``log.txt``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from engineflow.configuration import Config
from engineflow.errors import RecipeError
from engineflow.fit import Fit, build_fit, take
from engineflow.handlers import HandlerSpec
from engineflow.injection import describe, make_caller
from engineflow.recipe import Recipe, load_recipe
from engineflow.report import Reporter, format_metrics
from engineflow.runtime import RunContext, new_run_id, resolve_device, seed_everything

CHECK_BATCHES = 2
CHECK_EPOCHS = 2


@dataclass
class RunResult:
    """What a finished run reports (also saved as ``summary.json`` in its folder).

    Attributes:
        run_id: the run's id.
        experiment: the recipe's experiment name.
        status: "completed", "failed" or "interrupted".
        run_dir: the folder of its outputs.
        config: the resolved config values.
        seed: the seed used.
        device: the device used, e.g. "cpu".
        epochs: epochs completed.
        history: one dict of metrics per epoch.
        metrics: the last epoch's metrics.
        best: ``{"metric", "mode", "epoch", "value"}`` of the main metric.
        duration_s: wall time of the fit in seconds.
        error: the error message of a failed run.
    """

    run_id: str
    experiment: str
    status: str
    run_dir: Path
    config: dict[str, Any]
    seed: int
    device: str
    epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "run_dir": str(self.run_dir)}


def resolve_config(recipe: Recipe, overrides: Mapping[str, Any] | None, seed: int | None) -> tuple[Config, int]:
    """Apply overrides and the seed to the recipe's defaults; returns (config, seed)."""
    cfg = recipe.config.override(overrides or {})
    if seed is not None and "seed" in cfg:
        cfg = cfg.override({"seed": seed})
    if seed is None:
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"{recipe.path}: config 'seed' must be an int, got {seed!r}")
    epochs = cfg.get("epochs", 1)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
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
) -> tuple[Fit, Config, RunContext]:
    """Load a recipe and build its engines without running them.

    Returns:
        ``(fit, cfg, context)``: the engines and records, the resolved config, the run's context.

    Example::

        fit, cfg, ctx = ef.build("recipes/digits.py", {"hidden": 32})
        fit.evaluate("valid")        # the untrained model
        fit.run(epochs=3)            # the train engine, with validation each epoch
        fit.train.state.metrics      # plain Ignite underneath
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    cfg, seed = resolve_config(recipe, overrides, seed)
    if context is None:
        context = RunContext("interactive", recipe.name, Path("."), resolve_device(device), seed, check)
    seed_everything(seed)
    components = _setup(recipe, cfg, context)
    if check:
        components["loaders"] = {name: take(loader, CHECK_BATCHES) for name, loader in components["loaders"].items()}
    provided = {**components, "cfg": cfg, "device": context.device, "run": context}
    return build_fit(recipe, components, provided, extras=extras), cfg, context


def _setup(recipe: Recipe, cfg: Config, context: RunContext) -> dict[str, Any]:
    if recipe.setup is None:
        raise RecipeError(
            f"{recipe.path}: no setup(cfg) function; define one that returns the model, optimizer and "
            "loaders=dict(train=..., valid=...)"
        )
    call = make_caller(recipe.setup, provided={"cfg": cfg, "device": context.device, "run": context}, what="setup")
    components = call({})
    if not isinstance(components, Mapping):
        raise RecipeError(
            f"setup {describe(recipe.setup)} returned {type(components).__name__}; it must return a dict "
            "such as dict(model=..., optimizer=..., loaders={'train': ..., 'valid': ...})"
        )
    components = dict(components)
    if "loaders" not in components:
        raise RecipeError(
            f"setup {describe(recipe.setup)} returned no 'loaders'; return "
            "loaders={'train': train_loader, 'valid': valid_loader} with the other components"
        )
    return {name: _to_device(value, context.device) if name != "loaders" else value
            for name, value in components.items()}


def _to_device(value: Any, device: torch.device) -> Any:
    """Modules (alone or in a dict, e.g. a GAN's) move to the device; ``.to`` keeps their parameters,
    so optimizers built in setup stay valid."""
    if isinstance(value, torch.nn.Module):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in value.items()}
    return value


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
        retrain: reset that completed run and train it again under the same id.

    Returns:
        the :class:`RunResult`; the run's record is in ``<run_dir>/run.json`` and the store.

    Raises:
        RecipeError: a bad recipe or override, or a repeat of a completed run (CLI exit code 2).
        TrainingError: training failed, e.g. the loss became NaN (CLI exit code 1).

    Example::

        result = ef.run("recipes/digits.py", {"epochs": 5}, device="cpu")
        result.best  # {'metric': 'valid/accuracy', 'mode': 'max', 'epoch': 5, 'value': 0.94...}
    """
    from engineflow.registry.recorder import RunRecorder, environment, now_iso
    from engineflow.registry.snapshot import capture
    from engineflow.registry.store import RunStore

    loaded = load_recipe(recipe)
    cfg, seed = resolve_config(loaded, overrides, seed)
    epochs = CHECK_EPOCHS if check else cfg.get("epochs", 1)
    runs_root = resolve_runs_dir(runs_dir)
    code = capture(loaded.path)
    store = RunStore.open(runs_root)
    run_id = _claim_run_id(store, code.fingerprint(cfg.to_dict()), check=check, force=force, retrain=retrain)
    context = RunContext(run_id, loaded.name, runs_root / loaded.name / run_id, resolve_device(device), seed, check)
    record = {
        "id": run_id, "experiment": loaded.name, "status": "running", "started_at": now_iso(), "ended_at": None,
        "config": cfg.to_dict(), "seed": seed, "check": check, "epochs": 0, "max_epochs": epochs,
        "metrics": {}, "best": {}, "run_dir": str(context.run_dir.resolve()), "recipe": str(loaded.path),
        "code": code.record(cfg.to_dict()), "env": environment(str(context.device)), "error": None,
        "artifacts": {}, "resumes": [],
    }
    recorder = RunRecorder.start(store, context.run_dir, record, code)
    reporter = Reporter(stream, progress=progress, log_path=context.run_dir / "log.txt")
    reporter.line(f"run {run_id} ({loaded.name}) on {context.device}, seed {seed}, {epochs} epochs"
                  + (" [check]" if check else ""))
    result = RunResult(run_id, loaded.name, "running", context.run_dir, cfg.to_dict(), seed, str(context.device))
    holder: list[Fit] = []
    started = time.monotonic()
    try:
        with _sigterm_as_interrupt():
            fit, _, _ = build(loaded, overrides, seed=seed, check=check, context=context,
                              extras=(reporter.handlers, recorder.handlers))
            holder.append(fit)
            fit.run(epochs)
        result.status = "completed"
    except KeyboardInterrupt:
        result.status = "interrupted"
        raise
    except BaseException as err:
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        raise
    finally:
        result.duration_s = time.monotonic() - started
        if holder:
            result.history = holder[0].history
            result.epochs = len(result.history)
            result.metrics = dict(result.history[-1]) if result.history else {}
            result.best = holder[0].best.as_dict()
        recorder.finish(result.status, error=result.error, final=result.metrics)
        store.close()
    _summarise(reporter, result)
    return result


def resolve_runs_dir(runs_dir: str | Path | None) -> Path:
    """The runs folder: the argument, else ``$ENGINEFLOW_RUNS_DIR``, else ``./runs``."""
    import os

    return Path(runs_dir if runs_dir is not None else os.environ.get("ENGINEFLOW_RUNS_DIR", "runs"))


def _claim_run_id(store: Any, fingerprint: str, *, check: bool, force: bool, retrain: bool) -> str:
    """A new run id, or the id of the completed run that ``retrain`` resets.

    A completed (non-check) run with the same code and config means this run would repeat it:
    refuse unless ``force`` (a new run anyway) or ``retrain`` (reset that one).
    """
    if force and retrain:
        raise RecipeError("--force and --retrain exclude each other: --force makes a new run, --retrain resets the old")
    done = [] if check else [r for r in store.find_completed(fingerprint) if not r.get("check")]
    if not done or force:
        return new_run_id()
    previous = done[0]
    if not retrain:
        raise RecipeError(
            f"run {previous['id']} ({previous['run_dir']}) already completed with this code and config. "
            "Use --force to train a new run anyway, or --retrain to reset that run and train it again."
        )
    import shutil

    shutil.rmtree(previous["run_dir"], ignore_errors=True)
    store.delete_run(previous["id"])
    return str(previous["id"])


class _sigterm_as_interrupt:  # noqa: N801 - used as a context manager, reads like one
    """Within the block, SIGTERM raises KeyboardInterrupt: the run is marked interrupted, exit 130."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _summarise(reporter: Reporter, result: RunResult) -> None:
    best = result.best
    reporter.line(f"completed {result.epochs} epochs in {result.duration_s:.1f}s")
    if best.get("epoch") is not None:
        reporter.line(f"best epoch {best['epoch']}: {best['metric']} = {best['value']:.4f} ({best['mode']})")
    if result.metrics:
        reporter.line(f"last epoch: {format_metrics(result.metrics)}")
    reporter.line(f"outputs: {result.run_dir}")
