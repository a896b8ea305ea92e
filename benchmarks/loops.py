"""The training loops under test, each timed around its training only (not imports or data set-up).

Every function trains ``workload`` from the same seed and returns ``{"seconds", "cpu_seconds",
"iterations"}`` (wall and process CPU time of the loop).
They import what they measure inside the function, so a raw loop's process never loads Ignite.
engineflow is used through its real code paths: :func:`engineflow.execute.engine.make_engine`, the
handler decorators with :func:`engineflow.execute.engine.attach_in_order`, and :func:`engineflow.run`.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import timing
from benchmarks.workloads import Workload, make_data, make_loader, make_model, make_optimizer

RECIPE = Path(__file__).resolve().parent / "recipes" / "train.py"
Result = dict[str, Any]


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    """One training step, the same in every configuration that writes its own step."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def _parts(workload: Workload, loader: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Iterable[Any]]:
    torch.manual_seed(0)
    x, y, _, _ = make_data(workload)
    model = make_model(workload)
    train = make_loader(x, y, kind=loader, batch_size=workload.batch_size, shuffle=True)
    return model, make_optimizer(model, workload), train


def raw(workload: Workload, loader: str = "dataloader") -> Result:
    """The loop a user writes by hand: for each epoch, for each batch, one step."""
    model, optimizer, train = _parts(workload, loader)
    iterations = 0
    clock = timing.Clock()
    for _ in range(workload.epochs):
        for x, y in train:
            sgd_step(model, optimizer, x, y)
            iterations += 1
    return clock.stop(iterations)


