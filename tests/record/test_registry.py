"""The run registry end to end: records, history semantics, test/eval, load_run, TensorBoard, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engineflow as ef
from tests.conftest import BASE_RECIPE, REPO

# BASE_RECIPE plus a test loader and an infer step: small enough to train in a second.
RECIPE = BASE_RECIPE.replace(
    '"valid": DataLoader(data, batch_size=cfg.batch_size)})',
    '"valid": DataLoader(data, batch_size=cfg.batch_size), "test": DataLoader(data, batch_size=5)})',
) + '''
SCALE = 1.0

@ef.infer_step
def predict(x, model):
    return model(x) * SCALE
'''


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture
def recipe(write_recipe):
    return write_recipe(RECIPE)


def test_two_runs_are_listed_with_config_and_metrics_and_compared(cli, recipe):
    assert cli("run", str(recipe), "--set", "lr=0.1").exit_code == 0
    assert cli("run", str(recipe), "--set", "lr=0.5", "--set", "epochs=3").exit_code == 0
    runs = as_json(cli("runs", "list", "--runs-dir", str(recipe.parent / "runs"), "--json"))
    assert [r["config"]["lr"] for r in runs] == [0.5, 0.1], "newest first"
    for run in runs:
        assert run["status"] == "completed" and run["experiment"] == "recipe"
        assert {"train/loss", "valid/accuracy"} <= set(run["metrics"])
        assert run["best"]["metric"] == "valid/accuracy" and run["best"]["epoch"] is not None
        assert run["code"]["fingerprint"] and run["code"]["git_commit"] is None and run["code"]["dirty"] is False
        assert run["started_at"] < run["ended_at"]
        assert Path(run["run_dir"], "run.json").is_file()
    runs_dir = str(recipe.parent / "runs")
    diff = as_json(cli("runs", "compare", runs[0]["id"], runs[1]["id"], "--runs-dir", runs_dir, "--json"))
    assert diff["config"] == {"epochs": [3, 2], "lr": [0.5, 0.1]}
    assert diff["metrics"]["valid/accuracy"] == [runs[0]["metrics"]["valid/accuracy"],
                                                 runs[1]["metrics"]["valid/accuracy"]]
    # the shortest prefix that tells the two apart (runs started in the same second share 16 chars)
    unique = next(n for n in range(1, len(runs[0]["id"]) + 1) if runs[0]["id"][:n] != runs[1]["id"][:n])
    text = cli("runs", "compare", runs[0]["id"][:unique], runs[1]["id"], "--runs-dir", runs_dir)
    assert text.exit_code == 0 and "lr" in text.output and "0.5" in text.output and "valid/accuracy" in text.output
    shown = as_json(cli("runs", "show", "last", "--runs-dir", runs_dir, "--json"))
    assert shown["id"] == runs[0]["id"] and [row["epoch"] for row in shown["history"]] == [1, 2, 3]
    (stage,) = shown["stages"]  # a run of one fit is one stage
    assert stage == {"name": "fit", "kind": "train", "status": "completed", "epochs": 3, "best": shown["best"],
                     "metrics": shown["metrics"]}
    listed = cli("runs", "list", "--runs-dir", runs_dir)
    assert runs[0]["id"] in listed.output and "completed" in listed.output
    # several runs at once (a sweep compares dozens): a column each, in the order named
    assert cli("run", str(recipe), "--set", "lr=0.2").exit_code == 0
    third = as_json(cli("runs", "show", "last", "--runs-dir", runs_dir, "--json"))
    many = as_json(cli("runs", "compare", runs[0]["id"], runs[1]["id"], third["id"], "--runs-dir", runs_dir, "--json"))
    assert many["runs"] == [runs[0]["id"], runs[1]["id"], third["id"]]
    assert many["config"] == {"epochs": [3, 2, 2], "lr": [0.5, 0.1, 0.2]}
    assert many["best"] == [runs[0]["best"], runs[1]["best"], third["best"]]
    table = cli("runs", "compare", runs[0]["id"], runs[1]["id"], third["id"], "--runs-dir", runs_dir).output
    assert third["id"] in table.splitlines()[1] and "0.2" in table
    alone = cli("runs", "compare", third["id"], "--runs-dir", runs_dir)
    assert alone.exit_code == 2 and "runs compare takes two runs or more" in alone.output


def test_same_code_and_config_refuses_then_force_and_retrain(cli, recipe):
    runs_dir = str(recipe.parent / "runs")
    assert cli("run", str(recipe)).exit_code == 0
    first = as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))[0]
    again = cli("run", str(recipe))
    assert again.exit_code == 2
    assert f"run {first['id']}" in again.output and "--force" in again.output and "--retrain" in again.output
    assert len(as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))) == 1
    assert cli("run", str(recipe), "--set", "lr=0.2").exit_code == 0, "another config is another run"
    assert cli("run", str(recipe), "--force").exit_code == 0
    runs = as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))
    forced = runs[0]
    assert len(runs) == 3 and forced["id"] != first["id"] and forced["config"] == first["config"]
    retrained = cli("run", str(recipe), "--retrain")
    assert retrained.exit_code == 0, retrained.output
    runs = {r["id"]: r for r in as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))}
    assert len(runs) == 3, "a retrain replaces a run, it does not add one"
    assert forced["id"] not in runs, "the latest of the twins was replaced"
    (new,) = [r for r in runs.values() if r["id"] not in (first["id"], forced["id"]) and r["config"] == first["config"]]
    assert new["status"] == "completed" and new["started_at"] > forced["ended_at"]
    assert runs[first["id"]]["started_at"] == first["started_at"], "the older twin is untouched"


def test_check_runs_do_not_block_a_real_run(cli, recipe):
    assert cli("run", str(recipe), "--check").exit_code == 0
    assert cli("run", str(recipe)).exit_code == 0


def test_test_command_stores_metrics_and_refuses_changed_code(cli, recipe):
    runs_dir = str(recipe.parent / "runs")
    assert cli("run", str(recipe)).exit_code == 0
    result = as_json(cli("test", str(recipe), "--runs-dir", runs_dir, "--json"))
    assert set(result["metrics"]) == {"test/accuracy"}
    shown = as_json(cli("runs", "show", result["run"], "--runs-dir", runs_dir, "--json"))
    assert shown["metrics"]["test/accuracy"] == result["metrics"]["test/accuracy"]

    recipe.write_text(recipe.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    refused = cli("test", str(recipe), "--runs-dir", runs_dir)
    assert refused.exit_code == 2 and "changed since run" in refused.output and result["run"] in refused.output
    assert "Traceback" not in refused.output
    assert cli("test", str(recipe), "--runs-dir", runs_dir, "--ignore-changes").exit_code == 0
    assert cli("test", str(recipe), "--runs-dir", runs_dir, "--run", result["run"]).exit_code == 0


def test_test_uses_the_latest_completed_run_not_a_check_run(cli, recipe):
    runs_dir = str(recipe.parent / "runs")
    assert cli("test", str(recipe), "--runs-dir", runs_dir).exit_code == 2
    assert cli("run", str(recipe)).exit_code == 0
    full = as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))[0]
    assert cli("run", str(recipe), "--check").exit_code == 0
    assert as_json(cli("test", str(recipe), "--runs-dir", runs_dir, "--json"))["run"] == full["id"]
    newest = as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))[0]
    assert as_json(cli("test", str(recipe), "--runs-dir", runs_dir, "--run", "last", "--json"))["run"] == newest["id"]


def test_eval_refuses_changed_code_and_ignore_changes_uses_todays_code(cli, recipe, tmp_path):
    runs_dir = str(recipe.parent / "runs")
    assert cli("run", str(recipe)).exit_code == 0
    sample = tmp_path / "x.npy"
    np.save(sample, np.ones(4, dtype=np.float32))
    out = tmp_path / "out.npy"
    assert cli("eval", str(recipe), str(sample), str(out), "--runs-dir", runs_dir).exit_code == 0
    before = np.load(out)
    recipe.write_text(recipe.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    refused = cli("eval", str(recipe), str(sample), str(tmp_path / "b.npy"), "--runs-dir", runs_dir)
    assert refused.exit_code == 2 and "changed since run" in refused.output
    assert not (tmp_path / "b.npy").exists()
    assert cli("eval", str(recipe), str(sample), str(out), "--runs-dir", runs_dir, "--ignore-changes").exit_code == 0
    np.testing.assert_allclose(np.load(out), 2 * before, rtol=1e-6)


def test_load_run_returns_the_old_codes_behaviour(cli, recipe):
    runs_dir = recipe.parent / "runs"
    assert cli("run", str(recipe)).exit_code == 0
    recipe.write_text(recipe.read_text().replace("SCALE = 1.0", "SCALE = 3.0"))
    past = ef.load_run("last", runs_dir=runs_dir)
    assert past.module.SCALE == 1.0, "the recipe comes from the run's snapshot, not today's file"
    assert past.config["lr"] == 0.1 and past.run_dir.is_dir()
    x = torch.ones(2, 4)
    out = past.recipe.steps["infer"].fn(x, past.model)
    torch.testing.assert_close(out, past.model(x))
    last = ef.load_run("last", runs_dir=runs_dir, which="last")
    best_meta = torch.load(past.run_dir / "checkpoints" / "best.pt", weights_only=True)["meta"]
    assert best_meta["epoch"] == past.record["best"]["epoch"]
    assert isinstance(last.model, torch.nn.Module)


def test_last_weights_are_written_at_the_end_and_read_from_the_newest_checkpoint_before(cli, write_recipe):
    """last.pt is written once, when the run ends; a run that failed (or was killed) has none, and
    ``which="last"`` then loads the newest full-state checkpoint: the last epoch that completed."""
    from engineflow.state.checkpoint_files import checkpoint_files

    fails_in_epoch_3 = BASE_RECIPE.replace("    return {\"loss\": loss}", """    if getattr(train, "epoch", 0) == 3:
        return {"loss": loss * float("nan")}
    return {"loss": loss}

