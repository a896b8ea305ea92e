"""The bundled recipes, trained for real through the installed command in a subprocess."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import engineflow as ef
from tests.conftest import REPO, read_run, run_engineflow

pytestmark = pytest.mark.slow


def test_digits_reaches_95_percent_validation_accuracy_in_bf16(tmp_path):
    proc = run_engineflow("run", str(REPO / "recipes" / "digits.py"), "--runs-dir", str(tmp_path), "--device", "cpu",
                          "--precision", "bf16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_run(tmp_path)
    assert summary["precision"] == "bf16" and summary["step_options"]["fit"]["precision"] == "bf16"
    assert summary["status"] == "completed" and summary["epochs"] == 20
    assert summary["best"]["metric"] == "valid/accuracy"
    assert summary["best"]["value"] >= 0.95
    assert summary["metrics"]["valid/accuracy"] >= 0.95, "the last epoch too, not only a lucky one"
    assert "best epoch" in proc.stdout
    # not a terminal: plain lines, no progress-bar control characters
    assert "\r" not in proc.stdout and "epoch 20/20" in proc.stdout
    # the model summary the README shows ("Seeing the model") is digits'
    section = (REPO / "README.md").read_text().split("### Seeing the model", 1)[1]
    assert re.search(r"```\n\s*(model: .*)\n", section).group(1) == proc.stdout.splitlines()[1]


def test_sine_regression_fits_with_the_default_step(tmp_path):
    proc = run_engineflow("run", str(REPO / "recipes" / "sine.py"), "--runs-dir", str(tmp_path), "--device", "cpu",
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_run(tmp_path)
    assert summary["best"]["metric"] == "valid/mse" and summary["best"]["mode"] == "min"
    assert summary["best"]["value"] < 0.01
    assert summary["history"][0]["valid/mse"] > summary["best"]["value"]


@pytest.fixture
def keep_torch_threads():
    """The GAN recipe's setup() sets torch's thread count; keep this process's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gan_covers_every_mode_and_loads_with_both_models(tmp_path, keep_torch_threads):
    recipe = REPO / "recipes" / "gan.py"
    proc = run_engineflow("run", str(recipe), "--runs-dir", str(tmp_path), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = read_run(tmp_path)
    assert summary["status"] == "completed" and summary["epochs"] == 20
    assert summary["best"]["metric"] == "valid/mmd" and summary["best"]["mode"] == "min"
    # The threshold the recipe's docstring states; an untrained generator scores about 1.
    assert summary["best"]["value"] < 0.12
    best = summary["history"][summary["best"]["epoch"] - 1]
    assert best["valid/modes"] == 8 and best["valid/quality"] >= 0.7
    assert summary["history"][0]["valid/mmd"] > 2 * summary["best"]["value"], "learned, not started there"
    # metrics.jsonl: each of the two losses, every epoch, and no plain "loss"
    assert len(summary["history"]) == 20
    for row in summary["history"]:
        assert {"train/g_loss", "train/d_loss"} <= row.keys() and "train/loss" not in row
        assert math.isfinite(row["train/g_loss"]) and math.isfinite(row["train/d_loss"])

    past = ef.load_run("last", runs_dir=tmp_path)
    assert past.model is None
    best_weights = torch.load(past.run_dir / "checkpoints" / "best.pt", weights_only=True)["weights"]
    assert best_weights.keys() == {"generator", "discriminator"}
    for name in ("generator", "discriminator"):
        loaded = past.components[name].state_dict()
        assert loaded.keys() == best_weights[name].keys()
        assert all(torch.equal(loaded[key], best_weights[name][key]) for key in loaded), name
    real, noise = past.components["loaders"]["valid"].tensors
    with torch.no_grad():
        points = past.components["generator"](noise)
    assert past.module.mmd(points, real) == pytest.approx(summary["best"]["value"], rel=1e-6)

    tested = run_engineflow("test", str(recipe), "--runs-dir", str(tmp_path), "--json", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    metrics = json.loads(tested.stdout)["metrics"]
    assert metrics.keys() == {"test/mmd", "test/modes", "test/quality"}
    assert metrics["test/mmd"] < 0.2 and metrics["test/modes"] == 8


def test_pretraining_beats_the_same_classifier_from_scratch_and_every_stage_is_recorded(tmp_path):
    recipe = REPO / "recipes" / "pretrain_finetune.py"
    pretrained = run_engineflow("run", str(recipe), "--runs-dir", str(tmp_path / "pre"), "--device", "cpu",
                                cwd=tmp_path)
    assert pretrained.returncode == 0, pretrained.stderr
    scratch = run_engineflow("run", str(recipe), "--runs-dir", str(tmp_path / "scratch"), "--device", "cpu",
                             "--set", "pretrained=false", "--set", "pretrain_epochs=1", cwd=tmp_path)
    assert scratch.returncode == 0, scratch.stderr
    pre, base = read_run(tmp_path / "pre"), read_run(tmp_path / "scratch")
    assert pre["best"]["metric"] == base["best"]["metric"] == "finetune/valid/accuracy"
    # seed 0 with the recipe's defaults; python -m benchmarks.pretraining measures seeds 0-4
    assert pre["best"]["value"] > base["best"]["value"] + 0.02, (pre["best"], base["best"])
    assert pre["metrics"]["test/test/accuracy"] > base["metrics"]["test/test/accuracy"]
    assert [(s["name"], s["kind"], s["status"], s["epochs"]) for s in pre["stages"]] == [
        ("pretrain", "train", "completed", 50), ("frozen", "train", "completed", 50),
        ("finetune", "train", "completed", 100), ("test", "test", "completed", 0),
        ("predict", "infer", "completed", 0)]
    assert pre["stages"][0]["best"]["metric"] == "pretrain/valid/mse"
    assert pre["stages"][1]["best"]["metric"] == "frozen/valid/accuracy"
    predictions = torch.load(Path(pre["run_dir"]) / "predictions" / "predict" / "test.pt", weights_only=True)
    assert predictions.shape == (271,)

    past = ef.load_run("last", runs_dir=tmp_path / "pre")
    assert {"encoder", "decoder", "head", "optimizer"} <= past.components.keys()  # the head a stage added
    tested = run_engineflow("test", str(recipe), "--runs-dir", str(tmp_path / "pre"), "--json", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    # best.pt holds the finetune stage's best epoch; the test pass above used the last epoch's weights
    assert json.loads(tested.stdout)["metrics"]["test/accuracy"] > 0.75


@pytest.mark.parametrize("recipe", ["digits.py", "sine.py", "gan.py", "pretrain_finetune.py"])
def test_bundled_recipes_pass_check(recipe, cli, keep_torch_threads):
    result = cli("run", str(REPO / "recipes" / recipe), "--check")
    assert result.exit_code == 0, result.output
    assert "completed 2 epochs" in result.output or "completed 6 epochs" in result.output
