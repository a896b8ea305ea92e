"""Exact resume: runs killed with SIGKILL at random iterations end bit-identical to an unbroken run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.recipes import classifier_steps

RECIPE = '''
import os, signal
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=4, lr=0.05, workers=0, seed=3)

def _kill_once(tag):
    marker = os.environ.get("KILL_MARKER", "") + "." + tag
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

# Kill in the middle of writing the N-th checkpoint file: bytes on disk, then death.
_kill_save = int(os.environ.get("KILL_IN_SAVE", "0"))
if _kill_save:
    _save, _count = torch.save, [0]
    def _dying_save(obj, f, *args, **kwargs):
        _count[0] += 1
        if _count[0] == _kill_save:
            f.write(b"half a checkpoint")
            f.flush()
            _kill_once("save")
        return _save(obj, f, *args, **kwargs)
    torch.save = _dying_save

def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9),
                scheduler=None,
                loaders={"train": DataLoader(data, batch_size=16, shuffle=True, num_workers=cfg.workers),
                         "valid": DataLoader(data, batch_size=64)})
''' + classifier_steps(asks=", state", before='''\
    if state.iteration == int(os.environ.get("KILL_AT", "0")):
        _kill_once("iteration")
    if state.iteration in {int(i) for i in os.environ.get("END_EPOCH_AT", "0").split(",")}:
        raise ef.EndEpoch
''')
EPOCH_LENGTH = 8  # 120 samples, batch 16
TOTAL = 4 * EPOCH_LENGTH


def engineflow(*args: str, env: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "engineflow", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def final_state(runs_dir: Path) -> dict:
    (run_json,) = runs_dir.glob("*/*/run.json")
    record = json.loads(run_json.read_text())
    assert record["status"] == "completed", record
    return torch.load(run_json.parent / "checkpoints" / "last.pt", weights_only=True)["weights"]["model"]


def killed_run(tmp_path: Path, recipe_text: str, kill_at: int, *options: str) -> tuple[Path, Path]:
    """Write ``recipe_text`` as resumable.py and run it until SIGKILL at iteration ``kill_at``;
    returns the recipe and the runs folder."""
    recipe, runs = tmp_path / "resumable.py", tmp_path / "runs"
    recipe.write_text(recipe_text)
    killed = engineflow("run", str(recipe), "--runs-dir", str(runs), *options,
                        env={"KILL_AT": str(kill_at), "KILL_MARKER": str(tmp_path / "m")}, cwd=tmp_path)
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    return recipe, runs


def divergences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def trial(tmp: Path, recipe: Path, workers: int, kills: list[dict], env: dict | None = None) -> dict:
    """Run, get killed as each env says, resume each time; returns the final model state."""
    env = env or {}
    runs = tmp / "runs"
    base = ["--runs-dir", str(runs), "--device", "cpu", "--set", f"workers={workers}", "--checkpoint-every", "3"]
    first = True
    for index, kill in enumerate(kills):
        args = ["run", str(recipe), *base] + ([] if first else ["--resume", "last"])
        proc = engineflow(*args, env={**env, **kill, "KILL_MARKER": str(tmp / f"killed-{index}")}, cwd=tmp)
        assert proc.returncode == -9, (kill, proc.stdout, proc.stderr)
        first = False
    proc = engineflow("run", str(recipe), *base, "--resume", "last", env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert "from checkpoint" in proc.stdout or "no valid checkpoint" in proc.stdout
    return final_state(runs)


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    (folder / "resumable.py").write_text(RECIPE)
    return folder


@pytest.fixture(scope="module")
def reference(recipe_dir):
    """The same training, never interrupted, with and without DataLoader workers."""
    states = {}
    for workers in (0, 2):
        runs = recipe_dir / f"reference-{workers}"
        proc = engineflow("run", str(recipe_dir / "resumable.py"), "--runs-dir", str(runs), "--device", "cpu",
                          "--set", f"workers={workers}", "--checkpoint-every", "3", cwd=recipe_dir)
        assert proc.returncode == 0, proc.stderr
        states[workers] = final_state(runs)
    return states


# Kill points: on an epoch's last batch, during a checkpoint write, and with DataLoader workers at a
# random iteration (seeded, so a failure is reproducible). Kills mid-epoch and at an epoch's end,
# several in one run, and Ctrl-C are tests/test_parallel_resume.py's (on 1 to 4 processes).
_rng = random.Random(20261123)
TRIALS = [
    ("epoch-last-batch", 0, [{"KILL_AT": str(2 * EPOCH_LENGTH)}]),
    ("during-checkpoint-write", 0, [{"KILL_IN_SAVE": "4"}]),
    ("workers-random-iteration", 2, [{"KILL_AT": str(_rng.randint(2, TOTAL - 1))}]),
    ("workers-during-write", 2, [{"KILL_IN_SAVE": "6"}]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "workers", "kills"), TRIALS, ids=[f"{t[0]}-{i}" for i, t in enumerate(TRIALS)])
def test_sigkill_and_resume_is_bit_identical(recipe_dir, reference, tmp_path, name, workers, kills):
    recipe = tmp_path / "resumable.py"
    recipe.write_text(RECIPE)
    resumed = trial(tmp_path, recipe, workers, kills)
    assert divergences(resumed, reference[workers]) == [], f"{name}: tensors differ after resume"


@pytest.mark.slow
def test_a_resumed_run_keeps_its_id_and_records_the_resume(recipe_dir, tmp_path):
    recipe, runs = killed_run(tmp_path, RECIPE, 10, "--checkpoint-every", "3")
    listed = json.loads(engineflow("runs", "list", "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert listed[0]["status"] == "interrupted"
    resumed = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", listed[0]["id"][:15],
                         "--checkpoint-every", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from checkpoint state-000000009.pt: epoch 2, batch 2 of 8" in resumed.stdout
    shown = json.loads(engineflow("runs", "show", "last", "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert shown["id"] == listed[0]["id"] and shown["status"] == "completed"
    assert [row["epoch"] for row in shown["history"]] == [1, 2, 3, 4]
    assert len(shown["resumes"]) == 1 and shown["resumes"][0]["iteration"] == 9

    again = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", cwd=tmp_path)
    assert again.returncode == 0 and "already completed; nothing to resume" in again.stdout


@pytest.mark.slow
def test_resume_refuses_changed_code_or_config(tmp_path):
    recipe, runs = killed_run(tmp_path, RECIPE, 12)
    changed_config = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", "--set", "lr=0.5",
                                cwd=tmp_path)
    assert changed_config.returncode == 2 and "other config (lr: 0.05 -> 0.5)" in changed_config.stderr
    recipe.write_text(RECIPE.replace("nn.Dropout(0.3)", "nn.Dropout(0.2)"))
    changed_code = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", cwd=tmp_path)
    assert changed_code.returncode == 2
    assert "other code (resumable.py" in changed_code.stderr and "--ignore-changes" in changed_code.stderr
    assert "Traceback" not in changed_code.stderr
    forced = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", "--ignore-changes",
                        cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # only the checksum can tell
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def sha256_files_of_earlier_versions_then_flip_a_byte(path):
    import hashlib

    for checkpoint in path.parent.glob("state-*.pt"):  # as engineflow wrote them before XXH3
        checkpoint.with_name(checkpoint.name + ".xxh3").unlink()
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        checkpoint.with_name(checkpoint.name + ".sha256").write_text(f"{digest}  {checkpoint.name}\n")
    flip_a_byte(path)


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "reason"), [(flip_a_byte, "checksum mismatch"), (truncate, "checksum mismatch"),
                                                (lambda p: p.with_name(p.name + ".xxh3").unlink(), "no checksum"),
                                                (sha256_files_of_earlier_versions_then_flip_a_byte,
                                                 "checksum mismatch")])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(reference, tmp_path, damage, reason):
    recipe, runs = killed_run(tmp_path, RECIPE, 20, "--checkpoint-every", "3")
    (state_dir,) = runs.glob("*/*/checkpoints/state")
    files = sorted(state_dir.glob("state-*.pt"))
    assert files[-1].name == "state-000000018.pt" and len(files) >= 2
    damage(files[-1])
    resumed = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", "--checkpoint-every", "3",
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {files[-1]} is damaged ({reason}" in resumed.stdout
    assert f"from checkpoint {files[-2].name}" in resumed.stdout
    assert not list(state_dir.glob("*.sha256")), "pruning leaves no checksum of a deleted checkpoint behind"
    assert divergences(final_state(runs), reference[0]) == []  # the same training, never interrupted


@pytest.mark.slow
def test_recipe_policy_every_iterations_keeps_the_last_k(tmp_path):
    recipe = tmp_path / "resumable.py"
    recipe.write_text(RECIPE + "\ncheckpoints = ef.checkpoints(every_epochs=None, every_iterations=5, keep_last=2, "
                               "keep_best=0)\n")
    runs = tmp_path / "runs"
    assert engineflow("run", str(recipe), "--runs-dir", str(runs), cwd=tmp_path).returncode == 0
    (state_dir,) = runs.glob("*/*/checkpoints/state")
    assert [p.name for p in sorted(state_dir.glob("state-*.pt"))] == ["state-000000025.pt", "state-000000030.pt"]
    for path in state_dir.glob("state-*.pt"):
        assert path.with_name(path.name + ".xxh3").read_text().split()[1] == path.name


def test_bad_policy_values_are_refused():
    import engineflow as ef

    with pytest.raises(ef.RecipeError, match="keep at least 1"):
        ef.checkpoints(keep_last=0)
    with pytest.raises(ef.RecipeError, match=r"every_iterations=\.\.\.\) expects a whole number"):
        ef.checkpoints(every_iterations=0)


@pytest.mark.slow
def test_end_epoch_then_kill_then_resume_is_bit_identical(tmp_path):
    """EndEpoch shortens epochs, so epoch boundaries are no longer multiples of the epoch length."""
    recipe = tmp_path / "resumable.py"
    recipe.write_text(RECIPE)
    env = {"END_EPOCH_AT": "2,13"}
    ref_runs = tmp_path / "ref"
    proc = engineflow("run", str(recipe), "--runs-dir", str(ref_runs), "--checkpoint-every", "3", env=env,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for kill_at in ("8", "11", "16"):
        folder = tmp_path / f"kill-{kill_at}"
        folder.mkdir()
        resumed = trial(folder, recipe, 0, [{"KILL_AT": kill_at}], env=env)
        assert divergences(resumed, final_state(ref_runs)) == [], f"killed at {kill_at}"
        record = json.loads(next((folder / "runs").glob("*/*/run.json")).read_text())
        assert record["epochs"] == 4


@pytest.mark.slow
def test_keep_best_survives_a_resume_and_metrics_are_not_repeated(tmp_path):
    # mode="min" on accuracy: epoch 1 (the least accurate) stays the best, so its checkpoint must stay.
    recipe, runs = killed_run(
        tmp_path, RECIPE.replace('@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})',
                                 '@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()}, mode="min")')
        + "\ncheckpoints = ef.checkpoints(every_epochs=None, every_iterations=6, keep_last=1, keep_best=1)\n", 22)
    (state_dir,) = runs.glob("*/*/checkpoints/state")
    assert [p.name for p in sorted(state_dir.glob("state-*.pt"))] == ["state-000000008.pt", "state-000000018.pt"]
    resumed = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from checkpoint state-000000018.pt: epoch 3, batch 3 of 8" in resumed.stdout
    assert [p.name for p in sorted(state_dir.glob("state-*.pt"))] == ["state-000000008.pt", "state-000000030.pt"]
    lines = [json.loads(line) for line in (state_dir.parent.parent / "metrics.jsonl").read_text().splitlines()]
    keys = [(line["epoch"], line["name"]) for line in lines]
    assert len(keys) == len(set(keys)) and {e for e, _ in keys} == {1, 2, 3, 4}


def test_resume_refuses_settings_of_a_new_run(tmp_path):
    recipe = tmp_path / "resumable.py"
    recipe.write_text(RECIPE)
    proc = engineflow("run", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--resume", "last", "--retrain",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "--retrain is for starting a new one" in proc.stderr
    assert not (tmp_path / "runs" / "resumable").exists()


# The GAN recipe as it ships, plus a handler that SIGKILLs it once at iteration KILL_AT (as killed_run
# sets it); the reference run has the same code, so a resume is not refused as "other code".
GAN_RECIPE = (REPO / "recipes" / "gan.py").read_text() + '''

@ef.on(ef.Events.ITERATION_COMPLETED)
def _kill_once(state):
    import os
    import signal

    if state.iteration == int(os.environ.get("KILL_AT", "0")):
        marker = os.environ["KILL_MARKER"] + ".iteration"
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
'''
# 2048 samples in batches of 128: 16 iterations an epoch, 48 in all, a checkpoint every 6, the last at
# the very end; the kill at 27 (epoch 2, batch 11) loses the iterations since the checkpoint at 24.
GAN_OPTIONS = ("--device", "cpu", "--set", "epochs=3", "--set", "samples=2048", "--checkpoint-every", "6")
GAN_COMPONENTS = ("generator", "discriminator", "g_optimizer", "d_optimizer")


def flat(value, prefix: str = "") -> dict:
    """Every leaf of nested state dicts (an optimizer's ``state`` and ``param_groups``), by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}/").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): value}


def final_components(runs_dir: Path) -> dict:
    """Every entry of every component's state at the end of the only run under ``runs_dir``: the
    models from last.pt, and every component (optimizers included) from the last full-state checkpoint."""
    (run_json,) = runs_dir.glob("*/*/run.json")
    assert json.loads(run_json.read_text())["status"] == "completed"
    checkpoints = run_json.parent / "checkpoints"
    newest = sorted((checkpoints / "state").glob("state-*.pt"))[-1]
    assert newest.name == "state-000000048.pt", "the last checkpoint holds the state at the end of training"
    components = torch.load(newest, weights_only=True)["components"]
    assert set(GAN_COMPONENTS) <= components.keys()
    weights = torch.load(checkpoints / "last.pt", weights_only=True)["weights"]
    assert weights.keys() == {"generator", "discriminator"}
    return {**flat(components, "state/"), **flat(weights, "last.pt/")}


@pytest.mark.slow
def test_gan_killed_mid_epoch_resumes_both_models_and_optimizers_bit_identically(tmp_path):
    recipe, runs = killed_run(tmp_path, GAN_RECIPE, 27, *GAN_OPTIONS)
    resumed = engineflow("run", str(recipe), "--runs-dir", str(runs), "--resume", "last", *GAN_OPTIONS, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from checkpoint state-000000024.pt: epoch 2, batch 9 of 16" in resumed.stdout
    reference = tmp_path / "reference"
    unbroken = engineflow("run", str(recipe), "--runs-dir", str(reference), *GAN_OPTIONS, cwd=tmp_path)
    assert unbroken.returncode == 0, unbroken.stderr

    got, expected = final_components(runs), final_components(reference)
    assert got.keys() == expected.keys()
    for name in GAN_COMPONENTS:
        assert any(key.startswith(f"state/{name}/") and isinstance(v, torch.Tensor) for key, v in got.items()), name
    differ = [key for key, value in expected.items()
              if not (torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value)]
    assert differ == [], f"{len(differ)} entries differ after the resume, e.g. {differ[:5]}"
