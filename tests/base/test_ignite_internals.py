"""The one module that reaches into Ignite's private API: its version check and its defaults."""

from __future__ import annotations

import subprocess
import sys

import ignite
import pytest
from ignite.engine import Engine, Events

from engineflow.ignite_internals import VERIFIED, HookedEngine, UntestedIgniteError, check_version, release


@pytest.mark.parametrize(("version", "ok"), [
    ("0.5.3", True), ("0.5.5", True), ("0.5.5.post1", True), ("0.5.2", False), ("0.5.0.post2", False),
    ("0.4.13", False), ("0.5.6", False), ("0.6.0rc1", False), ("1.0.0", False),
])
def test_only_verified_ignite_releases_are_accepted(version, ok):
    if ok:
        check_version(version)
    else:
        with pytest.raises(UntestedIgniteError, match=rf"pytorch-ignite {version} is installed.*pip install"):
            check_version(version)


def test_the_installed_ignite_is_verified():
    low, high = VERIFIED
    assert low <= release(ignite.__version__) < high


def test_an_untested_ignite_fails_at_import_with_one_clear_message():
    code = "import ignite; ignite.__version__ = '0.6.1'; import engineflow.execute.engine"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "UntestedIgniteError" in done.stderr and "pytorch-ignite 0.6.1 is installed" in done.stderr


def test_a_hooked_engine_by_default_behaves_as_ignite():
    def calls_of(engine):
        calls = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e, tag: calls.append((tag, e.state.iteration)), "x")
        engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, err: calls.append(repr(err)))
        engine.run([1, 2], max_epochs=1)
        engine.add_event_handler(Events.ITERATION_STARTED, lambda: 1 / 0)
        engine.run([1], max_epochs=1)  # Ignite hands the error to the EXCEPTION_RAISED handler, which keeps it
        return calls

    hooked = calls_of(HookedEngine(lambda e, b: None))
    assert hooked == calls_of(Engine(lambda e, b: None))
    assert hooked[-1] == "ZeroDivisionError('division by zero')"


def test_start_epoch_after_resumes_mid_epoch_as_ignite_does():
    seen = []
    engine = HookedEngine(lambda e, b: seen.append(b))
    engine.load_state_dict({"iteration": 2, "epoch_length": 4, "max_epochs": 1})
    engine.start_epoch_after(2)
    engine.run([10, 11, 12, 13])
    assert seen == [10, 11]  # the data restarts, the epoch ends after its 4 - 2 remaining batches
    assert Events.EPOCH_COMPLETED in engine.allowed_events()


def _ignite_private_names() -> set[str]:
    """The private names of what engineflow works with in Ignite: its engines, states, events and
    metrics (every metric class, and instances for what ``Metric.__init__`` and ``reset`` set) and
    their modules."""
    import inspect

    import ignite.distributed
    import ignite.engine
    import ignite.metrics
    import ignite.metrics.metric
    from ignite.engine import EventsList, State

    found: list[object] = [Engine, Engine(lambda e, b: None), State, State(), Events, EventsList, ignite.distributed,
                           ignite.engine, ignite.metrics, ignite.metrics.metric, ignite.metrics.Accuracy(),
                           ignite.metrics.Average(), ignite.metrics.MeanSquaredError(), ignite.metrics.Precision()]
    found += [metric for metric in vars(ignite.metrics).values()
              if inspect.isclass(metric) and issubclass(metric, ignite.metrics.Metric)]
    return {name for thing in found for name in dir(thing) if name.startswith("_") and not name.startswith("__")}


def test_no_module_but_ignite_internals_touches_ignites_private_names():
    """An attribute read or written (``x._device``), or a name a class body defines
    (``_state_dict_all_req_keys = ...``, ``def _fire_event``), that Ignite has as a private name."""
    import ast
    from pathlib import Path

    import engineflow
    import engineflow.ignite_internals as internals

    private = _ignite_private_names()
    assert {"_device", "_state_dict_all_req_keys", "_fire_event", "_Metric__state_dict_key_per_rank"} <= private
    package = Path(engineflow.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(internals.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.attr] if isinstance(node, ast.Attribute) else []
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.append(statement.name)
                    elif isinstance(statement, ast.Assign):
                        names += [target.id for target in statement.targets if isinstance(target, ast.Name)]
                    elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                        names.append(statement.target.id)
            found += [f"{path.relative_to(package.parent)}:{node.lineno} {name}" for name in names if name in private]
    assert found == [], f"Ignite's private API outside {internals.__name__}: {found}"
