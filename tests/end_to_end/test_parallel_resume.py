"""Exact resume on 1, 2, 3 and 4 processes: SIGKILL and Ctrl-C, mid-epoch and at an epoch's end.

Each world size trains one unbroken run and one run interrupted four times, each interruption
resumed with ``--resume last`` on the same number of processes; the final weights are compared
tensor by tensor (``torch.equal``). On three processes and more gloo's all-reduce adds in an order
that depends on DDP's bucket layout, which DDP lays out anew after its first step in every process
it starts, a resumed one included (engineflow then sums in rank order: ``ordered_sum``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import run_engineflow
from tests.end_to_end.test_resume import divergences, engineflow, final_state
from tests.recipes import classifier_steps

SAMPLES, BATCH, EPOCHS = 50, 2, 4
AGREE_EVERY = 8  # engineflow.state.checkpointer.AGREE_EVERY: where the processes agree on an interrupt

# Dropout draws from each rank's own RNG. The process whose rank is given by KILL ("iteration:rank:KILL"
# or "...:INT") SIGKILLs itself at that iteration, or sends Ctrl-C as a terminal would (to the launcher;
# on one process, to itself) and waits a second, so that the interrupt is known to rank 0
# before any rank reaches the next point where they agree on it.
RECIPE = f'''
import os, signal, time
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs={EPOCHS}, lr=0.1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn({SAMPLES}, 6, generator=gen), torch.randint(0, 3, ({SAMPLES},), generator=gen))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9),
                loaders={{"train": DataLoader(data, batch_size={BATCH}, shuffle=True),
                          "valid": DataLoader(data, batch_size=16)}})

def launcher():
    """The process a terminal's Ctrl-C reaches: this one's parent, or that parent's if it is the
    process the workers are forked from."""
    parent = os.getppid()
    with open(f"/proc/{{parent}}/cmdline", "rb") as cmdline:
        if b"--fork" in cmdline.read():
            with open(f"/proc/{{parent}}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    return parent
''' + classifier_steps(asks=", state, run", before=r'''    kill = os.environ.get("KILL", "")
    if kill:
        iteration, rank, how = kill.split(":")
        training = os.environ["MARKER"] + ".rank0-training"
        if state.iteration == int(iteration) and run.rank == 0:
            open(training, "w").close()  # rank 0 is past its start-up: it handles Ctrl-C as training does
        if state.iteration == int(iteration) and run.rank == int(rank) and not os.path.exists(os.environ["MARKER"]):
            open(os.environ["MARKER"], "w").close()
            if how == "KILL":
                os.kill(os.getpid(), signal.SIGKILL)
            # a Ctrl-C while rank 0 still starts up (records the resume) ends the run there, as it should
            while not os.path.exists(training):
                time.sleep(0.01)
            os.kill(launcher() if run.world_size > 1 else os.getpid(), signal.SIGINT)
            time.sleep(1.0)
''')


@dataclass(frozen=True)
class Interruption:
    """One interruption of the chain: where it strikes, and the checkpoint the next attempt resumes from."""

    kill: str  # "iteration:rank:KILL|INT"
    resumes_at: int  # the iteration of that checkpoint
    mid_epoch: bool


def steps_of(world: int) -> int:
    """Steps of each process in an epoch (the order padded to a multiple of the processes)."""
    return math.ceil(math.ceil(SAMPLES / world) / BATCH)


def plan(world: int) -> list[Interruption]:
    """SIGKILL mid-epoch 2 (resumed from epoch 1's end), Ctrl-C in epoch 2 (the processes stop at the
    next iteration they agree at, mid-epoch; one process at once), SIGKILL of rank 0 right after
    (resumed from that mid-epoch checkpoint), Ctrl-C on epoch 3's last batch (kept: the epoch is
    validated and recorded, and its end checkpointed)."""
    steps = steps_of(world)
    stop = next(i for i in range(steps + 1, 2 * steps) if i % AGREE_EVERY == 0 or world == 1)
    assert stop + 1 < 2 * steps  # the plan holds for these sizes
    last = world - 1
    return [Interruption(f"{steps + 2}:{last}:KILL", steps, False),
            Interruption(f"{steps + 1}:{last}:INT", stop, True),
            Interruption(f"{stop + 1}:0:KILL", stop, True),
            Interruption(f"{3 * steps}:{last}:INT", 3 * steps, False)]


def _show(runs: Path) -> dict:
    done = run_engineflow("runs", "show", "last", "--json", "--runs-dir", str(runs), cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _args(recipe: Path, runs: Path, world: int) -> list[str]:
    return ["run", str(recipe), "--runs-dir", str(runs), "--device", "cpu", "--nproc", str(world),
            "--oversubscribe"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exact") / "resumable.py"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def unbroken(recipe) -> dict[int, tuple[dict, dict]]:
    """Each world size's unbroken run: final weights and record (made once, on first use)."""
    made: dict[int, tuple[dict, dict]] = {}

    def get(world: int) -> tuple[dict, dict]:
        if world not in made:
            runs = recipe.parent / f"unbroken-{world}"
            done = engineflow(*_args(recipe, runs, world), cwd=recipe.parent)
            assert done.returncode == 0, done.stdout + done.stderr
            made[world] = final_state(runs), _show(runs)
        return made[world]

    return get  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_killed_and_interrupted_four_times_ends_bit_identical(recipe, unbroken, tmp_path, world):
    runs = tmp_path / "runs"
    steps = steps_of(world)
    previous: Interruption | None = None
    for index, cut in enumerate([*plan(world), None]):
        env = {"KILL": cut.kill, "MARKER": str(tmp_path / f"done-{index}")} if cut is not None else {}
        done = engineflow(*_args(recipe, runs, world), *(["--resume", "last"] if previous else []), env=env,
                          cwd=tmp_path)
        if previous is not None:  # it went on from the checkpoint the interruption left as the newest
            epoch, batch = divmod(previous.resumes_at, steps)
            assert f"from checkpoint state-{previous.resumes_at:09d}.pt: epoch {epoch + 1}, batch {batch + 1} " \
                   f"of {steps}\n" in done.stdout, done.stdout
        if cut is None:
            assert done.returncode == 0, done.stdout + done.stderr
            break
        interrupted = cut.kill.endswith(":INT")
        assert done.returncode == (130 if interrupted else -9 if world == 1 else 1), (cut, done.stdout + done.stderr)
        (state_dir,) = runs.glob("*/*/checkpoints/state")
        newest = sorted(state_dir.glob("state-*.pt"))[-1]
        assert newest.name == f"state-{cut.resumes_at:09d}.pt", (cut, newest)
        assert bool(cut.resumes_at % steps) == cut.mid_epoch, cut
        if interrupted:  # the processes stopped together with a checkpoint; the run says so
            assert "writing a checkpoint after this iteration" in done.stdout + done.stderr
            assert torch.load(newest, weights_only=True, mmap=True)["reason"] == "interrupt"
            assert _show(runs)["status"] == "interrupted"
        previous = cut
    weights, record = final_state(runs), _show(runs)
    assert [row["epoch"] for row in record["history"]] == list(range(1, EPOCHS + 1))
    reference, reference_record = unbroken(world)
    assert divergences(weights, reference) == [], f"{world} processes: tensors differ after four resumes"
    assert record["metrics"] == reference_record["metrics"]
    assert record["world_size"] == world and record["exact_resume"] is True
    assert [r["world_size"] for r in record["resumes"]] == [world] * 4


@pytest.mark.slow
def test_torchrun_runs_the_command_as_one_run_on_its_processes(recipe, unbroken, tmp_path):
    """torchrun (one node, standalone rendezvous) starts the processes; engineflow finds its world and
    trains exactly what ``--nproc 2`` trains."""
    runs = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "engineflow", "run", str(recipe), "--runs-dir", str(runs), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(f"completed {EPOCHS} epochs") == 1  # rank 0 alone prints
    record = _show(runs)
    assert record["status"] == "completed" and record["world_size"] == 2 and record["backend"] == "gloo"
    assert len(list((runs / "resumable").iterdir())) == 1
    assert divergences(final_state(runs), unbroken(2)[0]) == []