def ignite(workload: Workload, loader: str = "dataloader") -> Result:
    """A plain Ignite ``Engine`` around the same step, no handlers."""
    from ignite.engine import Engine

    model, optimizer, train = _parts(workload, loader)

    def update(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return sgd_step(model, optimizer, x, y)

    engine = Engine(update)
    clock = timing.Clock()
    engine.run(train, max_epochs=workload.epochs)
    return clock.stop(engine.state.iteration)


def engineflow(workload: Workload, loader: str = "dataloader", handlers: int = 0, every: int = 100) -> Result:
    """engineflow's engine with a step function, and ``handlers`` no-op handlers due every ``every`` iterations."""
    model, optimizer, train = _parts(workload, loader)
    engine = _engineflow_engine(model, optimizer, handlers, every)
    clock = timing.Clock()
    engine.run(train, max_epochs=workload.epochs)
    return clock.stop(engine.state.iteration)


def _engineflow_engine(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None, handlers: int,
                       every: int, step: Callable[..., dict[str, Any]] | None = None) -> Any:
    import engineflow as ef
    from engineflow.declare.handlers import handler_specs
    from engineflow.declare.steps import StepSpec
    from engineflow.execute.engine import attach_in_order, make_engine

    def train_step(batch: tuple[torch.Tensor, torch.Tensor], model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": sgd_step(model, optimizer, x, y)}

    provided = {"model": model, "optimizer": optimizer}
    engine = make_engine(StepSpec("train", step or train_step), provided)
    # Declared with the decorator and attached as the recipe loader attaches a recipe's handlers.
    specs = [spec for index in range(handlers) for spec in handler_specs(ef.every_n_iterations(every)(_no_op(index)))]
    attach_in_order(engine, specs, provided)
    return engine


def paired(workload: Workload, *, variants: list[str], loader: str = "dataloader", blocks: int = 4,
           every: int = 100) -> Result:
    """Several loops in one process, an epoch each in turn, on the same model, optimizer and loader.

    ``variants`` name the loops: "raw", "raw_recorded" (the raw loop validating and checkpointing each
    epoch by hand), "ignite", "engineflow", "engineflow+N" (N no-op handlers due every ``every``
    iterations), or "engineflow_recipe" (a whole ``engineflow.run`` of one epoch with
    every default handler, on its own model of the same workload, timed by the recipe's clock). Block
    ``b`` runs them rotated by ``b`` (A B C, B C A, C A B...), so that drift in the machine's speed and
    the position in a block hit each alike. A few microseconds per iteration, or a percent of a
    compute-bound epoch, are below what separate processes resolve on a shared machine; paired epochs
    resolve them.

    Returns the first variant's timing (the reference), and for each variant ``<v>_us`` (median CPU
    us/iteration) and, for the others, ``<v>_extra_us`` and ``<v>_ratio``: medians over blocks of the
    difference and ratio to the reference's epoch in the same block (``<v>_extra_ms_epoch``: the
    difference per epoch; ``<v>_thread_extra_ms_epoch`` and ``<v>_wall_extra_ms_epoch``: the same by
    the training thread's CPU time and by wall time).
    """
    model, optimizer, train = _parts(workload, loader)
    epochs = {name: _epoch_runner(name, model, optimizer, train, every, workload, loader) for name in variants}
    return alternate(epochs, variants, blocks)


def dispatch(*, variants: list[str], iterations: int, blocks: int = 12, every: int = 100) -> Result:
    """The handlers' own cost: ``paired`` on engineflow's engine with a step that does nothing.

    ``variants`` are "engineflow" and "engineflow+N" (N no-op handlers due every ``every``
    iterations). With no model and no data, what is left per iteration is Ignite's loop and the
    dispatch of the handlers, a few microseconds that a training loop's noise would hide.
    """
    batches = [None] * iterations
    epochs = {}
    for name in variants:
        engine = _engineflow_engine(None, None, int(name.partition("+")[2] or 0), every, step=_nothing)
        epochs[name] = _timed(_engine_epoch(engine, batches))
    return alternate(epochs, variants, blocks)


def _nothing(batch: Any) -> dict[str, Any]:
    return {}


def alternate(epochs: dict[str, Callable[[], Result]], variants: list[str], blocks: int,
              pairs: Iterable[tuple[str, str]] = ()) -> Result:
    """Run ``epochs`` in rotated blocks and compare each variant with the first (see :func:`paired`).

    ``pairs`` are more comparisons, ``(a, b)``: ``<a>_over_<b>_ratio`` and ``<a>_over_<b>_extra_us``,
    medians over blocks of a's epoch against b's in the same block.
    """
    import statistics

    clocks = {"": "cpu_seconds", "thread_": "thread_cpu_seconds", "wall_": "seconds"}
    per_iteration: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in variants} for clock in clocks}
    reference = {"seconds": 0.0, "cpu_seconds": 0.0, "iterations": 0}
    epoch_length = 0
    for block in range(blocks):
        shift = block % len(variants)
        for name in variants[shift:] + variants[:shift]:
            result = epochs[name]()
            for clock, key in clocks.items():
                per_iteration[clock][name].append(1e6 * result[key] / result["iterations"])
            if name == variants[0]:
                reference = {key: reference[key] + result[key] for key in reference}
                epoch_length = result["iterations"]
    details: dict[str, float] = {}
    base = per_iteration[""][variants[0]]
    for name, values in per_iteration[""].items():
        details[f"{name}_us"] = statistics.median(values)
        if name != variants[0]:
            extra = statistics.median(v - b for v, b in zip(values, base, strict=True))
            details[f"{name}_extra_us"] = extra
            details[f"{name}_extra_ms_epoch"] = extra * epoch_length / 1000
            details[f"{name}_ratio"] = statistics.median(v / b for v, b in zip(values, base, strict=True))
    for a, b in pairs:
        values, others = per_iteration[""][a], per_iteration[""][b]
        details[f"{a}_over_{b}_extra_us"] = statistics.median(v - o for v, o in zip(values, others, strict=True))
        details[f"{a}_over_{b}_ratio"] = statistics.median(v / o for v, o in zip(values, others, strict=True))
    # The same extra per epoch by the training thread's CPU time and by wall time: work a background
    # thread does is in the process's CPU time but not in the training thread's.
    for clock in ("thread_", "wall_"):
        times = per_iteration[clock]
        for name in variants[1:]:
            extra = statistics.median(v - b for v, b in zip(times[name], times[variants[0]], strict=True))
            details[f"{name}_{clock}extra_ms_epoch"] = extra * epoch_length / 1000
    return {**reference, **details}


def _epoch_runner(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any],
                  every: int, workload: Workload, loader: str) -> Callable[[], Result]:
    """A function that trains one epoch with the loop ``name`` and returns its timing."""
    if name == "engineflow_recipe":
        one_epoch = workload.scaled(samples=workload.samples, epochs=1)
        return lambda: engineflow_recipe(one_epoch, loader)
    if name == "raw_recorded":
        return _timed(_raw_recorded_epoch(model, optimizer, train, workload))
    if name == "raw":
        def raw_epoch() -> int:
            iterations = 0
            for x, y in train:
                sgd_step(model, optimizer, x, y)
                iterations += 1
            return iterations

        return _timed(raw_epoch)
    if name == "ignite":
        from ignite.engine import Engine

        engine = Engine(lambda engine, batch: sgd_step(model, optimizer, *batch))
    elif name == "engineflow" or name.startswith("engineflow+"):
        handlers = int(name.partition("+")[2] or 0)
        engine = _engineflow_engine(model, optimizer, handlers, every)
    else:
        raise ValueError(f"unknown loop {name!r}; use raw, raw_recorded, ignite, engineflow, engineflow+N or "
                         "engineflow_recipe")

    return _timed(_engine_epoch(engine, train))


