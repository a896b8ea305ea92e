"""Checkpoint files: atomic writes, checksums, and loads that never run code from a file."""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from engineflow.data import TensorLoader
from engineflow.errors import RecipeError
from engineflow.state.checkpoint_files import (
    UnsafeCheckpointError,
    atomic_save,
    best_checkpoint,
    checkpoint_files,
    export_weights,
    load_latest,
    load_state,
    load_weights,
    prune,
    save_checkpoint,
    save_weights,
    verify,
)
from engineflow.state.rng import rng_state, set_rng_state
from tests.conftest import BASE_RECIPE

# Written by engineflow at commit 1ddb4e4, before loads were weights_only (see its README.md): a
# mid-epoch checkpoint with NumPy's RNG state as a uint32 array.
PREVIOUS_VERSION = Path(__file__).parents[1] / "fixtures" / "checkpoint-1ddb4e4" / "state-000000003.pt"


class RunsCode:
    """Unpickling this runs Python code that creates ``marker`` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_state(marker: Path) -> dict:
    """A plausible full state with code to run inside."""
    return {"format": 1, "components": {"model": torch.nn.Linear(4, 2).state_dict()}, "rng": RunsCode(marker)}


def checkpoint_pair(folder: Path, marker: Path) -> tuple[Path, Path]:
    """A genuine checkpoint, then a newer crafted one; both have a correct checksum (anyone can compute it)."""
    genuine = save_checkpoint(folder, "state-000000001.pt", {"format": 1, "best_checkpoints": {},
                                                            "best": {"mode": "max"}})
    crafted = save_checkpoint(folder, "state-000000002.pt", crafted_state(marker))
    assert verify(crafted) is None
    return genuine, crafted


def assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted checkpoint's code ran"
    message = str(err.value)
    assert str(path) in message and re.search(r"a reference to (builtins\.)?exec\b", message)
    assert "may have been crafted" in message and "Delete it" in message
    assert isinstance(err.value, RecipeError)  # the CLI reports it without a traceback, exit 2


def test_a_crafted_checkpoint_with_a_valid_checksum_is_refused_not_run_nor_skipped(tmp_path):
    marker = tmp_path / "code-ran"
    _, crafted = checkpoint_pair(tmp_path / "state", marker)
    warnings: list[str] = []
    with pytest.raises(UnsafeCheckpointError) as err:
        load_latest(tmp_path / "state", warnings.append)  # does not fall back to state-000000001.pt
    assert_refused(err, crafted, marker)
    assert err.value.path == crafted and warnings == []


@pytest.mark.parametrize("reader", ["best_checkpoint", "export_weights", "load_weights"])
def test_every_reader_refuses_a_crafted_file(tmp_path, reader):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "state"
    if reader == "best_checkpoint":
        # the newest checkpoint is genuine and names the crafted one as the best epoch's
        crafted = save_checkpoint(folder, "state-000000001.pt", crafted_state(marker))
        save_checkpoint(folder, "state-000000002.pt", {"best_checkpoints": {crafted.name: 1.0},
                                                       "best": {"mode": "max"}})
        call = lambda: best_checkpoint(folder, print)
    elif reader == "export_weights":
        crafted = save_checkpoint(folder, "state-000000001.pt", crafted_state(marker))
        call = lambda: export_weights(crafted, tmp_path / "best.pt", ["model"], {})
    else:
        crafted = tmp_path / "best.pt"
        atomic_save({"weights": {"model": {}}, "meta": RunsCode(marker)}, crafted)
        call = lambda: load_weights(crafted, {"model": torch.nn.Linear(4, 2)})
    with pytest.raises(UnsafeCheckpointError) as err:
        call()
    assert_refused(err, crafted, marker)
    assert not (tmp_path / "best.pt").exists() or reader == "load_weights"


def test_resume_stops_at_a_crafted_checkpoint_with_exit_2(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(BASE_RECIPE.replace(
        "    x, y = batch\n    loss",
        "    import os\n    if engine.state.iteration == int(os.environ.get('FAIL_AT', '0')):\n"
        "        raise RuntimeError('stopped')\n    x, y = batch\n    loss",
    ).replace("def train(batch, model, optimizer):", "def train(batch, model, optimizer, engine):"))
    monkeypatch.setenv("FAIL_AT", "5")
    assert cli("run", str(recipe), "--device", "cpu", "--checkpoint-every", "1").exit_code == 1
    (state_dir,) = (tmp_path / "runs").glob("*/*/checkpoints/state")
    newest = checkpoint_files(state_dir)[-1]
    marker = tmp_path / "code-ran"
    save_checkpoint(state_dir, newest.name, crafted_state(marker))  # replaced, with its checksum
    before = sorted(p.name for p in state_dir.iterdir())

    monkeypatch.delenv("FAIL_AT")
    resumed = cli("run", str(recipe), "--device", "cpu", "--checkpoint-every", "1", "--resume", "last")
    assert resumed.exit_code == 2, resumed.output
    assert not marker.exists()
    assert f"{newest} holds objects engineflow does not load" in resumed.output
    assert "Traceback" not in resumed.output
    assert sorted(p.name for p in state_dir.iterdir()) == before, "it trained on from an older checkpoint"


def test_a_checkpoint_of_the_previous_version_still_loads_and_restores(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    for name in (PREVIOUS_VERSION.name, PREVIOUS_VERSION.name + ".xxh3"):
        shutil.copy(PREVIOUS_VERSION.with_name(name), folder / name)
    allowed_before = torch.serialization.get_safe_globals()
    warnings: list[str] = []
    found = load_latest(folder, warnings.append)
    assert found is not None and warnings == []
    path, state = found
    assert path.name == PREVIOUS_VERSION.name and state["engine"]["iteration"] == 3
    assert set(torch.serialization.get_safe_globals()) == set(allowed_before), "widened during the load only"

    assert isinstance(state["rng"]["numpy"][1], np.ndarray)  # as the previous version saved it
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.get_state()[1], state["rng"]["numpy"][1])
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])

    components = state["components"]
    model = torch.nn.Linear(4, 2)
    model.load_state_dict(components["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    optimizer.load_state_dict(components["optimizer"])
    assert optimizer.state_dict()["state"][0]["exp_avg"].shape == (2, 4)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1).load_state_dict(components["scheduler"])
    loader = TensorLoader(torch.zeros(8, 4), batch_size=4, shuffle=True)
    loader.load_state_dict(components["loaders.train"])
    assert loader.state_dict() == {"seed": 1, "epoch": 1, "batch": 1}
    assert state["train_metrics"]["train/accuracy"] is not None and state["history"][0]["epoch"] == 1


def test_a_previous_version_checkpoint_written_with_numpy_1_loads(tmp_path):
    # NumPy 1 names the array-building function numpy.core..., NumPy 2 numpy._core...: the file keeps
    # the name of the NumPy that wrote it. (Re-saved first: the fixture's records have no CRC32,
    # which zipfile checks.)
    saved, other = tmp_path / "saved.pt", tmp_path / "state-000000003.pt"
    torch.save(load_state(PREVIOUS_VERSION), saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(other, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/data.pkl"):
                current, renamed = b"numpy._core.multiarray", b"numpy.core.multiarray"
                renaming = data.replace(current, renamed) if current in data else data.replace(renamed, current)
                assert renaming != data
                data = renaming
            target.writestr(item, data)
    state = load_state(other)
    assert np.array_equal(state["rng"]["numpy"][1], load_state(PREVIOUS_VERSION)["rng"]["numpy"][1])


def test_names_the_caller_allowed_stay_allowed_after_a_load():
    before = torch.serialization.get_safe_globals()
    assert np.ndarray not in before
    torch.serialization.add_safe_globals([np.ndarray])
    try:
        load_state(PREVIOUS_VERSION)  # it allows np.ndarray too, for the block only
        assert np.ndarray in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_new_checkpoints_load_without_allowing_any_type(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, "state-000000001.pt", {"rng": rng_state(), "model": model.state_dict(),
                                                            "optimizer": optimizer.state_dict()})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    plain = torch.load(path, weights_only=True)
    assert plain["rng"]["numpy"][0] == "MT19937" and isinstance(plain["rng"]["numpy"][1], list)


def test_a_component_state_that_would_not_load_back_stops_the_first_checkpoint(cli, write_recipe):
    recipe = write_recipe(BASE_RECIPE.replace("def setup(cfg):", '''class Tally:
    def __init__(self):
        self.n = 0

class Counter:
    def __init__(self):
        self.tally = Tally()
    def state_dict(self):
        return {"tally": self.tally}
    def load_state_dict(self, state):
        self.tally = state["tally"]

def setup(cfg):''').replace("return dict(model=model,", "return dict(counter=Counter(), model=model,"))
    result = cli("run", str(recipe), "--device", "cpu", "--checkpoint-every", "2")
    assert result.exit_code == 2, result.output
    assert "the checkpoint state-000000002.pt holds a reference to" in result.output
    assert "Tally, which engineflow does not load back" in result.output
    assert "epoch 2/2" not in result.output, "it stopped at the first checkpoint"


# Atomic writes and checksums ---------------------------------------------------------------------

def test_the_checksum_is_the_files_xxh3_and_verify_accepts_it(tmp_path):
    path = save_checkpoint(tmp_path, "state-000000007.pt", {"x": torch.arange(5)})
    digest, name = path.with_name(path.name + ".xxh3").read_text().split()
    assert name == path.name and digest == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert verify(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".xxh3"], "no temporary file left"
    assert torch.equal(load_state(path)["x"], torch.arange(5))


def test_verify_reports_a_changed_file_a_missing_checksum_and_reads_sha256(tmp_path):
    path = save_checkpoint(tmp_path, "state-000000001.pt", {"x": torch.arange(100)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify(path).startswith("checksum mismatch")
    path.with_name(path.name + ".xxh3").unlink()
    assert verify(path) == "no checksum beside it (the save did not finish)"
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    assert verify(path) is None


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "best.pt"
    save_weights(path, {"model": torch.nn.Linear(4, 2)}, {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling a lambda raises
        atomic_save({"meta": lambda: None}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    assert load_weights(path, {"model": torch.nn.Linear(4, 2)}) == {"epoch": 1}


def test_checkpoints_are_ordered_by_iteration_and_pruned_with_their_checksums(tmp_path):
    for iteration in (10, 9, 100):
        save_checkpoint(tmp_path, f"state-{iteration}.pt", {"iteration": iteration})
    (tmp_path / "state-9.pt.sha256").write_text("left by an earlier version\n")
    assert [p.name for p in checkpoint_files(tmp_path)] == ["state-9.pt", "state-10.pt", "state-100.pt"]
    prune(tmp_path, {tmp_path / "state-100.pt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-100.pt", "state-100.pt.xxh3"]
