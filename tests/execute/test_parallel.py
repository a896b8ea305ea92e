"""Data-parallel runs: sharding (fast, in process) and --nproc end to end (slow, real processes, gloo)."""

from __future__ import annotations

import io
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
from engineflow.errors import RecipeError
from engineflow.execute.losses import LossMonitor
from engineflow.execute.parallel import (
    ShardBatches,
    World,
    order_layout,
    regrouped_metric_state,
    resume_order,
    shard_loader,
    sum_over_ranks,
)
from engineflow.shards import Dealer, Layout, consumed, position_index, rank_positions, steps
from engineflow.state.rng import loader_generators
from tests.conftest import REPO, run_engineflow

DIGITS = REPO / "recipes" / "digits.py"


# sharding ---------------------------------------------------------------------------------------
def _dealt_batches(samples, world, batch, *, shuffle, pad, drop_last=False, seed=5):
    """Every rank's batches of sample indices from a sharded DataLoader's batch sampler (the order
    drawn from ``seed``; iterating the DataLoader would draw its workers' base seed first)."""
    out = []
    for rank in range(world):
        loader = DataLoader(TensorDataset(torch.arange(samples)), batch_size=batch, shuffle=shuffle,
                            drop_last=drop_last, generator=torch.Generator().manual_seed(seed))
        shard = shard_loader(loader, World(rank, world), pad=pad)
        out.append(list(shard.batch_sampler))
        assert len(shard) == len(out[-1])
    return out


@pytest.mark.parametrize("samples", [1, 7, 269, 271])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_eval_shards_hold_every_sample_exactly_once(samples, world, batch):
    shards = [[i for b in rank for i in b] for rank in _dealt_batches(samples, world, batch, shuffle=False, pad=False)]
    assert sorted(i for shard in shards for i in shard) == list(range(samples))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(shard == list(range(r, samples, world)) for r, shard in enumerate(shards))
    # the tensor loader's shares are the same batches
    for rank in range(world):
        loader = TensorLoader(torch.arange(samples), batch_size=batch)
        loader.shard(rank, world, pad=False)
        assert [i for b in loader for i in b.tolist()] == shards[rank]


