"""What each process of a launch runs (``python -m engineflow.app.launched FOLDER``, or forked by
:func:`engineflow.app.workers.serve`): the command of ``FOLDER/spec.json`` ("run" or "test"), rank
0's result written to ``result.json``, a failed rank's error to ``rank-<r>.json``, and the process
ended as the command line ends it (:mod:`engineflow.app.command_errors`).

The launcher's side is :mod:`engineflow.app.launch`, which the commands import to start their
processes; this side imports the commands, so it is a module of its own.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engineflow.app.command_errors import guarded
from engineflow.app.workers import serve, warm_spawned
from engineflow.errors import EXIT_INTERRUPTED, EXIT_TRAINING_FAILED, RecipeError


def worker(folder: Path) -> None:
    """Run the command of ``folder``'s spec as rank ``$RANK``, write its result or error into ``folder``,
    and end the process with the command line's exit code."""
    from engineflow.app.fast_exit import exit_process

    spec = json.loads((folder / "spec.json").read_text())
    rank = int(os.environ["RANK"])

    def go() -> None:
        try:
            result = _command(spec["command"])(**spec["kwargs"])
        except BaseException as err:
            code = getattr(err, "exit_code", EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt)
                           else EXIT_TRAINING_FAILED)
            lost = _lost_peer(err)
            (folder / f"rank-{rank}.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}",
                                                                  "exit_code": code, "lost_peer": lost}))
            if lost:  # the launcher reports the process that is gone; this one's error is only its echo
                raise SystemExit(EXIT_TRAINING_FAILED) from None
            raise
        if rank == 0:
            tmp = folder / "result.json.tmp"
            tmp.write_text(json.dumps(result, default=str))
            tmp.replace(folder / "result.json")

    try:
        guarded(go, False, "training failed")
    except SystemExit as done:
        exit_process(done.code)
    exit_process(0)


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a collective failing because another
    process is gone: then that process's failure is the one to report, not this consequence."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if type(current).__name__ in ("DistBackendError", "DistNetworkError") or (
                isinstance(current, RuntimeError)
                and any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer",
                                                  "Broken pipe"))):
            return True
        current = current.__cause__ or current.__context__
    return False


def _command(name: str) -> Callable[..., Any]:
    if name == "run":
        from engineflow.app.runner import run

        return lambda **kwargs: run(**kwargs).to_dict()
    if name == "trial":  # a sweep's trial on several processes
        from engineflow.app.sweep import run_trial

        return run_trial
    if name == "test":
        from engineflow.app.testing import evaluate_test

        return evaluate_test
    raise RecipeError(f"unknown command {name!r} for a launched worker")


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--fork":  # the process the workers are forked from (engineflow.app.workers)
            serve(Path(sys.argv[2]), int(sys.argv[3]), worker)
        else:
            warm_spawned()
            worker(Path(sys.argv[1]))
    except KeyboardInterrupt:  # Ctrl-C while the worker still imports: as the command says it
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)
