"""Shared fixtures: tiny in-memory data, recipe files written to tmp_path, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from engineflow.app.cli import main
from tests.recipes import IMPORTS, classifier_steps

REPO = Path(__file__).resolve().parents[1]

# The test files that take longest, longest first. pytest-xdist hands whole files to its two workers
# (--dist loadfile): started first, they leave the many short files to fill in, so that both workers
# finish together.
LONGEST_FIRST = ("test_resume.py", "test_parallel_resume.py", "test_parallel.py",
                 "test_pipeline.py", "test_recipes.py", "test_registry.py", "test_mirror.py")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist 3.8 orders files by their number of tests unless told otherwise; the order above counts
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    if not config.getoption("--benchmarks"):  # the benchmark runner's tests: a step of CI's own (.ci/run)
        deselected = [item for item in items if item.path.name == "test_benchmarks.py"]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.path.name != "test_benchmarks.py"]


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a recipe file from dedented source; returns its path."""

    def write(source: str, name: str = "recipe.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@dataclass
class Ran:
    """A CLI result as click 8.2 and later give it (``output`` holds both streams, ``stdout`` and
    ``stderr`` each one), for the click releases before it, which keep stderr apart only when asked."""

    exit_code: int
    stdout: str
    stderr: str
    output: str
    exception: BaseException | None


def invoke_cli(argv: list[str]) -> Result | Ran:
    """The real click CLI in-process, its two streams apart and together, whatever click's release."""
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner().invoke(main, argv, catch_exceptions=False)
    result = runner.invoke(main, argv, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr, result.stdout + result.stderr, result.exception)


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result | Ran]:
    """Invoke the real click CLI in-process; runs go to tmp_path/runs."""

    def invoke(*args: str) -> Result | Ran:
        argv = list(args)
        if argv and argv[0] == "run" and "--runs-dir" not in argv:
            argv += ["--runs-dir", str(tmp_path / "runs")]
        return invoke_cli(argv)

    return invoke


def run_engineflow(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed ``engineflow`` command in a real subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, "-m", "engineflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_data(n: int = 10, features: int = 4, classes: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


# A complete small recipe, reused (with edits) by many tests. Loaders of 10 samples, batch 4: 3 batches.
BASE_RECIPE = IMPORTS + '''
config = ef.config(epochs=2, lr=0.1, batch_size=4, seed=0)

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    data = TensorDataset(x, y)
    model = torch.nn.Linear(4, 2)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(data, batch_size=cfg.batch_size),
                         "valid": DataLoader(data, batch_size=cfg.batch_size)})
''' + classifier_steps()


def read_run(runs_dir: Path) -> dict:
    """The only run under ``runs_dir``: its run.json, plus ``history`` rebuilt from metrics.jsonl."""
    import json

    (run_json,) = runs_dir.glob("*/*/run.json")
    record = json.loads(run_json.read_text())
    rows: dict[int, dict] = {}
    for line in (run_json.parent / "metrics.jsonl").read_text().splitlines():
        item = json.loads(line)
        rows.setdefault(item["epoch"], {"epoch": item["epoch"]})[item["name"]] = item["value"]
    record["history"] = [rows[e] for e in sorted(rows)]
    return record


def read_tensorboard(folder: Path) -> Any:
    """TensorBoard's own reader of the event files in ``folder`` (scalars and histograms), loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events
