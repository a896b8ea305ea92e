"""The ``engineflow`` command's first import of Ignite skips torch.distributed.optim; ``import engineflow`` alone
changes nothing.

Each case runs in a fresh interpreter: this test process has imported Ignite long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engineflow.app.ignite_import import OPT_OUT


def run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_engineflow_imports_ignite_without_torch_distributed_optim() -> None:
    out = run_python("""
        import json, sys
        import engineflow.app.ignite_import
        engineflow.app.ignite_import.install()  # what the engineflow command does first
        from engineflow.execute.engine import make_engine
        import ignite.handlers.checkpoint as checkpoint
        loaded_during = "torch.distributed.optim" in sys.modules
        finder_left = engineflow.app.ignite_import.is_installed()
        import torch
        import torch.distributed.optim as real
        print(json.dumps({"loaded_during": loaded_during, "finder_left": finder_left,
                          "real_is_real": real.ZeroRedundancyOptimizer.__module__.startswith(real.__name__ + "."),
                          "ignite_loader": type(sys.modules["ignite"].__loader__).__name__,
                          "have_zero": checkpoint.HAVE_ZERO}))
    """)
    assert out == {"loaded_during": False, "finder_left": False, "real_is_real": True,
                   "ignite_loader": "SourceFileLoader", "have_zero": True}


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_ignite_checkpoint_still_recognises_a_zero_redundancy_optimizer(tmp_path) -> None:
    """Ignite's Checkpoint consolidates a ZeroRedundancyOptimizer's state before saving, as without engineflow."""
    out = run_python(f"""
        import json
        import engineflow.app.ignite_import
        engineflow.app.ignite_import.install()
        import engineflow.execute.engine
        import torch
        import torch.distributed as dist
        from ignite.engine import Engine
        from ignite.handlers import Checkpoint, DiskSaver
        from ignite.handlers.checkpoint import ZeroRedundancyOptimizer as seen_by_ignite
        from torch.distributed.optim import ZeroRedundancyOptimizer

        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        model = torch.nn.Linear(3, 2)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
        model(torch.ones(4, 3)).sum().backward()
        zero.step()
        plain = torch.optim.SGD(model.parameters(), lr=0.1)
        saver = DiskSaver("{tmp_path / 'ckpt'}", require_empty=False)
        checkpoint = Checkpoint({{"model": model, "optimizer": zero}}, saver)
        checkpoint(Engine(lambda e, b: None))
        saved = torch.load(checkpoint.last_checkpoint, weights_only=False)["optimizer"]
        dist.destroy_process_group()
        print(json.dumps({{"zero": isinstance(zero, seen_by_ignite), "plain": isinstance(plain, seen_by_ignite),
                          "momentum_saved": len(saved["state"])}}))
    """)
    # without consolidation, ZeroRedundancyOptimizer.state_dict() raises; the momentum buffers are in the file
    assert out == {"zero": True, "plain": False, "momentum_saved": 2}


def test_opt_out_imports_ignite_the_plain_way() -> None:
    out = run_python("""
        import json, sys
        import engineflow.app.ignite_import
        engineflow.app.ignite_import.install()
        import ignite.handlers.checkpoint as checkpoint
        print(json.dumps({"loaded": "torch.distributed.optim" in sys.modules,
                          "real_class": checkpoint.ZeroRedundancyOptimizer.__module__}))
    """, **{OPT_OUT: "1"})
    assert out == {"loaded": True, "real_class": "torch.distributed.optim.zero_redundancy_optimizer"}


def test_an_ignite_that_needs_more_of_the_module_is_imported_again_the_plain_way() -> None:
    """If the stand-in lacks what Ignite imports (a future version), the import retries without it."""
    out = run_python("""
        import json, sys, types
        import engineflow.app.ignite_import as ignite_import
        ignite_import.stand_in_module = lambda: types.ModuleType("torch.distributed.optim")  # no ZeRO class
        ignite_import.install()
        import ignite.engine
        import ignite.handlers.checkpoint as checkpoint
        print(json.dumps({"real_class": checkpoint.ZeroRedundancyOptimizer.__module__,
                          "engine": ignite.engine.Engine.__name__}))
    """)
    assert out == {"real_class": "torch.distributed.optim.zero_redundancy_optimizer", "engine": "Engine"}


def test_nothing_is_installed_when_ignite_came_first() -> None:
    out = run_python("""
        import json, sys
        import ignite
        import engineflow.app.ignite_import
        engineflow.app.ignite_import.install()
        print(json.dumps({"installed": engineflow.app.ignite_import.is_installed()}))
    """)
    assert out == {"installed": False}


def test_importing_engineflow_changes_nothing_global() -> None:
    out = run_python("""
        import json, sys, signal, logging
        before = (list(sys.meta_path), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                  list(logging.getLogger().handlers))
        import engineflow
        from engineflow import metrics
        from engineflow.app import runner
        from engineflow.execute import engine, fit  # the modules a notebook uses
        from engineflow.app import cli, serving  # the serve stack waits for a server to be made
        after = (list(sys.meta_path), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                 list(logging.getLogger().handlers))
        import ignite.handlers.checkpoint
        from engineflow.app import cli, training  # the other commands, and a run: no sweep's Optuna
        engineflow.search.loguniform(1e-3, 1.0)
        print(json.dumps({"same": before == after, "real_optim": "torch.distributed.optim" in sys.modules,
                          "serve_stack": sorted(m for m in ("starlette", "uvicorn", "prometheus_client")
                                                if m in sys.modules),
                          "optuna": sorted(m for m in sys.modules if m.split(".")[0] == "optuna")}))
    """)
    assert out == {"same": True, "real_optim": True, "serve_stack": [], "optuna": []}


def test_the_command_opts_in_and_a_torchrun_process_does_not() -> None:
    code = """
        import json, sys
        import engineflow.app.cli, engineflow.app.fast_exit
        engineflow.app.fast_exit.exit_process = lambda code: None  # keep the process to report
        sys.argv = ["engineflow", "--version"]
        engineflow.app.cli.entry()
        print(json.dumps({"installed": engineflow.app.ignite_import.is_installed()}))
    """
    assert run_python(code) == {"installed": True}
    assert run_python(code, LOCAL_RANK="0", TORCHELASTIC_RUN_ID="x") == {"installed": False}
