"""The ``engineflow`` command line. Imports torch and Ignite only inside the commands that train.

Exit codes: 0 success; 1 training failed (e.g. the loss became NaN); 2 bad usage or a bad
recipe; 130 interrupted.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from engineflow.errors import EXIT_INTERRUPTED, EXIT_TRAINING_FAILED, EngineflowError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="engineflow")
def main() -> None:
    """engineflow: train PyTorch models from plain step functions on Ignite engines.

    \b
    A recipe is a Python file with a config, a setup(cfg) and step functions:
      engineflow run recipes/digits.py
      engineflow run recipes/digits.py --set lr=0.1 --set epochs=5
      engineflow run recipes/digits.py --check      # 2 batches x 2 epochs smoke test

    Exit codes: 0 ok, 1 training failed, 2 bad recipe or usage, 130 interrupted.
    """


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=str))
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a config value (repeatable); checked against the recipe's defaults.")
@click.option("--check", is_flag=True, help="Smoke test: 2 batches of each loader for 2 epochs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train; auto picks CUDA when available.")
@click.option("--seed", type=int, default=None, help="Seed for every RNG (default: the config's seed, else 0).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=str), default="runs", show_default=True,
              envvar="ENGINEFLOW_RUNS_DIR", help="Where run folders are written.")
@click.option("--progress/--no-progress", default=None,
              help="Live progress bar (default: only when printing to a terminal).")
@click.option("--debug", is_flag=True, help="Show full tracebacks for recipe and usage errors.")
def run_command(recipe: str, assignments: tuple[str, ...], check: bool, device: str, seed: int | None,
                runs_dir: str, progress: bool | None, debug: bool) -> None:
    """Train RECIPE (a .py file) and record the run under --runs-dir.

    \b
    Examples:
      engineflow run recipes/digits.py
      engineflow run recipes/sine.py --set hidden=64 --seed 3 --device cpu
    """

    def go() -> None:
        from engineflow.configuration import parse_assignments
        from engineflow.runner import run

        run(recipe, parse_assignments(assignments), check=check, device=device, seed=seed,
            runs_dir=runs_dir, progress=progress)

    _guarded(go, debug)


def _guarded(action: Callable[[], Any], debug: bool) -> None:
    """Run ``action``; turn engineflow's errors into one message and an exit code."""
    try:
        action()
    except EngineflowError as err:
        if debug or (err.exit_code == EXIT_TRAINING_FAILED and err.__cause__ is not None):
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception:
        traceback.print_exc()
        click.echo("error: training failed with the exception above", err=True)
        sys.exit(EXIT_TRAINING_FAILED)


if __name__ == "__main__":
    main()
