"""Data-parallel runs: sharding (fast, in process) and --nproc end to end (slow, real processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from engineflow.data import TensorLoader
from engineflow.execute.losses import LossMonitor
from engineflow.execute.parallel import ShardSampler, World, shard_loader, sum_over_ranks
from tests.conftest import REPO, run_engineflow

DIGITS = REPO / "recipes" / "digits.py"


# sharding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [1, 7, 269, 271])
@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_hold_every_sample_exactly_once(samples, world):
    shards = [list(ShardSampler(samples, rank=r, world_size=world, shuffle=False, pad=False)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(samples))
    assert [len(s) for s in shards] == [len(ShardSampler(samples, rank=r, world_size=world, shuffle=False,
                                                         pad=False)) for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("samples", [7, 10, 12])
def test_train_shards_are_one_permutation_padded_and_dealt_out(samples):
    def shards(world):
        out = []
        for rank in range(world):
            sampler = ShardSampler(samples, rank=rank, world_size=world, shuffle=True, pad=True,
                                   generator=torch.Generator().manual_seed(5))
            out.append(list(sampler))
            assert len(sampler) == len(out[-1])
        return out

    order = torch.randperm(samples, generator=torch.Generator().manual_seed(5)).tolist()
    for world in (2, 3):
        got = shards(world)
        assert len({len(s) for s in got}) == 1  # every rank runs the same number of steps
        dealt = [got[k % world][k // world] for k in range(samples)]
        assert dealt == order  # position k of the epoch's order is on rank k % world


def test_an_offset_deals_out_only_the_rest_of_the_order():
    sampler = ShardSampler(10, rank=1, world_size=3, shuffle=False, pad=True)
    sampler.offset = 4
    assert len(sampler) == 2 and list(sampler) == [5, 8]
    assert len(list(sampler)) == 4  # the offset holds for one pass


def test_a_dataloader_is_rebuilt_around_its_shard_with_its_options():
    data = TensorDataset(torch.arange(11.0))
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    shards = [shard_loader(loader, World(r, 2), pad=True) for r in range(2)]
    assert all(s.batch_size == 2 and isinstance(s.sampler, ShardSampler) for s in shards)
    assert shards[0].sampler.generator is loader.generator  # seed_epoch reseeds it each epoch
    evals = [shard_loader(DataLoader(data, batch_size=4), World(r, 2), pad=False) for r in range(2)]
    assert sorted(torch.cat([b[0] for s in evals for b in s]).tolist()) == list(range(11))


def test_a_tensor_loader_hands_out_its_shard():
    x = torch.arange(11)
    shards = []
    for rank in range(3):
        loader = TensorLoader(x, batch_size=2)
        loader.shard(rank, 3, pad=False)
        shards.append(torch.cat(list(loader)).tolist())
        assert len(loader) == len(list(loader))
    assert sorted(i for s in shards for i in s) == list(range(11))
    padded = TensorLoader(x, batch_size=2, shuffle=True, seed=1)
    padded.shard(2, 3, pad=True)
    assert len(torch.cat(list(padded))) == 4


def test_one_process_is_not_sharded_and_sums_nothing():
    loader = DataLoader(TensorDataset(torch.arange(3.0)), batch_size=2)
    assert shard_loader(loader, World(), pad=False) is not None
    monitor = LossMonitor()
    monitor.observe({"loss": 2.0}, epoch=1, iteration=1)
    assert monitor.reduce is None and monitor.epoch_means() == {"train/loss": 2.0}
    assert callable(sum_over_ranks)


# end to end -------------------------------------------------------------------------------------
def _show(runs: Path, ref: str = "last") -> dict:
    done = run_engineflow("runs", "show", ref, "--json", "--runs-dir", str(runs), cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_digits_on_two_processes_trains_records_once_and_tests_exactly(tmp_path):
    runs = tmp_path / "runs"
    done = run_engineflow("run", str(DIGITS), "--nproc", "2", "--runs-dir", str(runs), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes (gloo)" in done.stdout
    record = _show(runs)
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    assert record["best"]["value"] >= 0.95
    assert len(list((runs / "digits").iterdir())) == 1
    listed = run_engineflow("runs", "list", "--json", "--runs-dir", str(runs), cwd=tmp_path)
    assert len(json.loads(listed.stdout)) == 1

    def test(nproc: int) -> dict:
        done = run_engineflow("test", str(DIGITS), "--json", "--runs-dir", str(runs), "--nproc", str(nproc),
                              cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)["metrics"]

    one = test(1)
    for nproc in (2, 3):  # 271 test samples: no number of processes here divides them
        assert test(nproc) == pytest.approx(one, abs=1e-6)


def _workers_of(launcher: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_long_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    launcher = subprocess.Popen([sys.executable, "-m", "engineflow", "run", str(DIGITS), "--nproc", "2",
                                 "--set", "epochs=500", "--runs-dir", str(runs)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    for line in launcher.stdout:  # training has started once the first epoch is reported
        if line.startswith("epoch 1/"):
            break
    else:
        pytest.fail(f"the run never reached its first epoch: {launcher.communicate()}")
    return launcher, runs


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_ends_every_rank_and_fails_the_run_naming_it(tmp_path):
    launcher, runs = _start_long_run(tmp_path)
    workers = _workers_of(launcher.pid)
    rank1 = next(pid for pid in workers if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGKILL)
    started = time.monotonic()
    _, err = launcher.communicate(timeout=60)
    assert time.monotonic() - started < 60
    assert launcher.returncode == 1
    assert not any(_alive(pid) for pid in workers)
    record = _show(runs)
    assert record["status"] == "failed"
    assert record["error"].startswith("rank 1 ") and "SIGKILL" in record["error"]
    assert "rank 1" in err


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_launcher_leaves_no_worker(tmp_path):
    launcher, _ = _start_long_run(tmp_path)
    workers = _workers_of(launcher.pid)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


# exact resume ------------------------------------------------------------------------------------
# 50 samples, batch 4, 2 ranks: 25 samples a rank, 7 batches an epoch (the last of 1 sample).
# Dropout draws from each rank's own RNG; the rank given by KILL_RANK SIGKILLs itself once at
# iteration KILL_AT.
RESUMABLE = '''
import os, signal
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=3, lr=0.1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 3))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9),
                loaders={"train": DataLoader(data, batch_size=4, shuffle=True),
                         "valid": DataLoader(data, batch_size=16)})

@ef.train_step
def train(batch, model, optimizer, state, run):
    if (state.iteration == int(os.environ.get("KILL_AT", "0")) and run.rank == int(os.environ["KILL_RANK"])
            and not os.path.exists(os.environ["KILL_MARKER"])):
        open(os.environ["KILL_MARKER"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}

@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}
'''


def _two_process_run(tmp_path: Path, name: str, kill_at: int | None, kill_rank: int = 1) -> tuple[dict, dict]:
    """A 2-process run (killed at ``kill_at``, then resumed); its final weights and record."""
    from tests.test_resume import engineflow, final_state

    folder = tmp_path / name
    folder.mkdir()
    recipe = folder / "resumable.py"
    recipe.write_text(RESUMABLE)
    runs = folder / "runs"
    env = {"KILL_AT": str(kill_at or 0), "KILL_RANK": str(kill_rank), "KILL_MARKER": str(folder / "killed")}
    args = ["run", str(recipe), "--nproc", "2", "--runs-dir", str(runs), "--checkpoint-every", "3"]
    first = engineflow(*args, env=env, cwd=folder)
    if kill_at is not None:
        assert first.returncode == 1, first.stdout + first.stderr
        assert _show(runs)["error"].startswith(f"rank {kill_rank} ")
        resumed = engineflow(*args, "--resume", "last", env=env, cwd=folder)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "from checkpoint" in resumed.stdout
    else:
        assert first.returncode == 0, first.stdout + first.stderr
    return final_state(runs), _show(runs)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_bit_identical(tmp_path):
    unbroken, record = _two_process_run(tmp_path, "unbroken", None)
    # mid-epoch (iteration 11: epoch 2, batch 4; checkpoints at 3, 6, 9), and rank 0 itself killed
    # mid-epoch (17); an epoch's last batch resumes from an epoch-end checkpoint, as on one process
    from tests.test_resume import divergences

    for name, kill_at, rank in (("mid", 11, 1), ("rank0", 17, 0)):
        weights, resumed = _two_process_run(tmp_path, name, kill_at, rank)
        assert divergences(weights, unbroken) == [], name
        # train/loss of the resumed epoch sums each rank's restored totals: the same float
        assert resumed["metrics"] == record["metrics"], name
        assert resumed["world_size"] == 2


@pytest.mark.slow
def test_a_pipeline_on_two_processes_runs_every_stage_and_predicts_every_sample(tmp_path):
    import engineflow as ef
    from tests.test_pipeline import RECIPE as PIPELINE

    (tmp_path / "pipe.py").write_text(PIPELINE)
    proc = run_engineflow("run", str(tmp_path / "pipe.py"), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu",
                          "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = _show(tmp_path / "runs")
    assert shown["world_size"] == 2
    assert [(s["name"], s["status"]) for s in shown["stages"]] == [
        ("warmup", "completed"), ("frozen", "completed"), ("finetune", "completed"), ("test", "completed"),
        ("predict", "completed")]
    # the inference pass's predictions: every sample of the test loader once, in its order, from both ranks
    predictions = torch.load(Path(shown["run_dir"]) / "predictions" / "predict" / "test.pt", weights_only=True)
    past = ef.load_run("last", runs_dir=tmp_path / "runs", which="last")
    inputs = past.components["loaders"]["test"].dataset.tensors[0]
    encoder, head = past.components["encoder"].eval(), past.components["head"].eval()
    with torch.no_grad():
        assert torch.equal(predictions, head(encoder(inputs)).argmax(-1))
