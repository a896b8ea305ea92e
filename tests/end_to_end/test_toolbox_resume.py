"""The training toolbox resumes bit for bit: a run killed by SIGKILL in the middle of a gradient
accumulation, with fp16's grad scaler, a warm-up schedule, an EMA and early stopping's patience all in
flight, ends with every tensor ``torch.equal`` to an unbroken run's: on one process, and inside the
second stage of a pipeline on two processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.end_to_end.test_resume import engineflow

# 120 samples in batches of 8. The step kills its process once, at the stage's iteration KILL_AT,
# on rank KILL_RANK. Checkpoints every 3 iterations: the resume starts from a checkpoint taken in the
# middle of an accumulation group (its gradients so far are in it).
RECIPE = '''
import os, signal
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=5, pretrain_epochs=1, finetune_epochs=4, lr=0.05, seed=3)

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    # BatchNorm: under DDP each process's running statistics are its own, and the EMA averages them too
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
    return dict(model=model, optimizer=optimizer, scheduler=ef.schedule(cosine, every="iteration", warmup=5),
                loaders={"train": DataLoader(data, batch_size=8, shuffle=True),
                         "valid": DataLoader(data, batch_size=64)})

def _maybe_die(state, run):
    kill_at, stage = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_STAGE", "fit")
    if state.iteration == kill_at and run.stage == stage and run.rank == int(os.environ.get("KILL_RANK", "0")):
        marker = os.environ["KILL_MARKER"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

@ef.train_step(precision="fp16", accumulate=4)
def train(batch, model, optimizer, backprop, state, run):
    _maybe_die(state, run)
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return {"loss": loss}

@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy(), "loss": ef.metrics.Loss(F.cross_entropy)},
              main_metric="valid/loss")
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}

average = ef.ema(0.9, warmup=True, evaluate=True)
# no epoch improves on the first by 10: the patience runs down from the second epoch on
stop = ef.early_stopping(patience=3, min_delta=10.0)
'''

STAGES = '''
@ef.train_step
def pretrain(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}

stages = [ef.stage("pretrain", train=pretrain, eval=evaluate, epochs="pretrain_epochs"),
          ef.stage("finetune", train=train, eval=evaluate, epochs="finetune_epochs", accumulate=3)]
'''


def _final(runs: Path) -> tuple[dict, dict, dict]:
    """The finished run's last.pt weights and EMA, and its record as `runs show --json` gives it."""
    shown = engineflow("runs", "show", "last", "--json", "--runs-dir", str(runs), cwd=runs.parent)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "completed", record
    last = torch.load(Path(record["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    return last["weights"], last["ema"], record


def _compare(tmp: Path, text: str, args: list[str], kill: dict[str, str]) -> tuple[dict, dict]:
    """An unbroken run and a run killed as ``kill`` says then resumed; both records."""
    recipe = tmp / "toolbox.py"
    recipe.write_text(text)
    base = ["run", str(recipe), "--device", "cpu", "--checkpoint-every", "3", *args]
    unbroken = engineflow(*base, "--runs-dir", str(tmp / "unbroken"), cwd=tmp)
    assert unbroken.returncode == 0, unbroken.stdout + unbroken.stderr
    broken = tmp / "broken"
    killed = engineflow(*base, "--runs-dir", str(broken), env={**kill, "KILL_MARKER": str(tmp / "killed")}, cwd=tmp)
    assert killed.returncode != 0 and (tmp / "killed").exists(), killed.stdout + killed.stderr
    resumed = engineflow(*base, "--runs-dir", str(broken), "--resume", "last", cwd=tmp)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from checkpoint" in resumed.stdout
    (weights, ema, record), (weights2, ema2, record2) = _final(tmp / "unbroken"), _final(broken)
    for name in weights:
        for key, tensor in weights[name].items():
            assert torch.equal(tensor, weights2[name][key]), (name, key)
    for name in ema:
        for key, tensor in ema[name].items():
            assert torch.equal(tensor, ema2[name][key]), ("ema", name, key)
    (resume,) = record2["resumes"]
    return record, {**record2, "resume": resume}


def _rows(record: dict) -> list[tuple]:
    """Every metric of every epoch, as metrics.jsonl holds them."""
    lines = (Path(record["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return sorted((row["epoch"], row["name"], row["value"]) for row in map(json.loads, lines))


@pytest.mark.slow
def test_a_fit_killed_mid_accumulation_with_every_tool_in_flight_resumes_bit_for_bit(tmp_path):
    # 15 batches an epoch in groups of 4 (4, 4, 4, 3); killed at iteration 23 (epoch 2's 8th batch),
    # resumed from iteration 21's checkpoint: the 2nd batch of epoch 2's second group
    unbroken, resumed = _compare(tmp_path, RECIPE, [], {"KILL_AT": "23"})
    assert resumed["resume"]["iteration"] == 21
    assert _rows(resumed) == _rows(unbroken)
    assert resumed["metrics"] == unbroken["metrics"] and resumed["best"] == unbroken["best"]
    (stage,) = unbroken["stages"]
    # early stopping ended the fit after 4 of its 5 epochs (best at 1, then 3 without an improvement)
    assert stage["epochs"] == 4 and stage.get("stopped", {}).get("epoch") == 4, stage
    assert resumed["stages"][0]["epochs"] == 4


@pytest.mark.slow
def test_the_second_stage_of_a_pipeline_on_two_processes_resumes_bit_for_bit(tmp_path):
    # finetune: 60 samples a process in batches of 8 (8 steps; groups of 3, 3, 2); rank 1 is killed at
    # the stage's iteration 13 (epoch 2's 5th batch), resumed from its 12th: the 1st of a group of 3
    unbroken, resumed = _compare(tmp_path, RECIPE + STAGES, ["--nproc", "2", "--oversubscribe"],
                                 {"KILL_AT": "13", "KILL_STAGE": "finetune", "KILL_RANK": "1"})
    assert resumed["resume"]["world_size"] == 2
    assert _rows(resumed) == _rows(unbroken)
    assert resumed["metrics"] == unbroken["metrics"] and resumed["best"] == unbroken["best"]
    assert [s["epochs"] for s in resumed["stages"]] == [s["epochs"] for s in unbroken["stages"]]
    # the pipeline-wide patience carried over from pretraining: finetune stopped after 3 of its 4 epochs
    assert unbroken["stages"][1]["epochs"] == 3 and unbroken["stages"][1]["stopped"]["epoch"] == 3
