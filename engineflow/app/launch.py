"""Several processes on one machine: ``engineflow run RECIPE --nproc N`` and ``ef.run(..., nproc=N)``.

The launcher starts N workers (:mod:`engineflow.app.workers`: spawned, or forked from one process
that imports torch once; each runs :mod:`engineflow.app.launched`) with the variables ``torchrun``
sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so a worker runs
the command as it would under ``torchrun``: :func:`process_group` initialises
``ignite.distributed`` from them (gloo on CPU, NCCL on CUDA). Being on one machine, they meet
through a file store in FOLDER (``mkdtemp``: this user's alone) instead of a TCP store, which would
listen on every interface, and gloo connects them over loopback (``GLOO_SOCKET_IFNAME=lo``).

What the launcher guarantees:

- **No orphans.** Each worker asks the kernel to kill it when the launcher dies
  (``PR_SET_PDEATHSIG``), so a SIGKILL of the launcher takes every worker with it.
- **One failure ends every rank.** When a worker exits with an error or a signal, the launcher
  gives the others :data:`GRACE_S` to end on their own (their next collective fails at once, since
  the dead peer's sockets are closed), then SIGTERM, then SIGKILL. The run is marked failed with the
  rank that failed first and its error.
- **Rank 0 speaks.** Rank 0's output is the run's (to ``stream`` when one is given); the other
  ranks' output goes to a log that the launcher prints when that rank failed first.
- **Interrupts** (SIGINT, SIGTERM) go to rank 0, which writes a checkpoint and stops as one process
  does; the others then stop when their next collective finds it gone.

The FOLDER holds ``spec.json`` (the command and its arguments), ``result.json`` (rank 0's result),
``run_id`` (the run rank 0 records) and ``rank-<r>.json`` (a failed rank's error).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engineflow.app import launch_folders
from engineflow.app.workers import Worker, forking, reap, start
from engineflow.errors import EXIT_INTERRUPTED, EXIT_TRAINING_FAILED, EngineflowError

if TYPE_CHECKING:
    from engineflow.execute.parallel import World

FOLDER_ENV = "ENGINEFLOW_LAUNCH_DIR"
TIMEOUT_ENV = "ENGINEFLOW_DIST_TIMEOUT_S"
GRACE_S = 10.0  # after one rank failed, how long the others get to end on their own
INTERRUPTED_GRACE_S = 2.0  # after rank 0 ended on an interrupt, how long the others get
TERM_S = 5.0  # after SIGTERM, how long before SIGKILL
POLL_S = 0.05


class WorkerError(EngineflowError):
    """A rank of a launched run failed; ``exit_code`` is that rank's (1 for a signal).

    ``already_reported``: rank 0 printed its own error, so the command line does not repeat it.
    """

    def __init__(self, message: str, exit_code: int, *, already_reported: bool) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.already_reported = already_reported


def distributed_env() -> bool:
    """Whether this process is one of several started by ``torchrun`` or by the launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank_of_this_process() -> int:
    """This process's rank among several (``RANK``), 0 when it is alone."""
    return int(os.environ.get("RANK", "0")) if distributed_env() else 0


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """The world this process trains in: ``ignite.distributed`` initialised from the environment
    ``torchrun`` (or the launcher) set, and finalised at the end; one process: nothing to do."""
    from engineflow.execute.parallel import World, current_world

    if not distributed_env():
        yield World()
        return
    import ignite.distributed as idist
    import torch

    if idist.get_world_size() > 1:  # the caller initialised it: theirs to finalise
        yield current_world()
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    folder = os.environ.get(FOLDER_ENV)
    # engineflow's own launcher starts every process on this machine: they meet through a file in its
    # private folder, not a TCP store that would listen on every interface (torchrun's is its user's)
    found = {"init_method": f"file://{Path(folder) / 'store'}"} if folder else {}
    idist.initialize("nccl" if cuda else "gloo", timeout=timeout, **found)
    try:
        yield current_world()
    finally:
        idist.finalize()