@pytest.mark.parametrize("samples", [7, 10, 12])
def test_train_shards_are_one_permutation_padded_and_dealt_out(samples):
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(5)).tolist()
    for world in (2, 3):
        got = [[i for b in rank for i in b] for rank in _dealt_batches(samples, world, 2, shuffle=True, pad=True)]
        assert len({len(s) for s in got}) == 1  # every rank runs the same number of steps
        dealt = [got[k % world][k // world] for k in range(len(got[0]) * world)]
        # position k of the epoch's order is on rank k % world; the padding repeats the order's first
        assert dealt == [order[k % samples] for k in range(len(dealt))]


def test_a_whole_epoch_is_batched_as_each_rank_s_share_of_the_padded_order():
    for samples, world, batch, drop_last in [(11, 2, 2, False), (11, 3, 2, True), (50, 2, 4, False), (7, 4, 3, False)]:
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(3)).tolist()
        padded = [order[p % samples] for p in range(-(-samples // world) * world)]
        got = _dealt_batches(samples, world, batch, shuffle=True, pad=True, drop_last=drop_last, seed=3)
        for rank in range(world):
            share = padded[rank::world]
            expected = [share[i:i + batch] for i in range(0, len(share), batch)]
            if drop_last and len(expected[-1]) < batch:
                expected.pop()
            assert got[rank] == expected


@pytest.mark.parametrize("pad", [True, False])
def test_a_tensor_loader_and_a_dataloader_deal_out_the_same_batches(pad):
    """One dealer: a sharded TensorLoader and a sharded DataLoader over the same order hand every
    rank the same samples in the same batches, whole epochs and resumed passes alike."""
    for samples, world, batch, drop_last in [(11, 2, 2, False), (11, 3, 2, True), (23, 3, 4, False), (7, 4, 3, False)]:
        for offset in range(0, samples, 3) if pad else [0]:
            for rank in range(world):
                tensors = TensorLoader(torch.arange(samples), batch_size=batch, drop_last=drop_last)
                tensors.shard(rank, world, pad=pad)
                rows = DataLoader(TensorDataset(torch.arange(samples)), batch_size=batch, drop_last=drop_last)
                rows = shard_loader(rows, World(rank, world), pad=pad)
                dealer = Dealer(samples, batch, world, rank, drop_last, pad)
                if offset:
                    tensors.start_at(offset)
                    resume_order(rows, offset)
                expected = [list(b) for b in dealer.batches(offset)]  # unshuffled: positions are samples
                assert [b.tolist() for b in tensors] == expected
                assert [b[0].tolist() for b in rows] == expected
                assert len(expected) == dealer.count(offset)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_a_resumed_pass_deals_out_each_remaining_position_once_in_equal_steps(world, batch):
    for samples in (1, 2, 7, 13, 30):
        for offset in range(1, samples):
            plan = steps(samples, world, batch, offset=offset)
            shares = [[position_index(p, samples, offset) for step in plan for p in rank_positions(step, r, world)]
                      for r in range(world)]
            taken = sorted(i for share in shares for i in share)
            repeats = len(taken) - (samples - offset)
            assert sorted(set(taken)) == list(range(offset, samples))
            # every rank has a position in every step (each step's backward is a collective), at most batch
            for step in plan:
                assert all(1 <= len(rank_positions(step, r, world)) <= batch for r in range(world))
            # positions repeat only where they cannot be shared out: too few left, and one a batch or one step
            if repeats:
                assert (samples - offset) % (batch * world) < world and (batch == 1 or len(plan) == 1)
                assert repeats < world


def test_an_epoch_left_on_two_processes_is_finished_on_three_each_sample_once():
    """In process: two ranks train 3 steps of a shuffled epoch, then three ranks finish it."""
    x = torch.arange(23)
    def share(rank, world):
        loader = TensorLoader(x, batch_size=2, shuffle=True, seed=4)
        loader.shard(rank, world, pad=True)
        return loader

    before = [list(share(r, 2))[:3] for r in range(2)]
    position = consumed(23, 2, 2, offset=0, done=3)
    after = []
    for rank in range(3):
        loader = share(rank, 3)
        loader.start_at(position)
        batches = list(loader)
        after.append(batches)
    assert len({len(b) for b in after}) == 1  # the same number of steps on every rank
    seen = torch.cat([b for rank in before for b in rank] + [b for rank in after for b in rank]).tolist()
    assert sorted(seen) == list(range(23))
    # a DataLoader's shares finish the same positions
    data = TensorDataset(x)
    def dl(rank, world):
        loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator())
        return shard_loader(loader, World(rank, world), pad=True)
    first = [dl(r, 2) for r in range(2)]
    for loader in first:
        loader.batch_sampler.generator.manual_seed(9)
    taken = [b[0] for loader in first for b in list(loader)[:3]]
    rest = []
    for rank in range(3):
        loader = dl(rank, 3)
        loader.batch_sampler.generator.manual_seed(9)
        resume_order(loader, consumed(23, 2, 2, offset=0, done=3))
        assert order_layout(loader) == Layout("shard", 23, 2, 3, offset=0)  # until its pass starts
        rest += [b[0] for b in loader]
        assert order_layout(loader) == Layout("shard", 23, 2, 3, offset=12)
    assert sorted(torch.cat(taken + rest).tolist()) == list(range(23))


# A fit as rank 0 of a world, in process (no collectives: only rank 0's share trains). Its train
# loader holds sample ids; `steps` lists (epoch, ids) of every step trained.
IDS_RECIPE = """
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=3, lr=0.1, seed=0, kind="tensor", batch=4, drop_last=False)

def setup(cfg):
    gen = torch.Generator().manual_seed(1)
    x, y, ids = torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen), torch.arange(50)
    if cfg.kind == "tensor":
        train = ef.data.TensorLoader(x, y, ids, batch_size=cfg.batch, shuffle=True, drop_last=cfg.drop_last)
    else:
        train = DataLoader(TensorDataset(x, y, ids), batch_size=cfg.batch, shuffle=True, drop_last=cfg.drop_last)
    model = torch.nn.Linear(6, 3)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr), loaders={"train": train})

@ef.train_step
def train(batch, model, optimizer):
    x, y, _ = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}
"""


def _rank_fit(tmp_path: Path, world: int, rank: int = 0, **overrides):
    from ignite.engine import Events

    import engineflow as ef

    recipe = tmp_path / "ids.py"
    recipe.write_text(IDS_RECIPE)
    fit, _, _ = ef.build(recipe, overrides)
    if world > 1:
        fit.loaders["train"] = shard_loader(fit.loaders["train"], World(rank, world), pad=True)
        fit.world_size = world
    fit.steps = []
    fit.train.add_event_handler(Events.ITERATION_COMPLETED,
                                lambda e: fit.steps.append((e.state.epoch, e.state.batch[2].tolist())))
    return fit


def _saved_at(fit, iteration: int, *, stop: bool = True) -> dict:
    """Run ``fit`` to ``iteration``; its state_dict there, as the checkpointer takes it (at an epoch's
    last batch: once the epoch completed). ``stop``: the run ends there, else it goes on."""
    import copy

    from ignite.engine import Events

    saved = {}

    def grab(engine, last: bool):
        state = engine.state
        if state.iteration == iteration and "state" not in saved and (last or fit.position()["batches_in_epoch"]
                                                                         < state.epoch_length):
            saved["state"] = copy.deepcopy(fit.state_dict())
            if stop:
                engine.terminate()

    fit.train.add_event_handler(Events.ITERATION_COMPLETED, grab, False)
    fit.train.add_event_handler(Events.EPOCH_COMPLETED, grab, True)
    fit.run(3)
    return saved["state"]


@pytest.mark.parametrize("kind", ["tensor", "loader"])
@pytest.mark.parametrize(("iteration", "world"), [(26, 4), (25, 4), (12, 2), (3, 2)])
def test_a_resume_on_another_number_trains_the_epochs_left(tmp_path, kind, iteration, world):
    """One process saves (at an epoch's end: 26; mid-epoch: 25, 12, 3); rank 0 of another number
    resumes: the interrupted epoch runs the steps left, then the epochs left, whole."""
    state = _saved_at(_rank_fit(tmp_path, 1, kind=kind), iteration)
    fit = _rank_fit(tmp_path, world, kind=kind)
    if kind == "loader" and state["engine"]["batches_in_epoch"]:
        with pytest.raises(RecipeError, match="does not deal out itself"):  # a plain DataLoader's order
            fit.load_state_dict(state)
        return
    fit.load_state_dict(state)
    fit.run(3)
    done = state["engine"]["epochs_completed"]
    assert fit.train.state.epoch == 3 and [h["epoch"] for h in fit.history] == [1, 2, 3]
    whole = len(steps(50, world, 4))
    later = [ids for epoch, ids in fit.steps if epoch > done + 1]
    assert len(later) == (2 - done) * whole  # whole epochs of this number's length
    if state["engine"]["batches_in_epoch"]:
        position = state["engine"]["batches_in_epoch"] * 4
        assert len([e for e, _ in fit.steps if e == done + 1]) == len(steps(50, world, 4, offset=position))


@pytest.mark.parametrize("kind", ["tensor", "loader"])
def test_with_drop_last_a_short_rest_is_trained_once(tmp_path, kind):
    """8 a batch, 2 then 3 processes: 6 steps (48 samples) trained, 2 left, less than a step of 3 x 8."""
    first = [_rank_fit(tmp_path, 2, rank, kind=kind, batch=8, drop_last=True) for rank in range(2)]
    states = [_saved_at(fit, 2) for fit in first]
    state = {**states[0], "ranks": [{k: s[k] for k in ("rng", "loss", "train_metrics")} for s in states]}
    seen = [i for fit in first for epoch, ids in fit.steps if epoch == 1 for i in ids]
    rest = []
    for rank in range(3):
        fit = _rank_fit(tmp_path, 3, rank, kind=kind, batch=8, drop_last=True)
        fit.load_state_dict(state)
        fit.run(3)
        rest += [i for epoch, ids in fit.steps if epoch == 1 for i in ids]
        assert [e for e, _ in fit.steps].count(1) == 1 and fit.train.state.epoch == 3
    assert sorted(seen + rest) == list(range(50))


def test_a_loader_sharded_when_saved_is_sharded_again_at_an_epoch_end(tmp_path):
    """2 processes -> 1 mid-epoch (the DataLoader re-sharded as one share), then an epoch-end
    checkpoint of that run resumed on 1: epoch 3 is the unbroken continuation's, batch for batch."""
    state = _saved_at(_rank_fit(tmp_path, 2, kind="loader"), 3)  # 24 of epoch 1's samples trained
    unbroken = _rank_fit(tmp_path, 1, kind="loader")
    unbroken.load_state_dict(state)
    end_of_2 = _saved_at(unbroken, 3 + 7 + 13, stop=False)  # 7 steps finish epoch 1's 26, 13 are epoch 2
    resumed = _rank_fit(tmp_path, 1, kind="loader")
    resumed.load_state_dict(end_of_2)
    resumed.run(3)
    assert [ids for e, ids in resumed.steps if e == 3] == [ids for e, ids in unbroken.steps if e == 3]


def test_a_dataloader_is_rebuilt_around_its_shard_with_its_options():
    data = TensorDataset(torch.arange(11.0))
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    shards = [shard_loader(loader, World(r, 2), pad=True) for r in range(2)]
    assert all(isinstance(s.batch_sampler, ShardBatches) and s.batch_sampler.dealer.batch == 2 for s in shards)
    assert shards[0].batch_sampler.generator is loader.generator  # seed_epoch reseeds it each epoch
    assert loader_generators(shards[0]) == [loader.generator]
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


def test_a_checkpoint_holds_the_layout_as_the_dict_earlier_versions_wrote(tmp_path):
    """The checkpoint's "order" stays the plain dict older checkpoints hold, and reads back as a Layout."""
    for kind, name in (("tensor", "tensor"), ("loader", "shard")):
        state = _saved_at(_rank_fit(tmp_path, 2, kind=kind), 3)
        written = {"kind": name, "samples": 50, "batch": 4, "world": 2, "offset": 0, "drop_last": False}
        assert state["order"] == written and list(state["order"]) == list(written)
        layout = Layout.from_state(written)
        assert layout == Layout(name, 50, 4, 2) and layout.state_dict() == written
        assert layout.consumed(3) == consumed(50, 2, 4, offset=0, done=3) == 24


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_one_gather_returns_each_rank_s_value_as_it_is(tmp_path):
    """gather_objects serves a fit's per-rank state (a dict) and an infer pass's rows (a tensor of
    any length) alike: a list, one value a rank."""
    import torch.distributed as dist

    from engineflow.execute.parallel import gather_objects

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rows = torch.arange(5.0).reshape(5, 1)
        gathered = gather_objects(rows)
        assert isinstance(gathered, list) and len(gathered) == 1 and torch.equal(gathered[0], rows)
        assert gather_objects({"rng": [1, 2]}) == [{"rng": [1, 2]}]
    finally:
        dist.destroy_process_group()


def test_one_process_is_not_sharded_and_sums_nothing():
    loader = DataLoader(TensorDataset(torch.arange(3.0)), batch_size=2)
    assert shard_loader(loader, World(), pad=False) is not None
    monitor = LossMonitor()
    monitor.observe({"loss": 2.0}, epoch=1, iteration=1)
    assert monitor.reduce is None and monitor.epoch_means() == {"train/loss": 2.0}
    assert callable(sum_over_ranks)


def _accuracy_states(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """The per-rank states of an Accuracy that saw each batch on its own rank."""
    from ignite.metrics import Accuracy

    from engineflow.ignite_internals import PER_RANK_KEY

    states = []
    for y_pred, y in batches:
        metric = Accuracy()
        metric.update((y_pred, y))
        states.append(metric.state_dict()[PER_RANK_KEY][0])
    return states


def test_metric_states_of_three_processes_count_every_batch_on_two_and_on_four():
    """A metric saved mid-epoch by 3 processes, loaded by 2: rank 0 adds saved rank 2's counts to its
    own (Accuracy sums them in compute); loaded by 4: rank 3 starts from nothing."""
    from ignite.metrics import Accuracy, Metric
    from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

    from engineflow.ignite_internals import PER_RANK_KEY

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 5, 6)]
    saved = {PER_RANK_KEY: _accuracy_states(batches)}
    correct = [int((p.argmax(-1) == y).sum()) for p, y in batches]
    two = [regrouped_metric_state(Accuracy(), saved, rank, 2) for rank in range(2)]
    assert all(complete for _, complete in two)
    (zero, _), (one, _) = two
    assert zero[PER_RANK_KEY][1] is None and len(zero[PER_RANK_KEY]) == 2
    assert int(zero[PER_RANK_KEY][0]["_num_correct"]) == correct[0] + correct[2]
    assert zero[PER_RANK_KEY][0]["_num_examples"] == 4 + 6
    assert int(one[PER_RANK_KEY][1]["_num_correct"]) == correct[1] and one[PER_RANK_KEY][1]["_num_examples"] == 5
    four = [regrouped_metric_state(Accuracy(), saved, rank, 4)[0] for rank in range(4)]
    assert [state is None for state in four] == [False, False, False, True]
    assert int(four[2][PER_RANK_KEY][2]["_num_correct"]) == correct[2]
    assert regrouped_metric_state(Accuracy(), None, 0, 2) == (None, True)  # a metric without state

    class Peak(Metric):  # the largest value seen: reduced with MAX over the processes
        _state_dict_all_req_keys = ("_peak", "_seen")

        @reinit__is_reduced
        def reset(self):
            self._peak, self._seen = torch.tensor(float("-inf")), 0

        @reinit__is_reduced
        def update(self, output):
            self._peak, self._seen = torch.maximum(self._peak, output.max()), self._seen + 1

        @sync_all_reduce("_peak:MAX")
        def compute(self):
            return float(self._peak)

    peaks = [{"_peak": torch.tensor(v), "_seen": 1} for v in (1.0, 3.0, 2.0)]
    (state, complete) = regrouped_metric_state(Peak(), {PER_RANK_KEY: peaks}, 0, 2)
    assert complete and float(state[PER_RANK_KEY][0]["_peak"]) == 2.0  # max(1, 2): rank 0 and saved rank 2
    # _seen is not reduced by compute and differs between the ranks: rank 0 keeps its own state alone
    peaks[2]["_seen"] = 5
    (state, complete) = regrouped_metric_state(Peak(), {PER_RANK_KEY: peaks}, 0, 2)
    assert not complete and float(state[PER_RANK_KEY][0]["_peak"]) == 1.0


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
                              "--oversubscribe", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)["metrics"]

    one = test(1)
    for nproc in (2, 3):  # 271 test samples: no number of processes here divides them
        assert test(nproc) == pytest.approx(one, abs=1e-6)


def _children_of(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        return dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    if b"=" in item)
    except OSError:
        return {}


def _workers_of(launcher: int) -> list[int]:
    """A launcher's workers in rank order: its children, or the children of the one process it forks
    them from (engineflow.app.workers), as that process records them in the launch folder."""
    children = _children_of(launcher)
    ranked = {}
    for child in children:
        rank = _environ(child).get(b"RANK")
        if rank is not None:
            ranked[int(rank)] = child
        else:  # the forking process: its workers' ranks are in pids.json
            folder = _environ(child).get(b"ENGINEFLOW_LAUNCH_DIR")
            try:
                pids = json.loads((Path(folder.decode()) / "pids.json").read_text()) if folder else {}
            except OSError:
                pids = {}
            ranked.update({int(r): pid for r, pid in pids.items() if pid in _children_of(child)})
    return [ranked[r] for r in sorted(ranked)]


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
    rank1 = workers[1]
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


def _listening(pid: int) -> list[str]:
    """The local addresses of the TCP sockets process ``pid`` listens on (hex, as /proc/net/tcp has them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, this process's socket
                found.append(fields[1].split(":")[0])
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_launcher_leaves_no_worker_and_its_workers_listen_on_loopback_only(tmp_path):
    launcher, _ = _start_long_run(tmp_path)
    workers = _workers_of(launcher.pid)
    assert len(workers) == 2
    workers += [pid for pid in _children_of(launcher.pid) if pid not in workers]  # the process they forked from
    # one machine: the processes meet through a file and connect over loopback; nothing listens outside
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1
    listening = [address for pid in workers for address in _listening(pid)]
    assert listening and set(listening) <= loopback, listening
    folder = Path(_environ(workers[0])[b"ENGINEFLOW_LAUNCH_DIR"].decode())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    # its folder (the command's arguments) outlived it; the next command that settles dead runs removes it
    assert (folder / "spec.json").is_file()
    listed = run_engineflow("runs", "list", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert listed.returncode == 0 and not folder.exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("signum", "fork"), [(signal.SIGINT, "1"), (signal.SIGINT, "0"), (signal.SIGTERM, "1")],
                         ids=["ctrl-c-forked", "ctrl-c-spawned", "sigterm-forked"])
def test_an_interrupt_while_the_processes_start_stops_them_with_130(tmp_path, signum, fork):
    """The launcher is interrupted as soon as it has started its processes, before rank 0 can act on
    it (forked: before rank 0 even exists): every process ends, exit 130, one line, no run left running."""
    env = {**os.environ, "ENGINEFLOW_FORK_WORKERS": fork}
    launcher = subprocess.Popen([sys.executable, "-m", "engineflow", "run", str(DIGITS), "--nproc", "2",
                                 "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not _children_of(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    started = _children_of(launcher.pid)
    time.sleep(0.5)  # past the interpreter's own start (a signal inside it is Python's to report), into the imports
    launcher.send_signal(signum)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert not any(_alive(pid) for pid in started)
    listed = run_engineflow("runs", "list", "--json", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert all(r["status"] == "interrupted" for r in json.loads(listed.stdout))  # no run left running


@pytest.mark.slow
def test_an_error_every_process_hits_is_printed_once_by_rank_0(tmp_path):
    recipe = tmp_path / "broken.py"
    recipe.write_text(BROKEN)
    done = run_engineflow("run", str(recipe), "--nproc", "2", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("Traceback") == 1 and done.stderr.count("ValueError: a batch it cannot take") == 1
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == [
        "error: training failed with the exception above"]
    assert _show(tmp_path / "runs")["error"].startswith("rank 0 (pid ")


BROKEN = """
import torch
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=1, seed=0)

