"""How a command ends on an error: one line and an exit code, a traceback only of the recipe's frames.

Used by every ``engineflow`` command and by each process of a launch (:mod:`engineflow.app.launched`),
so a launched rank reports an error exactly as the command would in one process.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from engineflow.errors import (
    EXIT_INTERRUPTED,
    EXIT_TRAINING_FAILED,
    EngineflowError,
    HandlerError,
    SetupError,
    StepCheckError,
)
from engineflow.files import NO_SPACE, write_error
from engineflow.naming import command_line


def guarded(action: Callable[[], Any], debug: bool, failed: str) -> None:
    """Run ``action``; turn engineflow's errors into one message and an exit code.

    ``failed`` names what failed when an unexpected exception escapes ("training failed" for ``run``
    only). Tracebacks show the recipe's frames; engineflow's, Ignite's and click's only with --debug.
    """
    try:
        with command_line():
            action()
    except EngineflowError as err:
        if debug:
            traceback.print_exc()
        elif isinstance(err, (SetupError, StepCheckError, HandlerError)) and err.__cause__ is not None:
            _print_user_traceback(err.__cause__)  # the recipe's own error: its frames say where
        if not getattr(err, "already_reported", False):  # a launched rank 0 printed its own
            click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if isinstance(err, OSError) and (err.errno in NO_SPACE or err.errno == errno.EROFS):
            # a write engineflow does not make itself (a library's, the recipe's): one line naming the file
            if debug:
                traceback.print_exc()
            click.echo(f"error: {write_error(err, err.filename or 'a file')}", err=True)
            sys.exit(EXIT_TRAINING_FAILED)
        if debug:
            traceback.print_exc()
        else:
            _print_user_traceback(err)
        click.echo(f"error: {failed} with the exception above", err=True)
        sys.exit(EXIT_TRAINING_FAILED)


def _print_user_traceback(err: BaseException) -> None:
    """``err``'s traceback without the frames of engineflow and the libraries that call the recipe."""
    frames = traceback.extract_tb(err.__traceback__)
    hidden_dirs = _package_dirs("engineflow", "ignite", "click")
    mine = [f for f in frames if not f.filename.startswith(hidden_dirs)]
    hidden = len(frames) - len(mine)
    note = f" ({hidden} frames of engineflow and Ignite hidden; --debug shows them)" if hidden and mine else ""
    lines = [f"Traceback (most recent call last){note}:\n", *traceback.format_list(mine or frames),
             *traceback.format_exception_only(type(err), err)]
    click.echo("".join(lines).rstrip("\n"), err=True)


def _package_dirs(*names: str) -> tuple[str, ...]:
    import importlib.util
    import os

    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(os.path.join(location, "") for location in spec.submodule_search_locations)
    return tuple(dirs)
