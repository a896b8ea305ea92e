"""The ``engineflow`` command ends without the module teardown, and loses nothing a normal exit keeps.

Each test runs the real command (``python -m engineflow``) on a recipe that leaves things for the
exit to finish: files opened at module level and never closed, an atexit handler, a gzip stream
without its trailer, a non-daemon thread still working.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from engineflow.app.fast_exit import OPT_OUT, exit_code_of
from tests.conftest import BASE_RECIPE, run_engineflow

LEAVES_OPEN = BASE_RECIPE + '''
import atexit, gzip
from pathlib import Path

OUT = Path(__file__).parent
LOG = open(OUT / "epochs.log", "w")                    # never closed: 2 short lines stay in its buffer
TEXT_GZ = gzip.open(OUT / "epochs.txt.gz", "wt")       # never closed: no trailer until it is
atexit.register(lambda: (OUT / "atexit.txt").write_text("ran"))

class Teardown:
    """Writes its file only if the module teardown frees it: shows which exit the process took."""
    def __del__(self):
        (OUT / "teardown.txt").write_text("ran")

MARKER = Teardown()

@ef.on(ef.Events.EPOCH_COMPLETED)
def log_epoch(state):
    LOG.write(f"epoch {state.epoch}\\n")
    TEXT_GZ.write(f"epoch {state.epoch}\\n")
'''

LEAVES_A_THREAD = BASE_RECIPE + '''
import threading, time
from pathlib import Path

@ef.on(ef.Events.COMPLETED)
def late_writer():
    def work():
        time.sleep(1.0)
        (Path(__file__).parent / "thread.txt").write_text("finished")
    threading.Thread(target=work, daemon=False).start()
'''


def run_with(tmp_path: Path, recipe: str, env: dict[str, str]):
    (tmp_path / "recipe.py").write_text(recipe)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return run_engineflow("run", "recipe.py", "--runs-dir", "runs", cwd=tmp_path)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


@pytest.mark.parametrize("full_exit", [False, True], ids=["fast", "full"])
def test_what_the_recipe_left_open_is_finished_at_exit(tmp_path: Path, full_exit: bool) -> None:
    done = run_with(tmp_path, LEAVES_OPEN, {OPT_OUT: "1" if full_exit else "0"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "epochs.log").read_text() == "epoch 1\nepoch 2\n"
    assert gzip.decompress((tmp_path / "epochs.txt.gz").read_bytes()).decode() == "epoch 1\nepoch 2\n"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    # the fast exit skips the teardown (that is its point); ENGINEFLOW_FULL_EXIT=1 keeps it
    assert (tmp_path / "teardown.txt").exists() == full_exit


def test_a_running_non_daemon_thread_gets_a_normal_exit(tmp_path: Path) -> None:
    done = run_with(tmp_path, LEAVES_A_THREAD, {OPT_OUT: "0"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread.txt").read_text() == "finished"  # the exit waited for the thread


def test_the_fast_exit_keeps_exit_codes_and_messages(tmp_path: Path) -> None:
    nan_loss = BASE_RECIPE.replace('return {"loss": loss}', "return {'loss': loss * float('nan')}")
    (tmp_path / "recipe.py").write_text(nan_loss)
    failed = run_engineflow("run", "recipe.py", "--runs-dir", "runs", cwd=tmp_path)
    assert failed.returncode == 1
    assert "error: the loss became nan at iteration 1 (epoch 1)" in failed.stderr, failed.stderr
    (tmp_path / "bad.py").write_text("config = 3\n")
    bad = run_engineflow("run", "bad.py", "--runs-dir", "runs", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "bad.py" in bad.stderr


def test_exit_codes_follow_sys_exit() -> None:
    assert [exit_code_of(None), exit_code_of(0), exit_code_of(2), exit_code_of(130)] == [0, 0, 2, 130]