@ef.on(ef.Events.EPOCH_STARTED)
def note_epoch(state):
    train.epoch = state.epoch""").replace("epochs=2", "epochs=4")
    recipe = write_recipe(fails_in_epoch_3)
    runs_dir = recipe.parent / "runs"
    assert cli("run", str(recipe)).exit_code == 1
    failed = ef.load_run("last", runs_dir=runs_dir, which="last")
    assert failed.record["status"] == "failed" and failed.record["epochs"] == 2
    assert "weights_last" not in failed.record["artifacts"]
    assert not (failed.run_dir / "checkpoints" / "last.pt").exists(), "NaN weights are not saved as 'last'"
    newest = checkpoint_files(failed.run_dir / "checkpoints" / "state")[-1]
    saved = torch.load(newest, weights_only=False)
    assert saved["engine"]["epochs_completed"] == 2
    for name, value in failed.model.state_dict().items():
        assert torch.equal(value, saved["components"]["model"][name])
        assert torch.isfinite(value).all()
    # best.pt is exported from the best epoch's checkpoint when the run ends, failed or not
    best = torch.load(failed.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert failed.record["artifacts"]["weights_best"] == "checkpoints/best.pt"
    assert best["meta"]["epoch"] == failed.record["best"]["epoch"]
    scores = saved["best_checkpoints"]
    (best_name,) = [name for name, value in scores.items() if value == failed.record["best"]["value"]][-1:]
    best_state = torch.load(failed.run_dir / "checkpoints" / "state" / best_name, weights_only=False)
    assert best_state["best"]["epoch"] == failed.record["best"]["epoch"]
    for name, value in best["weights"]["model"].items():
        assert torch.equal(value, best_state["components"]["model"][name])

    done = write_recipe(BASE_RECIPE, name="done.py")
    assert cli("run", str(done)).exit_code == 0
    completed = ef.load_run("last", runs_dir=runs_dir, experiment="done", which="last")
    last_file = torch.load(completed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert completed.record["artifacts"]["weights_last"] == "checkpoints/last.pt"
    assert last_file["meta"]["epoch"] == 2 and last_file["meta"]["status"] == "completed"
    final = torch.load(checkpoint_files(completed.run_dir / "checkpoints" / "state")[-1], weights_only=False)
    for name, value in completed.model.state_dict().items():
        assert torch.equal(value, final["components"]["model"][name]), "last.pt holds the final weights"


def test_tensorboard_event_files_match_the_store(cli, recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs_dir = str(recipe.parent / "runs")
    assert cli("run", str(recipe), "--set", "epochs=3").exit_code == 0
    shown = as_json(cli("runs", "show", "last", "--runs-dir", runs_dir, "--json"))
    events = EventAccumulator(str(Path(shown["run_dir"]) / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("train/loss", "valid/accuracy"):
        assert name in tags
        values = {e.step: e.value for e in events.Scalars(name)}
        expected = {row["epoch"]: row[name] for row in shown["history"]}
        assert values.keys() == expected.keys()
        for epoch, value in expected.items():
            assert values[epoch] == pytest.approx(value, rel=1e-6)
    hparams_dirs = list((Path(shown["run_dir"]) / "tb").glob("hparams*"))
    assert hparams_dirs, "hparams are written at the end"


def test_git_snapshot_records_commit_and_diff(cli, write_recipe, tmp_path):
    if shutil.which("git") is None:
        pytest.fail("git is needed on the machines this project targets")
    recipe = write_recipe(RECIPE)
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / ".gitignore").write_text("runs/\n")
    subprocess.run([*git, "add", "recipe.py", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "recipe"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert cli("run", str(recipe)).exit_code == 0
    recipe.write_text(recipe.read_text().replace("SCALE = 1.0", "SCALE = 5.0"))
    (tmp_path / "helper_mod.py").write_text("OFFSET = 1\n")
    recipe.write_text("from helper_mod import OFFSET\n" + recipe.read_text())
    assert cli("run", str(recipe)).exit_code == 0
    runs = as_json(cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json"))
    dirty, clean = runs
    assert clean["code"]["git_commit"] == commit and clean["code"]["dirty"] is False
    assert dirty["code"]["git_commit"] == commit and dirty["code"]["dirty"] is True
    assert dirty["code"]["files"] == ["recipe.py", "helper_mod.py"]
    code = Path(dirty["run_dir"]) / "code"
    patch = (code / "diff.patch").read_text()
    assert "+SCALE = 5.0" in patch and "untracked, copied in files/: helper_mod.py" in patch
    assert (code / "files" / "helper_mod.py").read_text() == "OFFSET = 1\n"
    assert not (Path(clean["run_dir"]) / "code" / "diff.patch").exists()


def test_reindex_after_deleting_the_database_restores_every_run(cli, recipe):
    runs_dir = recipe.parent / "runs"
    for lr in ("0.1", "0.3"):
        assert cli("run", str(recipe), "--set", f"lr={lr}").exit_code == 0
    failing = recipe.parent / "broken.py"
    failing.write_text(RECIPE.replace('return {"loss": loss}', "return 1.0"))
    assert cli("run", str(failing)).exit_code == 2
    before = as_json(cli("runs", "list", "--runs-dir", str(runs_dir), "--json"))
    shows = [as_json(cli("runs", "show", r["id"], "--runs-dir", str(runs_dir), "--json")) for r in before]
    (runs_dir / "engineflow.db").unlink()
    for extra in runs_dir.glob("engineflow.db-*"):
        extra.unlink()
    result = cli("runs", "reindex", "--runs-dir", str(runs_dir))
    assert result.exit_code == 0 and "indexed 3 runs" in result.output
    assert as_json(cli("runs", "list", "--runs-dir", str(runs_dir), "--json")) == before
    assert [as_json(cli("runs", "show", r["id"], "--runs-dir", str(runs_dir), "--json")) for r in before] == shows
    assert {r["status"] for r in before} == {"completed", "failed"}


def test_a_corrupt_store_is_a_clear_error(cli, tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "engineflow.db").write_bytes(os.urandom(4096))
    result = cli("runs", "list", "--runs-dir", str(runs_dir))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "engineflow.db" in result.output and "reindex" in result.output


SLOW_RECIPE = RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(epochs=1000,").replace(
    "    x, y = batch\n    loss = F.cross_entropy",
    "    import time; time.sleep(0.02)\n    x, y = batch\n    loss = F.cross_entropy",
)


def start_run(recipe: Path, runs_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engineflow", "run", str(recipe), "--runs-dir", str(runs_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(runs_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_json in runs_dir.glob("*/*/run.json"):
            try:
                record = json.loads(run_json.read_text())
            except json.JSONDecodeError:
                continue
            if record.get("epochs", 0) >= n:
                return record
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run did not reach its epochs in time")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_sigint_and_sigterm_mark_the_run_interrupted(write_recipe, tmp_path, sig, code):
    recipe = write_recipe(SLOW_RECIPE)
    runs_dir = tmp_path / "runs"
    proc = start_run(recipe, runs_dir)
    wait_for_epochs(runs_dir, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    (run_json,) = runs_dir.glob("*/*/run.json")
    record = json.loads(run_json.read_text())
    assert record["status"] == "interrupted" and record["ended_at"]
    from engineflow.record.runs import list_runs

    assert list_runs(runs_dir)[0]["status"] == "interrupted"


def test_sigkill_leaves_a_store_that_lists_the_run_as_interrupted(write_recipe, tmp_path, cli):
    recipe = write_recipe(SLOW_RECIPE)
    runs_dir = tmp_path / "runs"
    proc = start_run(recipe, runs_dir)
    record = wait_for_epochs(runs_dir, 2, proc)  # epoch 1's checkpoint is on disk before epoch 2 starts
    proc.kill()
    proc.wait(timeout=30)
    runs = as_json(cli("runs", "list", "--runs-dir", str(runs_dir), "--json"))
    assert [r["id"] for r in runs] == [record["id"]]
    assert runs[0]["status"] == "interrupted"
    on_disk = json.loads((Path(record["run_dir"]) / "run.json").read_text())
    assert on_disk["status"] == "interrupted", "the folder agrees with the store"
    # No weights files yet (they are written when a run ends): both come from its checkpoints.
    from engineflow.state.checkpoint_files import checkpoint_files

    folder = Path(record["run_dir"]) / "checkpoints"
    assert not (folder / "best.pt").exists()
    states = {p.name: torch.load(p, weights_only=False) for p in checkpoint_files(folder / "state")}
    newest = states[max(states)]
    best_name = max(newest["best_checkpoints"], key=newest["best_checkpoints"].get)  # mode "max": accuracy
    for which, expected in (("last", newest), ("best", states[best_name])):
        model = ef.load_run(record["id"], runs_dir=runs_dir, which=which).model
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected["components"]["model"][name]), which


def digits_images(folder: Path, split) -> list[int]:
    folder.mkdir()
    labels = []
    for i, (x, y) in enumerate(split):
        np.save(folder / f"{i:04d}.npy", (x * 16.0).reshape(8, 8).numpy())
        labels.append(int(y))
    return labels


@pytest.mark.slow
def test_eval_on_a_folder_of_digit_images_agrees_with_test(cli, tmp_path):
    recipe = tmp_path / "digits.py"
    shutil.copy(REPO / "recipes" / "digits.py", recipe)
    runs_dir = str(tmp_path / "runs")
    assert cli("run", str(recipe), "--set", "epochs=5").exit_code == 0
    tested = as_json(cli("test", str(recipe), "--runs-dir", runs_dir, "--json"))
    split = ef.load_recipe(recipe).module.load_splits(0)["test"]
    labels = digits_images(tmp_path / "images", split)
    out = tmp_path / "preds.npy"
    result = cli("eval", str(recipe), str(tmp_path / "images"), str(out), "--runs-dir", runs_dir, "--batch-size", "50")
    assert result.exit_code == 0, result.output
    predicted = np.load(out).argmax(-1)
    assert len(predicted) == len(labels) == len(split)
    accuracy = float((predicted == np.array(labels)).mean())
    assert accuracy == pytest.approx(tested["metrics"]["test/accuracy"], abs=1e-9)
    csv_out = tmp_path / "preds.csv"
    assert cli("eval", str(recipe), str(tmp_path / "images"), str(csv_out), "--runs-dir", runs_dir).exit_code == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("file,y0") and lines[1].startswith("0000.npy,") and len(lines) == len(labels) + 1

    # bad inputs: one clear error each, exit 2, no OUTPUT left behind
    bad = tmp_path / "bad.npy"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "small.npy", np.zeros((7, 7)))
    cases = {
        str(tmp_path / "missing"): "input not found",
        str(tmp_path / "broken"): "cannot read input",
        str(tmp_path / "small.npy"): "expected 8x8 = 64 pixel values",
    }
    for source, message in cases.items():
        failed = cli("eval", str(recipe), source, str(bad), "--runs-dir", runs_dir)
        assert failed.exit_code == 2 and message in failed.output and "Traceback" not in failed.output, failed.output
        assert not bad.exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.slow
def test_four_runs_at_once_on_one_store_all_complete(write_recipe, tmp_path):
    recipe = write_recipe(RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(epochs=15,"))
    runs_dir = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-m", "engineflow", "run", str(recipe), "--runs-dir", str(runs_dir),
                               "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(4)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err + out
    from engineflow.record.runs import get_run, list_runs

    runs = list_runs(runs_dir)
    assert sorted(r["seed"] for r in runs) == [0, 1, 2, 3]
    assert {r["status"] for r in runs} == {"completed"}
    for run in runs:
        assert [row["epoch"] for row in get_run(runs_dir, run["id"])["history"]] == list(range(1, 16))


def test_runs_plot_draws_a_png(cli, recipe, tmp_path):
    runs_dir = str(recipe.parent / "runs")
    assert cli("run", str(recipe), "--set", "epochs=3").exit_code == 0
    assert cli("run", str(recipe), "--set", "epochs=4").exit_code == 0
    out = tmp_path / "curves.png"
    result = cli("runs", "plot", "last", as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))[1]["id"],
                 "--out", str(out), "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_runs_plot_without_matplotlib_says_what_to_install(cli, recipe, tmp_path, monkeypatch):
    assert cli("run", str(recipe)).exit_code == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = cli("runs", "plot", "last", "--out", str(tmp_path / "x.png"), "--runs-dir", str(recipe.parent / "runs"))
    assert result.exit_code == 2 and "pip install 'engineflow[plot]'" in result.output


def test_runs_of_the_previous_version_list_show_load_and_resume(cli, tmp_path):
    import shutil

    import engineflow as ef
    from tests.conftest import REPO

    fixture = REPO / "tests" / "fixtures" / "runs-1ddb4e4"
    shutil.copytree(fixture, tmp_path, dirs_exist_ok=True)
    runs_dir, recipe = str(tmp_path / "runs"), str(tmp_path / "recipe.py")
    listed = as_json(cli("runs", "list", "--runs-dir", runs_dir, "--json"))
    assert sorted(r["status"] for r in listed) == ["completed", "completed", "interrupted"]  # the killed one
    killed = next(r for r in listed if r["status"] == "interrupted")
    assert all(Path(r["run_dir"]).parent.parent == (tmp_path / "runs").resolve() for r in listed)
    shown = as_json(cli("runs", "show", killed["id"], "--runs-dir", runs_dir, "--json"))
    assert shown["history"] and shown["stages"][0]["name"] == "fit"

    # their code snapshots have no digests: importing one needs the opt-in
    done = [r for r in listed if r["status"] == "completed"]
    past = ef.load_run(done[0]["id"], runs_dir=runs_dir, trust_code=True)
    assert set(past.components) >= {"model", "optimizer", "loaders"}
    tested = as_json(cli("test", recipe, "--run", done[0]["id"], "--runs-dir", runs_dir, "--json", "--trust-code"))
    assert set(tested["metrics"]) == {"test/accuracy"}

    resumed = cli("run", recipe, "--resume", killed["id"], "--runs-dir", runs_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "from checkpoint state-" in resumed.output
    after = as_json(cli("runs", "show", killed["id"], "--runs-dir", runs_dir, "--json"))
    assert after["status"] == "completed" and after["epochs"] == 400
