"""Loading a past run's weights: from the newest checkpoint that is intact, with a line saying so when
that is not the newest."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.state.checkpoint_files import checkpoint_files
from tests.conftest import BASE_RECIPE

# BASE_RECIPE with a local helper module, a test loader and an infer step; 3 epochs, each one's
# checkpoint kept.
RECIPE = "import trusthelper\n" + BASE_RECIPE.replace(
    '"valid": DataLoader(data, batch_size=cfg.batch_size)})',
    '"valid": DataLoader(data, batch_size=cfg.batch_size), "test": DataLoader(data, batch_size=5)})',
).replace("epochs=2", "epochs=3") + '''
checkpoints = ef.checkpoints(keep_last=3)

@ef.infer_step
def predict(x, model):
    return model(x) * trusthelper.SCALE
'''

# A line that leaves a mark when the file it is appended to is imported.
MARK = "\nimport pathlib as _p, os as _o\n_p.Path(_o.environ['ENGINEFLOW_TEST_MARKER']).write_text('ran')\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One completed run of RECIPE, recorded by this user: (recipe, runs folder, run id)."""
    folder = tmp_path_factory.mktemp("made")
    (folder / "trusthelper.py").write_text("SCALE = 1.0\n")
    recipe = folder / "recipe.py"
    recipe.write_text(RECIPE)
    result = ef.run(recipe, runs_dir=folder / "runs", device="cpu", stream=io.StringIO(), progress=False)
    assert result.status == "completed"
    return recipe, folder / "runs", result.run_id


@pytest.fixture
def run(made, tmp_path, monkeypatch):
    """A copy of the made runs folder for one test: (recipe, runs folder, run id, run folder, marker)."""
    recipe, runs, run_id = made
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    marker = tmp_path / "marker"
    monkeypatch.setenv("ENGINEFLOW_TEST_MARKER", str(marker))
    sys.modules.pop("trusthelper", None)  # each load imports the helper from its own snapshot
    return recipe, copy, run_id, copy / "recipe" / run_id, marker


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- item 16: which checkpoint the weights come from -----------------------------------------------------------

def without_weights_files(run_dir: Path) -> list[Path]:
    """The run as a killed run leaves it (no best.pt, last.pt): its checkpoints, oldest first."""
    for name in ("best.pt", "last.pt"):
        (run_dir / "checkpoints" / name).unlink()
    files = checkpoint_files(run_dir / "checkpoints" / "state")
    assert len(files) >= 2
    return files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_last_weights_from_an_older_checkpoint_are_announced(run, capsys):
    _, runs, run_id, run_dir, _ = run
    files = without_weights_files(run_dir)
    truncate(files[-1])
    capsys.readouterr()
    past = ef.load_run(run_id, runs_dir=runs, which="last")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert files[-1].name in line and "checksum mismatch" in line and files[-2].name in line
    saved = torch.load(files[-2], weights_only=False)["components"]["model"]
    for name, value in past.model.state_dict().items():
        assert torch.equal(value, saved[name])


def test_test_says_which_damaged_checkpoint_it_skipped(run, cli):
    recipe, runs, run_id, run_dir, _ = run
    files = without_weights_files(run_dir)
    truncate(files[-1])
    done = cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs), "--json")
    assert done.exit_code == 0, done.output
    assert files[-1].name in done.stderr and "damaged" in done.stderr
    assert as_json(done)["run"] == run_id


@pytest.mark.parametrize("which", ["last", "best"])
def test_when_every_checkpoint_is_damaged_the_error_says_so(run, cli, which):
    recipe, runs, run_id, run_dir, _ = run
    files = without_weights_files(run_dir)
    for path in files:
        truncate(path)
    with pytest.raises(RecipeError, match="damaged") as refused:
        ef.load_run(run_id, runs_dir=runs, which=which)
    assert all(path.name in str(refused.value) for path in files)
    assert "before its first epoch" not in str(refused.value)
    if which == "best":
        done = cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs))
        assert done.exit_code == 2 and "damaged" in done.stderr and files[-1].name in done.stderr