# the launcher ----------------------------------------------------------------------------------
def launch(command: str, kwargs: Mapping[str, Any], nproc: int, *, runs_dir: str | Path | None = None,
           stream: IO[str] | None = None) -> dict[str, Any]:
    """Run ``command`` ("run" or "test") with ``kwargs`` on ``nproc`` local processes; returns rank
    0's result. Raises :class:`WorkerError` when a rank failed (after every rank has ended)."""
    launch_folders.remove_abandoned()
    folder, held = launch_folders.make()
    asked: list[int] = []  # the interrupts this launcher was sent
    try:
        (folder / "spec.json").write_text(json.dumps({"command": command, "kwargs": dict(kwargs)}))
        with _forward_interrupts(asked) as forward_to:
            started = _start(folder, nproc, str(kwargs.get("device", "auto")), pipe_rank0=stream is not None)
            forward_to(started[0])
            copier = _copy_output(started[0], stream) if stream is not None else None
            failed = _watch(started, asked)
            reap(started)
        if copier is not None:
            copier.join()
        if failed is not None:
            rank, code = failed
            raise _failure(folder, started, rank, code, runs_dir, asked)
        return json.loads((folder / "result.json").read_text())
    finally:
        if held is not None:
            held.close()
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(folder: Path, nproc: int, device: str, *, pipe_rank0: bool) -> list[Worker]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), FOLDER_ENV: str(folder), "PYTHONUNBUFFERED": "1"}
    if sys.platform.startswith("linux"):  # the processes' connections to each other: on loopback too
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return start(folder, nproc, env, pipe_rank0=pipe_rank0, fork=forking(device))


