"""Checkpoints: whole once save returns (a killed process resumes from them), durable and pruned by a
background thread, one job at a time, its failures raised on the training thread."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from engineflow.errors import DiskFullError, WriteError
from engineflow.state.checkpoint_files import load_state, make_durable, save_checkpoint, verify
from engineflow.state.writer import CheckpointWriter
from tests.conftest import BASE_RECIPE

WRITER_THREAD = "engineflow-checkpoint-writer"


def test_jobs_run_one_at_a_time_in_the_order_submitted():
    writer, done, overlapping = CheckpointWriter(), [], []
    active = threading.Semaphore(1)

    def job(n: int) -> None:
        if not active.acquire(blocking=False):
            overlapping.append(n)
        time.sleep(0.02 if n % 2 else 0.0)  # a slow job must not be overtaken by a fast one
        done.append(n)
        active.release()

    for n in range(6):
        writer.submit(lambda n=n: job(n))
    writer.wait()
    assert done == list(range(6)) and overlapping == []


def test_a_failed_fsync_is_raised_on_the_next_check_once_and_stops_the_next_job(tmp_path):
    path = save_checkpoint(tmp_path, "state-000000002.pt", {"x": torch.ones(2)}, durable=False)
    path.with_name(path.name + ".xxh3").unlink()  # its fsync fails: the file is not there
    writer, ran = CheckpointWriter(), []
    writer.submit(lambda: make_durable([path]))
    while writer.busy:
        time.sleep(0.005)
    with pytest.raises(WriteError) as err:
        writer.check()
    assert "state-000000002.pt.xxh3" in str(err.value)
    writer.check()  # raised once

    writer.submit(lambda: make_durable([path]))
    with pytest.raises(WriteError):  # the next job waits for it, and raises it instead of running
        writer.submit(lambda: ran.append(1))
    writer.wait()
    assert ran == []


def test_close_returns_the_failure_instead_of_raising_it():
    writer = CheckpointWriter()
    writer.submit(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    failure = writer.close()
    assert isinstance(failure, OSError) and failure.errno == errno.ENOSPC
    assert writer.close() is None


def test_an_fsync_that_finds_the_disk_full_names_the_file(tmp_path, monkeypatch):
    import os

    path = save_checkpoint(tmp_path, "state-000000003.pt", {"x": torch.ones(2)}, durable=False)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"state-000000003\.pt"):
        make_durable([path])


def test_a_process_killed_right_after_a_save_that_left_its_fsyncs_for_later_resumes_from_it(tmp_path):
    # durable=False renames both files into place before any fsync: SIGKILL then loses nothing
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import torch
        from engineflow.state.checkpoint_files import save_checkpoint

        save_checkpoint(Path({str(tmp_path)!r}), "state-000000007.pt", {{"w": torch.arange(1000.0)}}, durable=False)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert verify(tmp_path / "state-000000007.pt") is None
    assert torch.equal(load_state(tmp_path / "state-000000007.pt")["w"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-000000007.pt", "state-000000007.pt.xxh3"]


def test_wait_and_close_return_once_the_submitted_job_is_done(tmp_path):
    writer, done = CheckpointWriter(), []

    def slow() -> None:
        time.sleep(0.2)
        done.append(1)

    writer.submit(slow)
    assert writer.busy
    assert writer.close() is None
    assert done == [1] and not writer.busy


def test_a_process_that_exits_during_a_job_finishes_it_first(tmp_path):
    # No wait() and no close(): the interpreter still waits for the job at exit, and nothing else keeps it alive.
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        from engineflow.state.checkpoint_files import make_durable, save_checkpoint
        from engineflow.state.writer import CheckpointWriter

        path = save_checkpoint(Path({str(tmp_path)!r}), "state-000000009.pt", {{"x": torch.arange(3)}}, durable=False)

        def slow():
            time.sleep(0.5)
            make_durable([path])
            Path({str(tmp_path)!r}, "synced").touch()

        CheckpointWriter().submit(slow)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "synced").exists() and verify(tmp_path / "state-000000009.pt") is None


def test_a_run_leaves_no_writer_thread_and_every_checkpoint_whole(cli, write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE)
    result = cli("run", str(recipe), "--device", "cpu", "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    assert [t.name for t in threading.enumerate() if t.name == WRITER_THREAD] == []
    (state,) = Path(tmp_path / "runs").glob("*/*/checkpoints/state")
    files = sorted(state.glob("state-*.pt"))
    assert [p.name for p in files[-2:]] == ["state-000000005.pt", "state-000000006.pt"]
    assert len(files) <= 3, "pruned to the last 2 and the best 1"
    assert all(verify(p) is None for p in files)
    assert (state.parent / "best.pt").is_file() and (state.parent / "last.pt").is_file()
