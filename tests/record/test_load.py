"""Loading a past run: its code snapshot is checked before anything imports it, and its weights come
from the newest checkpoint that is intact, with a line saying so when that is not the newest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import py_compile
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.record import trust
from engineflow.record.runs import reindex
from engineflow.state.checkpoint_files import checkpoint_files
from tests.conftest import BASE_RECIPE, REPO

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


# -- item 11: the code snapshot is checked before it is imported ----------------------------------------------

def test_a_run_records_a_signed_digest_of_every_snapshot_file_and_loads_with_no_flag(run):
    _, runs, run_id, run_dir, _ = run
    code = json.loads((run_dir / "run.json").read_text())["code"]
    assert code["digests"]["algorithm"] == "sha256"
    on_disk = sorted(p.relative_to(run_dir / "code").as_posix() for p in (run_dir / "code").rglob("*") if p.is_file())
    assert sorted(code["digests"]["files"]) == on_disk
    assert {"files/recipe.py", "files/trusthelper.py", "git.json"} <= set(on_disk)
    for name, digest in code["digests"]["files"].items():
        assert hashlib.sha256((run_dir / "code" / name).read_bytes()).hexdigest() == digest
    assert code["signature"]["algorithm"] == "hmac-sha256" and len(code["signature"]["value"]) == 64
    past = ef.load_run(run_id, runs_dir=runs)
    assert past.module.trusthelper.SCALE == 1.0
    assert Path(past.module.trusthelper.__file__).is_relative_to(run_dir / "code"), "the snapshot's helper"
    again = ef.load_run(run_id, runs_dir=runs)  # loading writes nothing into the snapshot
    assert again.record["id"] == run_id
    assert not list((run_dir / "code").rglob("__pycache__"))


def craft_pyc(run_dir: Path) -> Path:
    """A compiled helper beside the snapshot's source that Python would use without checking it."""
    evil = run_dir.parent / "evil.py"
    evil.write_text("SCALE = 1.0" + MARK)
    target = run_dir / "code" / "files" / "__pycache__" / f"trusthelper.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(evil), cfile=str(target), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil.unlink()
    return target


def append(run_dir: Path) -> Path:
    path = run_dir / "code" / "files" / "recipe.py"
    path.write_text(path.read_text() + MARK)
    return path


def add(run_dir: Path) -> Path:
    path = run_dir / "code" / "files" / "extra.py"
    path.write_text(MARK)
    return path


def remove(run_dir: Path) -> Path:
    path = run_dir / "code" / "files" / "trusthelper.py"
    path.unlink()
    return path


def link(run_dir: Path) -> Path:
    """The helper replaced by a link to a file of the same content elsewhere (that can change later)."""
    path = run_dir / "code" / "files" / "trusthelper.py"
    elsewhere = run_dir.parent / "elsewhere.py"
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)
    return path


@pytest.mark.parametrize(("damage", "what"), [(append, "differs from"), (add, "was not recorded"),
                                              (remove, "is missing"), (craft_pyc, "was not recorded"),
                                              (link, "is a symbolic link")])
def test_a_changed_snapshot_is_refused_naming_the_file_and_nothing_of_it_runs(run, cli, damage, what):
    recipe, runs, run_id, run_dir, marker = run
    path = damage(run_dir)
    with pytest.raises(RecipeError, match=what) as refused:
        ef.load_run(run_id, runs_dir=runs)
    assert str(path) in str(refused.value) and "nothing was imported" in str(refused.value)
    with pytest.raises(RecipeError, match=what):
        ef.load_run(run_id, runs_dir=runs, trust_code=True)  # trusting its author does not make it theirs
    for command in (["test", str(recipe)], ["eval", str(recipe), str(make_input(run_dir)), str(run_dir / "out.npy")]):
        done = cli(*command, "--run", run_id, "--runs-dir", str(runs))
        assert done.exit_code == 2, done.output
        assert str(path) in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.output
    assert not marker.exists(), "nothing of the changed snapshot ran"
    assert not (run_dir / "out.npy").exists()


def make_input(run_dir: Path) -> Path:
    sample = run_dir.parent / "x.pt"
    torch.save(torch.ones(4), sample)
    return sample


def test_a_run_signed_with_another_users_key_needs_trust_code(run, cli, monkeypatch, tmp_path):
    recipe, runs, run_id, run_dir, _ = run
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "another-user"))  # copied in: another key
    with pytest.raises(RecipeError, match=r"trust_code=True") as refused:
        ef.load_run(run_id, runs_dir=runs)
    assert "not signed with your key" in str(refused.value) and "engineflow runs trust" in str(refused.value)
    for command in (["test", str(recipe)], ["eval", str(recipe), str(make_input(run_dir)), str(run_dir / "out.npy")]):
        done = cli(*command, "--run", run_id, "--runs-dir", str(runs))
        assert done.exit_code == 2 and "--trust-code" in done.stderr, done.output
        assert cli(*command, "--run", run_id, "--runs-dir", str(runs), "--trust-code").exit_code == 0
    assert ef.load_run(run_id, runs_dir=runs, trust_code=True).module.trusthelper.SCALE == 1.0