def _copy_output(worker: Worker, stream: IO[str]) -> threading.Thread:
    def copy() -> None:
        assert worker.stdout is not None
        for line in iter(worker.stdout.readline, b""):
            stream.write(line.decode("utf-8", "replace"))
            stream.flush()

    thread = threading.Thread(target=copy, name="engineflow-rank0-output", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _forward_interrupts(asked: list[int]) -> Iterator[Callable[[Worker], None]]:
    """SIGINT and SIGTERM go to rank 0 (noted in ``asked``); one that comes before rank 0 exists goes
    to it as soon as the block names it (the function it yields)."""
    rank0: list[Worker] = []

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            rank0[0].send_signal(signum)

    def forward(signum: int, frame: Any) -> None:
        asked.append(signum)
        if rank0:
            send(signum)

    def target(worker: Worker) -> None:
        rank0.append(worker)
        for signum in asked:
            send(signum)

    if threading.current_thread() is not threading.main_thread():
        yield target
        return
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield target
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(workers: list[Worker], asked: list[int]) -> tuple[int, int] | None:
    """Wait for every worker; after the first failure, end the others. Returns (rank, exit code)
    of the first failure (a negative code: killed by that signal), or None. Rank 0 ended by an
    interrupt it was handed (``asked``) before it could act on it: the others are ended at once."""
    failed: tuple[int, int] | None = None
    deadline = term_deadline = None
    while True:
        codes = [w.poll() for w in workers]
        if failed is None:
            # a follower that stopped on an agreed interrupt (130) is not a failure while rank 0 still
            # writes the checkpoint and the run's record; rank 0's own exit code decides
            failed = next(((r, c) for r, c in enumerate(codes)
                           if c not in (None, 0) and not (r > 0 and c == EXIT_INTERRUPTED)), None)
            if failed is None and codes[0] == EXIT_INTERRUPTED:
                failed = (0, EXIT_INTERRUPTED)
            if failed is not None:
                # rank 0 ended by an interrupt it was handed before it could act on it: nothing to wait
                # for; after an interrupt rank 0 acted on, the others stop at the same point
                unheeded = failed[0] == 0 and -failed[1] in asked
                grace = 0.0 if unheeded else INTERRUPTED_GRACE_S if asked and failed[0] == 0 else GRACE_S
                deadline = time.monotonic() + grace
        if all(c is not None for c in codes):
            return failed
        now = time.monotonic()
        if deadline is not None and now >= deadline and term_deadline is None:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
            term_deadline = now + TERM_S
        if term_deadline is not None and now >= term_deadline:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        time.sleep(POLL_S)


def _failure(folder: Path, workers: list[Worker], first: int, code: int,
             runs_dir: str | Path | None, asked: Sequence[int] = ()) -> WorkerError:
    """What failed, printed once and recorded: the run (if rank 0 recorded one) is marked failed,
    naming the rank; an interrupt of rank 0 keeps rank 0's own "interrupted".

    The rank reported is the cause: one killed by a signal, else one whose error is its own (rank 0
    first: it printed its error itself), not one that only lost its peers (see :func:`_lost_peer`).
    The other ranks' logs are printed only when the rank reported is one of them."""
    if workers[0].returncode == EXIT_INTERRUPTED:
        # rank 0 stopped on the interrupt (with a checkpoint once training ran) and said so; the others'
        # errors, if any, are their lost connection to it
        return WorkerError(f"rank 0 (pid {workers[0].pid}) was interrupted", EXIT_INTERRUPTED,
                           already_reported=True)
    if asked and workers[0].returncode in [-s for s in asked]:
        # rank 0 was still starting when the interrupt came: nothing to checkpoint; a recorded run is
        # marked interrupted (resumable), as it would be had rank 0 caught the signal
        run_id_file = folder / "run_id"
        if run_id_file.is_file():
            _mark_failed(run_id_file.read_text().strip(), "interrupted while starting", runs_dir,
                         status="interrupted")
        return WorkerError(f"interrupted by {signal.Signals(asked[0]).name} while the processes were starting",
                           EXIT_INTERRUPTED, already_reported=False)
    codes = {r: w.returncode for r, w in enumerate(workers)}
    infos = {r: _read_json(folder / f"rank-{r}.json") for r in codes}
    failed = [r for r, c in codes.items() if c not in (None, 0, EXIT_INTERRUPTED)]
    killed = [r for r in failed if codes[r] < 0]
    own = [r for r in failed if codes[r] > 0 and not infos[r].get("lost_peer")]
    rank = first if first in killed else killed[0] if killed else (0 if 0 in own else own[0] if own else first)
    code = codes[rank] if codes[rank] is not None else code
    info = infos[rank]
    if code < 0:
        what = f"was killed by {signal.Signals(-code).name}"
        exit_code = EXIT_TRAINING_FAILED
    else:
        what = f"failed: {info.get('error') or f'exit code {code}'}"
        exit_code = code
    message = f"rank {rank} (pid {workers[rank].pid}) {what}"
    forker = getattr(workers[rank], "forker", None)
    if workers[rank].pid is None and forker is not None:  # it was never forked: its parent is what ended
        message = f"rank {rank} was not started: the process it was to be forked from (pid {forker.pid}) {what}"
    if rank != 0:
        log = folder / f"rank-{rank}.log"
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        # its traceback, not its "error: ..." line: the launcher's own line below says what failed
        shown = [line for line in tail.splitlines() if not line.startswith("error: ")]
        if any(line.strip() for line in shown):
            print("\n".join(shown).rstrip("\n"), file=sys.stderr, flush=True)
    run_id_file = folder / "run_id"
    if run_id_file.is_file():
        _mark_failed(run_id_file.read_text().strip(), message, runs_dir, rank=rank)
    return WorkerError(message, exit_code, already_reported=rank == 0 and code > 0 and not info.get("lost_peer"))


def _mark_failed(run_id: str, message: str, runs_dir: str | Path | None, *, status: str = "failed",
                 rank: int | None = None) -> None:
    """Mark run ``run_id`` ``status`` with ``message`` (naming the failed rank), unless it completed
    or, for an interrupt, already stopped on its own."""
    from engineflow.record.recorder import now_iso
    from engineflow.record.runs import resolve_runs_dir, update_record
    from engineflow.record.store import RunStore

    with RunStore.open(resolve_runs_dir(runs_dir)) as store:
        record = store.get_run(run_id)
        if record["status"] == "completed" or (status != "failed" and record["status"] != "running"):
            return
        if status != "failed":
            update_record(store, record, {"status": status, "error": None, "ended_at": now_iso(), "pid": None})
            return
        earlier = record.get("error")
        error = message if not earlier or earlier in message else f"{message} (rank 0 then: {earlier})"
        update_record(store, record, {"status": "failed", "error": error, "ended_at": now_iso(), "pid": None,
                                      "failed_rank": rank})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# what a worker tells the launcher -------------------------------------------------------------
def note_run(run_id: str) -> None:
    """Rank 0 tells the launcher (if any) which run it records, so a failure can be marked on it."""
    folder = os.environ.get(FOLDER_ENV)
    if folder and os.environ.get("RANK", "0") == "0":
        (Path(folder) / "run_id").write_text(run_id)
