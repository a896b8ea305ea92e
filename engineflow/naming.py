"""How messages name an option: the command's flag under ``engineflow``, the Python argument elsewhere.

The same check (a repeat of a completed run, a resume of changed code) runs under the command line and
under ``ef.run()``; its message should name what that user typed: ``--force`` or ``force=True``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

# Python argument names that differ from the option's (``--run`` is ``ref=`` of select_run and load_run)
_ARGUMENTS = {"run": "ref", "set": "overrides", "from": "from_run"}
_NO_VALUE = object()

_command_line: contextvars.ContextVar[bool] = contextvars.ContextVar("engineflow_command_line", default=False)


@contextmanager
def command_line() -> Iterator[None]:
    """Messages raised inside the block name command-line flags (the ``engineflow`` command sets it)."""
    token = _command_line.set(True)
    try:
        yield
    finally:
        _command_line.reset(token)


def option(name: str, value: object = _NO_VALUE) -> str:
    """``--force`` under the command line, ``force=True`` from Python; with a value, ``--seed 7`` or ``seed=7``.

    Example:
        >>> option("ignore_changes"), option("device", "cpu")
        ('ignore_changes=True', "device='cpu'")
        >>> with command_line():
        ...     option("ignore_changes"), option("device", "cpu")
        ('--ignore-changes', '--device cpu')
    """
    if _command_line.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is _NO_VALUE else f"{flag} {value}"
    argument = _ARGUMENTS.get(name, name)
    return f"{argument}=True" if value is _NO_VALUE else f"{argument}={value!r}"
