"""End the ``engineflow`` command without CPython's teardown of every module.

Once torch, its compiler stack (torch._dynamo and sympy, which creating any optimizer imports) and
the recipe's libraries are loaded, a Python process spends a noticeable time after its last line
freeing thousands of modules one object at a time (``benchmarks/README.md`` has the figure), and it
buys nothing: the operating system frees the memory at once.

:func:`exit_process` first does what that teardown would still do that matters, in the same order
as a normal exit, then ends the process with ``os._exit``:

1. waits as a normal exit does if another non-daemon thread is running: then it simply exits
   normally (nothing is skipped);
2. runs the ``atexit`` handlers (logging's shutdown, multiprocessing's children, ``tempfile``'s
   and ``weakref.finalize`` clean-ups, anything the recipe registered);
3. flushes and closes every open file object, including ones a recipe opened and never closed,
   as a normal exit does when it frees them (a gzip file gets its trailer, a text file its buffer).

Only the command line uses it, never ``engineflow.run()`` in someone else's process.
``ENGINEFLOW_FULL_EXIT=1`` restores the normal exit.
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import threading
from typing import NoReturn

OPT_OUT = "ENGINEFLOW_FULL_EXIT"


def exit_code_of(code: object) -> int:
    """The process exit code ``sys.exit(code)`` gives: None is 0, an int itself, anything else 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what the interpreter does with sys.exit("message")
    return 1


def exit_process(code: object) -> NoReturn:
    """Exit with ``code`` as ``sys.exit`` would, skipping the module teardown (see the module)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or "torch" not in sys.modules or os.environ.get(OPT_OUT) == "1":
        sys.exit(code)  # a light process (--help, runs list) tears down in milliseconds
    status = exit_code_of(code)
    atexit._run_exitfuncs()
    _close_open_files()
    os._exit(status)


def _close_open_files() -> None:
    standard = {id(s) for s in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)}
    # type() and issubclass, not isinstance: some lazy objects warn or import when asked their __class__.
    files = [obj for obj in gc.get_objects() if issubclass(type(obj), io.IOBase)]
    # The outer layer first: a text file's pending characters go through its buffer to the raw file.
    files.sort(key=lambda f: 0 if isinstance(f, io.TextIOBase) else 1 if isinstance(f, io.BufferedIOBase) else 2)
    for stream in files:
        try:
            if stream.closed:
                continue
            if id(stream) in standard:
                stream.flush()
            else:
                stream.close()
        except (OSError, ValueError, AttributeError):  # a broken pipe or detached buffer has nothing to save
            continue
