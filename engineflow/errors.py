"""Errors engineflow raises, each mapped to one exit code of the CLI.

* :class:`RecipeError` (exit 2): the recipe or the command line is wrong; the message says
  which file, which function, what was expected and what to do.
* :class:`TrainingError` (exit 1): the recipe is fine but training itself failed (loss became NaN).
* :class:`StoreError` (exit 1): the run index could not be read or written (locked too long, disk
  full); the run folders still hold every run. Its :class:`StoreUsageError` branch (exit 2) is a
  request the index cannot serve: an unknown or ambiguous run id, a damaged or newer index file.
* :class:`TimeLimitReached` (exit 3, a ``KeyboardInterrupt``): ``--time-limit`` was spent; the run
  stopped with a checkpoint and continues with ``--resume``.
* :class:`WriteError` (exit 1): a file of a run could not be written; the message names the file.
  :class:`DiskFullError` when no space was left (a full disk or quota, or the file size limit).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TIME_LIMIT = 3  # stopped at --time-limit with a checkpoint: a job script resumes it (--resume)


class TimeLimitReached(KeyboardInterrupt):
    """The run's time limit (``--time-limit``) was spent: a checkpoint was written at the end of the
    current iteration and training stopped. An interruption (every cleanup runs, status
    "interrupted"); :func:`engineflow.run` returns the run's result instead of raising it, and the
    command exits with :data:`EXIT_TIME_LIMIT`.
    """

    exit_code = EXIT_TIME_LIMIT


class EngineflowError(Exception):
    """Base class of the errors engineflow reports without a traceback.

    ``exit_code`` is the exit status the ``engineflow`` command gives it: catch this class to handle
    every error engineflow reports, as the command does.

    Example:
        >>> import engineflow as ef
        >>> try:
        ...     ef.config(lr=0.1).override({"lr": "fast"})
        ... except ef.EngineflowError as err:
        ...     print(f"error: {err} (exit {err.exit_code})")
        error: config key 'lr' expects a float (default 0.1), got 'fast' (exit 2)
    """

    exit_code: int = EXIT_TRAINING_FAILED


class RecipeError(EngineflowError):
    """A recipe, its config or the command line is not what engineflow expects.

    Example:
        >>> import engineflow as ef
        >>> try:
        ...     ef.checkpoints(keep_last=0)
        ... except ef.RecipeError as err:
        ...     print(err, "| exit", err.exit_code)
        checkpoints(keep_last=...) must keep at least 1, or a run could not resume | exit 2
    """

    exit_code = EXIT_USAGE


class ConfigError(RecipeError):
    """An override names an unknown key or has a value of the wrong type.

    Example:
        >>> import engineflow as ef
        >>> try:
        ...     ef.config(lr=0.1, epochs=3).override({"lrate": "0.5"})
        ... except ef.ConfigError as err:
        ...     print(err)
        unknown config key 'lrate'. Valid keys: lr, epochs
    """


class TrainingError(EngineflowError):
    """Training started but could not go on (for example the loss became NaN or inf).

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64, "lr": 1e30})  # far too high
        >>> try:
        ...     fit.run(epochs=1)
        ... except ef.TrainingError as err:
        ...     print(type(err).__name__, "| exit", err.exit_code)
        NonFiniteLossError | exit 1
    """

    exit_code = EXIT_TRAINING_FAILED


class StoreError(EngineflowError):
    """The run index (``<runs_dir>/engineflow.db``) failed to read or write; the message says what to do.

    Example:
        >>> import tempfile
        >>> import engineflow as ef
        >>> try:
        ...     ef.load_run("last", runs_dir=tempfile.mkdtemp())  # a runs folder with no runs
        ... except ef.StoreError as err:
        ...     print(type(err).__name__, "| exit", err.exit_code, "|", str(err).startswith("no runs yet"))
        UnknownRunError | exit 2 | True
    """

    exit_code = EXIT_TRAINING_FAILED


class WriteError(EngineflowError):
    """A file engineflow writes could not be written; the message names the file and why.

    Attributes:
        path: the file.
    """

    exit_code = EXIT_TRAINING_FAILED

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class DiskFullError(WriteError):
    """No space was left for a file: the disk or a quota is full, or the process's file size limit
    (``ulimit -f``) was reached. The message starts "No space left on device while writing FILE"."""


class StoreFullError(StoreError, DiskFullError):
    """The run index could not grow: no space was left for it (see :class:`DiskFullError`)."""


class StoreUsageError(StoreError, RecipeError):
    """The run index cannot serve the request as asked (an unknown run id, a damaged index file)."""

    exit_code = EXIT_USAGE


class UnknownRunError(StoreUsageError):
    """No run matches the id, prefix or ``last`` that was asked for."""


class AmbiguousRunError(StoreUsageError):
    """An id prefix matches more than one run."""


class SetupError(TrainingError):
    """The recipe's ``setup()`` raised: the recipe's own error is chained, its frames shown first.

    Example:
        >>> import engineflow as ef
        >>> try:
        ...     ef.build("recipes/sine.py", {"batch_size": 0})  # setup() makes a DataLoader of it
        ... except ef.SetupError as err:
        ...     print(repr(err.__cause__), "| exit", err.exit_code)
        ValueError('batch_size should be a positive integer value, but got batch_size=0') | exit 1
    """


class StepCheckError(TrainingError):
    """A step raised on the batch engineflow tries before training (nothing was recorded yet).

    Example:
        >>> import io, tempfile, textwrap
        >>> from pathlib import Path
        >>> import engineflow as ef
        >>> recipe = Path(tempfile.mkdtemp()) / "shapes.py"
        >>> _ = recipe.write_text(textwrap.dedent('''
        ...     import torch
        ...     import engineflow as ef
        ...
        ...     def setup(cfg):
        ...         model = torch.nn.Linear(4, 2)
        ...         data = [(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))]
        ...         return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...                     loss_fn=torch.nn.functional.cross_entropy, loaders={"train": data, "valid": data})
        ...
        ...     @ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
        ...     def evaluate(batch, model):
        ...         x, y = batch
        ...         return {"y_pred": model(x.T), "y": y}  # x.T: a mistake
        ... '''))
        >>> try:
        ...     ef.run(recipe, device="cpu", runs_dir=recipe.parent / "runs", stream=io.StringIO())
        ... except ef.StepCheckError as err:
        ...     print(type(err.__cause__).__name__, "| exit", err.exit_code, "|", "first batch" in str(err))
        RuntimeError | exit 1 | True
    """


class NonFiniteLossError(TrainingError):
    """A loss of the train step (``name``: ``loss``, ``g_loss``...) became NaN or infinite at a known
    iteration; no checkpoint is written from that iteration or a later one.

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64, "lr": 1e30})  # far too high
        >>> try:
        ...     fit.run(epochs=1)
        ... except ef.NonFiniteLossError as err:
        ...     print(err.name, err.epoch, err.iteration)
        loss 1 2
    """

    def __init__(self, value: float, *, epoch: int, iteration: int, name: str = "loss") -> None:
        what = "the loss" if name == "loss" else f"the loss {name!r}"
        super().__init__(
            f"{what} became {value} at iteration {iteration} (epoch {epoch}); training stopped, and no "
            "checkpoint holds that iteration or a later one (--resume continues from the last one before it). "
            "Lower the learning rate, check the inputs for NaN, or clip gradients."
        )
        self.name = name
        self.value = value
        self.epoch = epoch
        self.iteration = iteration


class HandlerError(EngineflowError):
    """A user handler raised: the original error is chained, the handler and event are named.

    Example:
        >>> import engineflow as ef
        >>> @ef.train_step
        ... def train(batch):
        ...     return {"loss": batch}
        >>> def log(state):
        ...     raise KeyError("lr")
        >>> trainer = ef.engine(train)
        >>> handle = ef.on(ef.Events.ITERATION_COMPLETED, log, engine=trainer)
        >>> try:
        ...     trainer.run([1.0, 2.0])
        ... except ef.HandlerError as err:
        ...     print(repr(err.__cause__), "|", str(err).split(" (")[0], "|", "ITERATION_COMPLETED" in str(err))
        KeyError('lr') | handler 'log' | True
    """
