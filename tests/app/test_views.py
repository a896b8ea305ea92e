"""``engineflow runs plot RUN --activations``: the activation statistics of a recorded run, drawn."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

import engineflow as ef
from tests.conftest import BASE_RECIPE, invoke_cli, read_tensorboard

# Two train stages of one epoch (3 iterations each) through a Linear then a ReLU.
STAGED = BASE_RECIPE.replace("config = ef.config(epochs=2,", "config = ef.config(").replace(
    "model = torch.nn.Linear(4, 2)", "model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())") + '''
stages = [ef.stage("one", train=train, eval=evaluate, epochs=1), ef.stage("two", train=train, eval=evaluate, epochs=1)]
stats = ef.hooks.activation_stats(every=2, bins=8, range=(-2.0, 2.0))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A runs folder with a run that recorded activation statistics and one that did not."""
    folder = tmp_path_factory.mktemp("views")
    paths = []
    for name, source in (("staged.py", STAGED), ("plain.py", BASE_RECIPE)):
        path = folder / name
        path.write_text(textwrap.dedent(source))
        paths.append(ef.run(path, runs_dir=folder / "runs", device="cpu", progress=False).run_dir)
    return folder / "runs", paths[0], paths[1]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_pipelines_read_backs_count_its_iterations_across_stages(runs):
    _, staged, _ = runs
    lines = [json.loads(line) for line in (staged / "activations.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["iteration"], line["layer"]) for line in lines] == [
        ("one", 2, "0"), ("one", 2, "1"), ("two", 5, "0"), ("two", 5, "1")]
    events = read_tensorboard(staged / "tb")
    assert [e.step for e in events.Scalars("iteration/one/activations/1/std")] == [2]
    assert [h.step for h in events.Histograms("iteration/two/activations/0")] == [5]


def test_runs_plot_activations_draws_a_row_per_layer(runs, tmp_path):
    folder, staged, _ = runs
    out = tmp_path / "activations.png"
    result = invoke_cli(["runs", "plot", staged.name, "--activations", "--out", str(out), "--runs-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}"
    assert png_size(out) == (1300, 480)  # 13 x 2.4 inches a layer at 100 dpi: two layers
    assert out.stat().st_size > 10_000


def test_runs_plot_activations_of_a_run_without_them_is_one_line_exit_2(runs, tmp_path):
    folder, staged, plain = runs
    out = tmp_path / "none.png"
    result = invoke_cli(["runs", "plot", plain.name, "--activations", "--out", str(out), "--runs-dir", str(folder)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run {plain.name} has no activation statistics (no activations.jsonl in {plain}); declare "
        "ef.hooks.activation_stats() in its recipe and train it"]
    assert not out.exists()
    two = invoke_cli(["runs", "plot", plain.name, staged.name, "--activations", "--out", str(out),
                      "--runs-dir", str(folder)])
    assert two.exit_code == 2 and len(two.stderr.strip().splitlines()) == 1
    assert "runs plot --activations draws one run; got 2" in two.stderr and not out.exists()
