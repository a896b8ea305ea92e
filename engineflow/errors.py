"""Errors engineflow raises, each mapped to one exit code of the CLI.

* :class:`RecipeError` (exit 2): the recipe or the command line is wrong; the message says
  which file, which function, what was expected and what to do.
* :class:`TrainingError` (exit 1): the recipe is fine but training itself failed (loss became NaN).
* :class:`StoreError` (exit 1): the run index could not be read or written (locked too long, disk
  full); the run folders still hold every run. Its :class:`StoreUsageError` branch (exit 2) is a
  request the index cannot serve: an unknown or ambiguous run id, a damaged or newer index file.
* :class:`WriteError` (exit 1): a file of a run could not be written; the message names the file.
  :class:`DiskFullError` when no space was left (a full disk or quota, or the file size limit).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class EngineflowError(Exception):
    """Base class of the errors engineflow reports without a traceback."""

    exit_code: int = EXIT_TRAINING_FAILED


class RecipeError(EngineflowError):
    """A recipe, its config or the command line is not what engineflow expects."""

    exit_code = EXIT_USAGE


class ConfigError(RecipeError):
    """An override names an unknown key or has a value of the wrong type."""


class TrainingError(EngineflowError):
    """Training started but could not go on (for example the loss became NaN or inf)."""

    exit_code = EXIT_TRAINING_FAILED


class StoreError(EngineflowError):
    """The run index (``<runs_dir>/engineflow.db``) failed to read or write; the message says what to do."""

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
    """The recipe's ``setup()`` raised: the recipe's own error is chained, its frames shown first."""


class StepCheckError(TrainingError):
    """A step raised on the batch engineflow tries before training (nothing was recorded yet)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite at a known iteration."""

    def __init__(self, value: float, *, epoch: int, iteration: int, name: str = "loss") -> None:
        what = "the loss" if name == "loss" else f"the loss {name!r}"
        super().__init__(
            f"{what} became {value} at iteration {iteration} (epoch {epoch}); training stopped. "
            "Lower the learning rate, check the inputs for NaN, or clip gradients."
        )
        self.name = name
        self.value = value
        self.epoch = epoch
        self.iteration = iteration


class HandlerError(EngineflowError):
    """A user handler raised: the original error is chained, the handler and event are named."""