def setup(cfg):
    model = torch.nn.Linear(4, 2)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                loaders={"train": DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)})

@ef.train_step
def train(batch, model, optimizer, state):
    if state.iteration == 2:
        raise ValueError("a batch it cannot take")
    return {"loss": model(batch[0]).sum()}
"""


@pytest.mark.slow
def test_a_pipeline_on_two_processes_runs_every_stage_and_predicts_every_sample(tmp_path):
    import engineflow as ef
    from tests.execute.test_pipeline import RECIPE as PIPELINE

    (tmp_path / "pipe.py").write_text(PIPELINE)
    # from Python this time: ef.run(nproc=2) launches the processes as the command does
    output = io.StringIO()
    result = ef.run(tmp_path / "pipe.py", runs_dir=tmp_path / "runs", device="cpu", nproc=2, stream=output)
    assert result.status == "completed" and result.run_dir.is_dir()
    assert "2 processes (gloo)" in output.getvalue()
    shown = _show(tmp_path / "runs")
    assert shown["world_size"] == 2 and shown["id"] == result.run_id
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


# resume on another number of processes ----------------------------------------------------------
# 50 samples with their ids, batch 4. Every train step appends "epoch iteration id id ..." to a file
# of its attempt and rank; the rank named by a kill SIGKILLs itself at that iteration, once.
COUNTED = '''
import os, signal
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=3, lr=0.1, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(50, 6, generator=gen), torch.randint(0, 3, (50,), generator=gen),
                         torch.arange(50))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(data, batch_size=4, shuffle=True)})

@ef.train_step(metrics={"accuracy": ef.metrics.Accuracy()})
def train(batch, model, optimizer, state, run):
    x, y, ids = batch
    kill = os.environ.get("KILL", "")
    marker = os.path.join(os.environ["IDS"], f"killed-{kill}")
    if kill and state.iteration == int(kill.split(":")[0]) and run.rank == int(kill.split(":")[1]) \\
            and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    logits = model(x)
    correct = int((logits.argmax(-1) == y).sum())
    with open(os.path.join(os.environ["IDS"], f"{os.environ['ATTEMPT']}-{run.rank}"), "a") as out:
        out.write(f"{state.epoch} {state.iteration} {correct} " + " ".join(map(str, ids.tolist())) + "\\n")
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss, "y_pred": logits, "y": y}
'''


@pytest.mark.slow
def test_an_epoch_interrupted_on_two_processes_ends_on_three_and_back_each_sample_once(tmp_path):
    """2 processes killed mid-epoch 2, resumed on 3, killed mid-epoch 3, resumed on 2: each epoch's
    trained steps (those its checkpoints kept) hold every sample exactly once, and the epoch's train
    accuracy counts every one of them (the saved processes' metric states regrouped, not refused)."""
    from tests.end_to_end.test_resume import engineflow

    recipe, ids, runs = tmp_path / "counted.py", tmp_path / "ids", tmp_path / "runs"
    recipe.write_text(COUNTED)
    ids.mkdir()
    base = ["run", str(recipe), "--runs-dir", str(runs), "--device", "cpu", "--checkpoint-every", "3"]
    # 2 processes: 7 steps an epoch, checkpoints at iterations 3, 6, 9; rank 1 dies at 11 (epoch 2, step 4)
    # 3 processes: epoch 2's 34 samples left in 3 steps (10-12); epoch 3 of 5 steps (13-17), rank 0 dies at 16,
    # after the checkpoint at 15; 2 processes: the 14 samples left in 2 steps (16, 17)
    attempts = [("2", "11:1", []), ("3", "16:0", ["--resume", "last"]), ("2", "", ["--resume", "last"])]
    for attempt, (nproc, kill, more) in enumerate(attempts):
        env = {"IDS": str(ids), "ATTEMPT": str(attempt), "KILL": kill}
        done = engineflow(*base, *more, "--nproc", nproc, "--oversubscribe", cwd=tmp_path, env=env)
        assert done.returncode == (1 if kill else 0), done.stdout + done.stderr
        if kill:  # one line, from the launcher, naming the rank: no traceback of every rank
            assert done.stderr.count("error: ") == 1 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stdout.splitlines() if "from checkpoint" in line] == [
        "from checkpoint state-000000015.pt: epoch 3, batch 4 of 5 on 3 processes"]

    steps: dict[int, list[tuple[int, int, int, list[int]]]] = {}  # attempt -> (epoch, iteration, correct, ids)
    for path in ids.glob("[0-9]-*"):
        for line in path.read_text().splitlines():
            epoch, iteration, correct, *sample = map(int, line.split())
            steps.setdefault(int(path.name.split("-")[0]), []).append((epoch, iteration, correct, sample))
    kept: dict[int, list[int]] = {}
    right: dict[int, int] = {}
    for attempt, done_steps in sorted(steps.items()):
        # an attempt's steps after the checkpoint the next one resumed from were trained again
        resumed_after = min(i for _, i, _, _ in steps[attempt + 1]) - 1 if attempt + 1 in steps else None
        for epoch, iteration, correct, sample in done_steps:
            if resumed_after is None or iteration <= resumed_after:
                kept.setdefault(epoch, []).extend(sample)
                right[epoch] = right.get(epoch, 0) + correct
    assert sorted(kept) == [1, 2, 3]
    for epoch, sample in kept.items():
        assert sorted(sample) == list(range(50)), epoch  # every sample once: none lost, none repeated
    # the interrupted epochs' later steps ran on 3 processes (each rank a share), then on 2
    assert {(e, i) for e, i, _, _ in steps[1]} >= {(2, 10), (2, 11), (2, 12)}
    assert {i for _, i, _, _ in steps[2]} == {16, 17} and sum(len(s) for _, _, _, s in steps[2]) == 14
    record = _show(runs)
    assert record["status"] == "completed" and record["world_size"] == 2
    assert [r["world_size"] for r in record["resumes"]] == [3, 2]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    # 2 -> 3 in epoch 2 and 3 -> 2 in epoch 3: the accuracy is over all 50 samples of each epoch
    assert [h["train/accuracy"] for h in record["history"]] == [right[epoch] / 50 for epoch in (1, 2, 3)]
