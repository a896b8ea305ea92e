"""A launch's worker processes: spawned one by one, or forked from one process that imported torch once.

Each worker of ``engineflow run --nproc N`` imports torch, Ignite and engineflow: seconds of CPU
each, paid N times over when every worker is a fresh interpreter. On Linux, for a launch on the CPU,
:func:`start` instead spawns one *forking* process that imports them once and forks the N workers
from itself (as a ``forkserver`` does); it waits for them and writes each one's pid and exit status
into the launch folder, where :class:`Forked` reads them. It forks before anything starts a thread
pool, opens a device or connects to another process, so each worker starts from a plain interpreter
state. A launch that may use CUDA spawns its workers (a CUDA driver is never to be forked), as does
any launch with ``ENGINEFLOW_FORK_WORKERS=0``.

Either way a worker is killed by the kernel when its parent dies (``PR_SET_PDEATHSIG``): the
launcher's death takes the forking process, whose death takes the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from engineflow.errors import EXIT_INTERRUPTED, RecipeError

FORK_ENV = "ENGINEFLOW_FORK_WORKERS"
# what every worker imports before it trains; the forking process imports it once for all of them
WARM = ("torch", "torch._dynamo", "ignite.engine", "ignite.distributed", "ignite.metrics",
        "engineflow.app.command_errors", "engineflow.app.training", "engineflow.app.testing",
        "engineflow.execute.parallel")


class Worker(Protocol):
    """A started worker as the launcher watches it: a ``subprocess.Popen``, or a :class:`Forked`."""

    returncode: int | None
    stdout: IO[bytes] | None

    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


# what a machine whose processes may see a GPU has: NVIDIA's driver, WSL2's GPU device, ROCm's
GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def gpu_driver() -> bool:
    """Whether a GPU driver may be here (off Linux: assume so). Asking torch would import it."""
    return not sys.platform.startswith("linux") or any(os.path.exists(path) for path in GPU_DRIVERS)


def forking(device: str) -> bool:
    """Whether a launch on ``device`` forks its workers from one process (see the module)."""
    if not sys.platform.startswith("linux") or os.environ.get(FORK_ENV, "1") == "0":
        return False
    return device == "cpu" or not gpu_driver()


def check_nproc(nproc: Any, device: str, *, oversubscribe: bool = False) -> None:
    """Refuse a number of local processes that is not a whole number >= 1, or that is more than the
    machine has CPUs this process may use (GPUs when it trains on CUDA), unless ``oversubscribe``.

    Example:
        >>> check_nproc(1, "cpu")
        >>> check_nproc(0, "cpu")
        Traceback (most recent call last):
        ...
        engineflow.errors.RecipeError: nproc=0: the number of processes must be a whole number >= 1
    """
    from engineflow.naming import option

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise RecipeError(f"{option('nproc', nproc)}: the number of processes must be a whole number >= 1")
    if oversubscribe or nproc == 1:
        return
    gpus = _gpus() if device != "cpu" else 0
    have = gpus or _cpus()
    if nproc > have:
        why = (f"{have} GPU(s), and each process trains on one of its own" if gpus else
               f"{have} CPU core(s) for this process, and more processes would share cores and train slower")
        raise RecipeError(f"{option('nproc', nproc)}: this machine has {why}. Ask for at most {have}, or pass "
                          f"{option('oversubscribe')} to start them anyway")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (a container's share)
    except AttributeError:
        return os.cpu_count() or 1


def _gpus() -> int:
    """CUDA devices visible here; torch is imported only where a GPU driver may be (see :func:`gpu_driver`)."""
    if not gpu_driver():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start(folder: Path, nproc: int, env: dict[str, str], *, pipe_rank0: bool, fork: bool) -> list[Worker]:
    """Start ``nproc`` workers running ``python -m engineflow.app.launched FOLDER`` with ``env`` and their
    ``RANK``; returns a handle per rank (``pid``, ``poll()``, ``returncode``, ``send_signal``,
    ``terminate``, ``kill``, and rank 0's ``stdout`` when ``pipe_rank0``). Rank 0 writes to this
    process's output (or the pipe), rank ``r`` to ``FOLDER/rank-<r>.log``."""
    parent = os.getpid()
    if fork:
        forker = subprocess.Popen(
            [sys.executable, "-m", "engineflow.app.launched", "--fork", str(folder), str(nproc)], env=env,
            stdout=subprocess.PIPE if pipe_rank0 else None, stderr=subprocess.STDOUT if pipe_rank0 else None,
            preexec_fn=_die_with(parent))
        return [Forked(forker, folder, rank) for rank in range(nproc)]
    workers: list[Worker] = []
    for rank in range(nproc):
        log = None if rank == 0 else (folder / f"rank-{rank}.log").open("wb")
        out = subprocess.PIPE if rank == 0 and pipe_rank0 else log
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "engineflow.app.launched", str(folder)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=out,
            stderr=subprocess.STDOUT if out is not None else None, preexec_fn=_die_with(parent)))
        if log is not None:
            log.close()
    return workers


