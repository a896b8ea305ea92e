"""Start-up: the CLI's help, ``import engineflow`` and what a run loads, against ``import torch``.

Each is the wall time of a fresh ``python`` process (interpreter start included), so the
differences between rows are what each import adds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from benchmarks.end_to_end import engineflow_command
from benchmarks.harness import Case, Family, child_env


def _python(label: str, name: str, code: str) -> Case:
    return Case(name, label, (sys.executable, "-c", code), inner=False)


def _has_runs_command(cli: tuple[str, ...]) -> bool:
    # A child process, so that this one stays small (see harness.run_once on peak RSS).
    done = subprocess.run([*cli, "runs", "list", "--help"], env=child_env(), capture_output=True, timeout=120)
    return done.returncode == 0


def family(quick: bool = False) -> Family:
    cli = engineflow_command()
    cases = [
        _python("python -c pass", "python", "pass"),
        _python("import torch", "import_torch", "import torch"),
        _python("import ignite.engine", "import_ignite", "import ignite.engine"),
        _python("import engineflow", "import_engineflow", "import engineflow"),
        _python("import engineflow, then ignite.engine", "import_ignite_via_engineflow",
                "import engineflow, ignite.engine"),
        _python("the command's imports: engineflow, hook, ignite", "import_ignite_via_command",
                "import engineflow\nfrom engineflow.app import ignite_import\n"
                "ignite_import.install()\nimport ignite.engine"),
        Case("help", "engineflow --help", (*cli, "--help"), inner=False),
    ]
    skipped: dict[str, str] = {}
    if _has_runs_command(cli):
        cases.append(Case("runs_list", "engineflow runs list", (*cli, "runs", "list"), inner=False))
    else:
        skipped["runs_list"] = "engineflow has no 'runs' command yet"
    if importlib.util.find_spec("lightning") is not None:
        cases.append(_python("import lightning", "import_lightning", "import lightning"))
    else:
        skipped["import_lightning"] = "lightning is not installed"
    return Family(
        name="startup",
        title="fresh process wall time",
        unit="s",
        baseline="import_torch",
        cases=cases,
        clock="wall",  # what the user waits for
        skipped=skipped,
        notes=["import engineflow is lazy (public names load on first use) and changes no import: a program "
               "that imports engineflow, then Ignite, loads Ignite the plain way (the `import engineflow, then "
               "ignite.engine` row). The `engineflow` command installs a finder first, so that Ignite loads "
               "without the torch.distributed.optim import of its checkpoint module "
               "(engineflow/app/ignite_import.py): the `the command's imports` row, what `engineflow run` loads."],
    )
