"""The background checkpoint writer: copies taken on the caller's thread, written in order, failures raised back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from engineflow.errors import WriteError
from engineflow.state.checkpoint_files import load_state, save_checkpoint, verify
from engineflow.state.writer import CheckpointWriter, snapshot
from tests.conftest import BASE_RECIPE

WRITER_THREAD = "engineflow-checkpoint-writer"


def trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """A Linear(4, 2) after one SGD step with momentum, and its state (the live tensors, not copies)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step(model, optimizer)
    return model, optimizer, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.ones(3, 4)).pow(2).sum().backward()
    optimizer.step()


def test_writes_run_one_at_a_time_in_the_order_submitted():
    writer, done, overlapping = CheckpointWriter(), [], []
    active = threading.Semaphore(1)

    def write(state: dict) -> None:
        if not active.acquire(blocking=False):
            overlapping.append(state["n"])
        time.sleep(0.02 if state["n"] % 2 else 0.0)  # a slow write must not be overtaken by a fast one
        done.append(state["n"])
        active.release()

    for n in range(6):
        writer.submit(write, {"n": n})
    writer.wait()
    assert done == list(range(6)) and overlapping == []


def test_a_failed_write_is_raised_on_the_next_check_once_and_stops_the_next_write(tmp_path):
    (tmp_path / "state-000000002.pt").mkdir()  # the file cannot replace a folder: the write fails
    writer, written = CheckpointWriter(), []
    writer.submit(lambda state: save_checkpoint(tmp_path, "state-000000002.pt", state), {"x": torch.ones(2)})
    while writer.busy:
        time.sleep(0.005)
    with pytest.raises(WriteError) as err:
        writer.check()
    assert "state-000000002.pt" in str(err.value)
    writer.check()  # raised once
    assert [p.name for p in tmp_path.iterdir()] == ["state-000000002.pt"], "no temporary file left"

    writer.submit(lambda state: save_checkpoint(tmp_path, "state-000000002.pt", state), {"x": torch.ones(2)})
    with pytest.raises(WriteError):  # the next save waits for it, and raises it instead of writing
        writer.submit(written.append, {"x": torch.ones(2)})
    writer.wait()
    assert written == []


def test_close_returns_the_failure_instead_of_raising_it(tmp_path):
    writer = CheckpointWriter()
    writer.submit(lambda state: (_ for _ in ()).throw(OSError(28, "No space left on device")), {})
    failure = writer.close()
    assert isinstance(failure, OSError) and failure.errno == 28
    assert writer.close() is None


def test_the_file_holds_the_state_at_submit_not_after_the_next_step(tmp_path):
    model, optimizer, state = trained_state()
    expected = {"weight": model.weight.detach().clone(),
                "momentum": optimizer.state_dict()["state"][0]["momentum_buffer"].clone()}
    synchronous = save_checkpoint(tmp_path / "sync", "state-000000001.pt", state)
    go, writer = threading.Event(), CheckpointWriter()

    def write(copied: dict) -> None:
        go.wait()  # the write starts only once the next optimizer step changed the live tensors
        save_checkpoint(tmp_path / "async", "state-000000001.pt", copied)

    writer.submit(write, state)
    step(model, optimizer)
    with torch.no_grad():
        model.bias.fill_(7.0)
    assert not torch.equal(model.weight, expected["weight"])
    go.set()
    writer.wait()
    written = tmp_path / "async" / "state-000000001.pt"
    loaded = load_state(written)
    assert torch.equal(loaded["model"]["weight"], expected["weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], expected["momentum"])
    assert written.read_bytes() == synchronous.read_bytes(), "the same bytes as a save on the training thread"
    assert verify(written) is None


def test_a_snapshot_keeps_shared_storage_shared_so_it_saves_to_the_same_bytes(tmp_path):
    base = torch.arange(12.0)
    state = {"whole": base, "view": base[2:8].view(2, 3), "tied": {"a": base, "b": base}, "steps": [1, 2]}
    copied = snapshot(state)
    base += 1
    assert copied["view"].untyped_storage().data_ptr() == copied["whole"].untyped_storage().data_ptr()
    assert copied["tied"]["a"] is copied["tied"]["b"] and copied["whole"][0].item() == 0.0
    (tmp_path / "copy").mkdir()
    (tmp_path / "live").mkdir()
    torch.save(copied, tmp_path / "copy" / "state.pt")  # torch names the archive after the file: the same name
    base -= 1
    torch.save(state, tmp_path / "live" / "state.pt")
    assert (tmp_path / "copy" / "state.pt").read_bytes() == (tmp_path / "live" / "state.pt").read_bytes()


def test_wait_and_close_return_once_the_submitted_write_is_on_disk(tmp_path):
    writer = CheckpointWriter()

    def slow(state: dict) -> None:
        time.sleep(0.2)
        save_checkpoint(tmp_path, "state-000000004.pt", state)

    writer.submit(slow, {"x": torch.ones(2)})
    assert writer.busy
    assert writer.close() is None
    assert verify(tmp_path / "state-000000004.pt") is None and not writer.busy


def test_a_process_that_exits_during_a_write_finishes_it_first(tmp_path):
    # No wait() and no close(): the interpreter still waits for the write at exit, and nothing else keeps it alive.
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        from engineflow.state.checkpoint_files import save_checkpoint
        from engineflow.state.writer import CheckpointWriter

        def slow(state):
            time.sleep(0.5)
            save_checkpoint(Path({str(tmp_path)!r}), "state-000000009.pt", state)

        CheckpointWriter().submit(slow, {{"x": torch.arange(3)}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert verify(tmp_path / "state-000000009.pt") is None
    assert torch.equal(load_state(tmp_path / "state-000000009.pt")["x"], torch.arange(3))


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