def _die_with(parent: int) -> Callable[[], None]:
    def setup() -> None:
        os.setpgrp()  # a terminal's Ctrl-C reaches the launcher only, which hands it to rank 0
        _die_with_parent(parent)

    return setup


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


class Forked:
    """A worker forked by the forking process, as the launcher sees it (a ``Popen``'s interface)."""

    def __init__(self, forker: subprocess.Popen[bytes], folder: Path, rank: int) -> None:
        self.forker, self.folder, self.rank = forker, folder, rank
        self.returncode: int | None = None
        self.stdout: IO[bytes] | None = forker.stdout if rank == 0 else None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The worker's pid; None until it is forked."""
        if self._pid is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._pid = int(json.loads((self.folder / "pids.json").read_text())[str(self.rank)])
        return self._pid

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int((self.folder / f"exit-{self.rank}").read_text())
            except (OSError, ValueError):
                ended = self.forker.poll()
                if ended is not None:  # the forking process is gone, and every worker with it
                    with contextlib.suppress(OSError, ValueError):
                        self.returncode = int((self.folder / f"exit-{self.rank}").read_text())
                    if self.returncode is None:
                        self.returncode = ended if ended < 0 or self.pid is None else -signal.SIGKILL
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """To the worker; before it exists, to the forking process (whose end takes every worker)."""
        with contextlib.suppress(ProcessLookupError):
            if self.pid is not None:
                os.kill(self.pid, signum)
            else:
                self.forker.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def reap(workers: list[Worker]) -> None:
    """Once every worker ended: wait for the process they were forked from, which ends right after
    it reaped the last one (so that it is this process's to reap, its CPU time counted in this one's)."""
    forkers = {id(w.forker): w.forker for w in workers if isinstance(w, Forked)}
    for forker in forkers.values():
        try:
            forker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            forker.kill()
            forker.wait()


def serve(folder: Path, nproc: int, worker: Callable[[Path], None]) -> None:
    """The forking process: import what every worker needs, fork the ``nproc`` workers (each runs
    ``worker(folder)`` as rank ``r``), then wait for them, writing each pid and exit status into
    ``folder`` (a signal as its negative number).

    A SIGINT or SIGTERM it is sent (the launcher hands an interrupt to it while rank 0 does not exist
    yet) goes on to rank 0, at once or as soon as it is forked: never lost, and never ending this
    process, and with it every worker, before rank 0 could checkpoint.
    """
    rank0: list[int] = []
    pending: list[int] = []

    def hand_on(signum: int, frame: object) -> None:
        if rank0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank0[0], signum)
        else:
            pending.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, hand_on)
    _import_warm()
    me = os.getpid()
    pids: dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _child(folder, rank, me, worker)
        pids[pid] = rank
        if rank == 0:
            rank0.append(pid)
    _write(folder / "pids.json", json.dumps({str(rank): pid for pid, rank in pids.items()}))
    for signum in pending:
        hand_on(signum, None)
    while pids:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        rank = pids.pop(pid, None)
        if rank is not None:
            _write(folder / f"exit-{rank}", str(os.waitstatus_to_exitcode(status)))
    os._exit(0)


def warm_spawned() -> None:
    """A spawned worker imports what every worker needs first, an interrupt held back until it has:
    an import cut short by a KeyboardInterrupt can leave a module half made (numpy's lazy attributes
    then recurse without end), so the interrupt is raised between imports, not inside one."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        _import_warm()
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _import_warm() -> None:
    import importlib
    import traceback

    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError:  # a worker imports what it needs itself; this is only a head start
            traceback.print_exc()


def _child(folder: Path, rank: int, parent: int, worker: Callable[[Path], None]) -> None:
    try:
        # a worker takes interrupts as any process does
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
        _die_with_parent(parent)
        if rank > 0:
            log = os.open(folder / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        worker(folder)
    except KeyboardInterrupt:  # Ctrl-C before the worker's own handling of it: as the command says it
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)
    except BaseException:  # the worker ends the process itself; anything that escapes it is shown
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(1)  # never back into the forking process's loop


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