def _engine_epoch(engine: Any, train: Iterable[Any]) -> Callable[[], int]:
    def epoch() -> int:
        engine.run(train, max_epochs=1)
        return engine.state.iteration

    return epoch


def _raw_recorded_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Any],
                        workload: Workload) -> Callable[[], int]:
    """The raw loop doing by hand what engineflow's default handlers do each epoch: validate (accuracy
    and loss on the same samples/64, batches of 1024) and save model and optimizer (fsync, rename)."""
    import os

    _, _, x_valid, y_valid = make_data(workload)
    folder = Path(tempfile.mkdtemp(prefix="engineflow-bench-"))

    def epoch() -> int:
        iterations = 0
        model.train()
        for x, y in train:
            sgd_step(model, optimizer, x, y)
            iterations += 1
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for start in range(0, len(x_valid), 1024):
                x, y = x_valid[start:start + 1024], y_valid[start:start + 1024]
                logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        model.train()
        tmp = folder / "checkpoint.pt.tmp"
        with tmp.open("wb") as out:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "valid": (correct / len(y_valid), loss_sum / len(y_valid))}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, folder / "checkpoint.pt")
        return iterations

    return epoch


def _timed(epoch: Callable[[], int]) -> Callable[[], Result]:
    def run() -> Result:
        clock = timing.Clock()
        return clock.stop(epoch())

    return run


def _no_op(index: int) -> Any:
    def no_op(state: Any) -> None:
        return None

    no_op.__name__ = no_op.__qualname__ = f"no_op_{index}"
    return no_op


def engineflow_recipe(workload: Workload, loader: str = "dataloader") -> Result:
    """``engineflow.run`` of the benchmark recipe: engineflow's default handlers, output to a string.

    Timed from the train engine's ``STARTED`` to its ``COMPLETED`` (two handlers of the recipe),
    which covers the loss monitor, validation with metrics, history, best epoch, the epoch lines
    and ``history.json``, but not loading the recipe or writing the run folder's first files.
    """
    import engineflow as ef

    overrides = {**workload.__dict__, "hidden": list(workload.hidden), "loader": loader}
    del overrides["name"]
    with tempfile.TemporaryDirectory() as runs_dir:
        ef.run(RECIPE, overrides, device="cpu", runs_dir=runs_dir, progress=False, stream=io.StringIO())
        # What the default handlers wrote (checkpoints, event files...), so the results say what they cover.
        outputs = _outputs(Path(runs_dir))
    return {**timing.result(), "outputs": outputs}


def _outputs(runs_dir: Path) -> list[str]:
    folders = [p.parent for p in runs_dir.rglob("config.json")]
    if not folders:
        return []
    entries = []
    for entry in sorted(folders[0].iterdir()):
        count = sum(1 for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else 0
        entries.append(f"{entry.name}/ ({count} files)" if entry.is_dir() else entry.name)
    return entries


def lightning(workload: Workload, loader: str = "dataloader") -> Result:
    """Lightning's ``Trainer`` with progress bar, logger, checkpointing and model summary off."""
    import warnings

    import lightning as L

    model, _, train = _parts(workload, loader)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.model, workload)

    class Clock(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            timing.start()

        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            timing.stop(trainer.global_step)

    warnings.filterwarnings("ignore")  # "the dataloader does not have many workers", and the like
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=workload.epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Clock()],
            default_root_dir=root,
        )
        trainer.fit(Module(), train_dataloaders=train)
    return timing.result()


LOOPS = {"raw": raw, "ignite": ignite, "engineflow": engineflow, "engineflow_recipe": engineflow_recipe,
         "lightning": lightning, "paired": paired}


def measure(loop: str, *, workload: dict[str, Any] | None = None, **options: Any) -> Result:
    """What :mod:`benchmarks.worker` calls: ``LOOPS[loop](workload, **options)``, or ``dispatch(**options)``
    (no workload: no model, no data)."""
    if loop == "dispatch":
        return dispatch(**options)
    if workload is None:
        raise ValueError(f"loop {loop!r} needs a workload")
    return LOOPS[loop](Workload(**{**workload, "hidden": tuple(workload["hidden"])}), **options)