def test_a_run_recorded_without_a_signature_needs_trust_code(run):
    _, runs, run_id, run_dir, _ = run
    record = json.loads((run_dir / "run.json").read_text())
    del record["code"]["signature"]
    (run_dir / "run.json").write_text(json.dumps(record))
    reindex(runs)  # the index takes run.json as it now is
    with pytest.raises(RecipeError, match="has no signature"):
        ef.load_run(run_id, runs_dir=runs)
    assert ef.load_run(run_id, runs_dir=runs, trust_code=True).record["id"] == run_id


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving files away needs root")
def test_a_run_folder_of_another_owner_needs_trust_code(run, cli):
    recipe, runs, run_id, run_dir, _ = run
    for path in [run_dir, *run_dir.rglob("*")]:
        os.lchown(path, 65534, 65534)
    with pytest.raises(RecipeError, match="uid 65534") as refused:
        ef.load_run(run_id, runs_dir=runs)
    assert "trust_code=True" in str(refused.value)
    done = cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs))
    assert done.exit_code == 2 and "--trust-code" in done.stderr
    assert cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs), "--trust-code").exit_code == 0
    refused_trust = cli("runs", "trust", run_id, "--runs-dir", str(runs))
    assert refused_trust.exit_code == 2 and "uid 65534" in refused_trust.stderr


def test_runs_trust_signs_the_snapshot_as_it_is_now(run, cli, monkeypatch, tmp_path):
    _, runs, run_id, run_dir, marker = run
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "another-user"))
    done = cli("runs", "trust", run_id, "--runs-dir", str(runs))
    assert done.exit_code == 0, done.output
    assert run_id in done.stdout and str(tmp_path / "another-user" / "engineflow" / "key") in done.stdout
    assert ef.load_run(run_id, runs_dir=runs).record["id"] == run_id, "signed with this user's key now"
    append(run_dir)  # a change the user makes and reviews on purpose
    with pytest.raises(RecipeError, match="differs from"):
        ef.load_run(run_id, runs_dir=runs)
    assert cli("runs", "trust", run_id, "--runs-dir", str(runs)).exit_code == 0
    ef.load_run(run_id, runs_dir=runs)
    assert marker.read_text() == "ran", "the snapshot as it is now is what loads"


def test_the_key_is_made_once_readable_by_its_user_alone(tmp_path, monkeypatch):
    assert not trust.key_path().is_relative_to(Path.home()), "tests never touch the real user's key"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = trust.key_path()
    assert path == tmp_path / "data" / "engineflow" / "key"
    first = trust.user_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 32
    assert trust.user_key() == first
    path.chmod(0o644)
    with pytest.raises(RecipeError, match="chmod 600"):
        trust.user_key()


def test_runs_of_an_earlier_version_need_trust_code_to_load_their_code(cli, tmp_path):
    shutil.copytree(REPO / "tests" / "fixtures" / "runs-1ddb4e4", tmp_path, dirs_exist_ok=True)
    runs, recipe = tmp_path / "runs", tmp_path / "recipe.py"
    run_id = next(r["id"] for r in as_json(cli("runs", "list", "--runs-dir", str(runs), "--json"))
                  if r["status"] == "completed")
    with pytest.raises(RecipeError, match="earlier engineflow version"):
        ef.load_run(run_id, runs_dir=runs)
    done = cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs))
    assert done.exit_code == 2 and "--trust-code" in done.stderr
    assert ef.load_run(run_id, runs_dir=runs, trust_code=True).record["id"] == run_id
    assert cli("runs", "trust", run_id, "--runs-dir", str(runs)).exit_code == 0
    assert ef.load_run(run_id, runs_dir=runs).record["id"] == run_id, "signed once, it loads with no flag"


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
    files = without_weights_files(run_dir)  # one checkpoint per epoch, the best one among them
    best = files[json.loads((run_dir / "run.json").read_text())["best"]["epoch"] - 1]
    truncate(best)
    done = cli("test", str(recipe), "--run", run_id, "--runs-dir", str(runs), "--json")
    assert done.exit_code == 0, done.output
    assert best.name in done.stderr and "damaged" in done.stderr
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


FROZEN = BASE_RECIPE.replace("model = torch.nn.Linear(4, 2)",
                             "model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))") + '''
@ef.on(ef.Events.STARTED)
def freeze_the_first_layer(model):
    model[0].requires_grad_(False)  # frozen by a handler: setup() alone builds it trainable
'''


@pytest.mark.parametrize("which", ["best", "last"])
def test_a_loaded_run_trains_the_parameters_it_ended_training(tmp_path, which):
    """ef.load_run gives the modules with the requires_grad flags the run ended with, from last.pt, or
    from the newest checkpoint of a run that has no last.pt (killed)."""
    recipe = tmp_path / "frozen.py"
    recipe.write_text(FROZEN)
    result = ef.run(recipe, runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO(), progress=False)
    past = ef.load_run(result.run_id, runs_dir=tmp_path / "runs", which=which)
    assert [p.requires_grad for p in past.model.parameters()] == [False, False, True, True]
    assert torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)["requires_grad"] == {
        "model": [False, False, True, True]}
    (result.run_dir / "checkpoints" / "last.pt").unlink()  # as a killed run has none
    past = ef.load_run(result.run_id, runs_dir=tmp_path / "runs", which=which)
    assert [p.requires_grad for p in past.model.parameters()] == [False, False, True, True]
