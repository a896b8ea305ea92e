"""``engineflow test``: a run's best weights on its recipe's "test" loader, the metrics stored with the run.

Imports neither torch nor the engines at the top: ``engineflow test --nproc N`` starts its processes
from a launcher that needs neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engineflow.errors import RecipeError

if TYPE_CHECKING:
    from engineflow.record.load import LoadedRun


def evaluate_test(recipe: str | Path, *, ref: str | None = None, ignore_changes: bool = False,
                  runs_dir: str | Path | None = None, device: str = "cpu", nproc: int | None = None,
                  oversubscribe: bool = False, trust_code: bool = False,
                  announce: str | None = None) -> dict[str, Any]:
    """Evaluate a run's best weights on the recipe's "test" loader and store the results with the run.

    ``nproc``: on that many local processes, each on its share of the test loader (nothing padded,
    nothing dropped: the metrics are one process's); under ``torchrun``, on its processes. More
    processes than CPUs (GPUs on CUDA) need ``oversubscribe``.
    ``trust_code``: with ``ref`` an id, import its code snapshot although nothing shows that this
    user recorded it (see :func:`engineflow.record.load.load_run`). ``announce`` ("stdout"): print
    which run is tested, and why that one, before it is loaded.

    Returns:
        ``{"run": id, "metrics": {"test/accuracy": ...}, "stored": bool}``; ``stored`` is False when
        the runs folder could not be written (the metrics are then not kept with the run).

    Example:
        >>> import io, tempfile
        >>> import engineflow as ef
        >>> runs = tempfile.mkdtemp()
        >>> result = ef.run("recipes/digits.py", {"epochs": 1}, device="cpu", runs_dir=runs, stream=io.StringIO())
        >>> tested = ef.evaluate_test("recipes/digits.py", runs_dir=runs)  # the latest completed run of digits
        >>> tested["run"] == result.run_id, sorted(tested["metrics"]), tested["stored"]
        (True, ['test/accuracy', 'test/loss'], True)
    """
    from engineflow.app.launch import distributed_env, launch, process_group
    from engineflow.app.workers import check_nproc

    if nproc is not None and not distributed_env():
        check_nproc(nproc, device, oversubscribe=oversubscribe)
    if nproc is not None and nproc > 1 and not distributed_env():
        kwargs = dict(recipe=str(recipe), ref=ref, ignore_changes=ignore_changes,
                      runs_dir=None if runs_dir is None else str(runs_dir), device=device, trust_code=trust_code,
                      announce=announce)
        return launch("test", kwargs, nproc, runs_dir=runs_dir)
    with process_group(device) as world:
        return _evaluate_test(recipe, ref=ref, ignore_changes=ignore_changes, runs_dir=runs_dir, device=device,
                              world=world, trust_code=trust_code, announce=announce)


def _evaluate_test(recipe: str | Path, *, ref: str | None, ignore_changes: bool, runs_dir: str | Path | None,
                   device: str, world: Any, trust_code: bool, announce: str | None) -> dict[str, Any]:
    import sys

    from engineflow.execute.parallel import shard_loader
    from engineflow.execute.validation import evaluate_loader
    from engineflow.record.load import select_run

    def say(record: dict[str, Any], why: str) -> None:
        print(f"testing run {record['id']} ({why})", file=sys.stdout, flush=True)

    past = select_run(recipe, ref=ref, ignore_changes=ignore_changes, runs_dir=runs_dir, device=device,
                      trust_code=trust_code, announce=say if announce and world.rank == 0 else None)
    loaders = past.components["loaders"]  # setup()'s, also for a pipeline whose last stage trained on others
    if "test" not in loaders:
        raise RecipeError(f"{past.recipe.path}: setup() returned no 'test' loader (loaders: "
                          f"{', '.join(loaders)}); add loaders['test'] to test a run")
    if world.distributed:
        loaders = {"test": shard_loader(loaders["test"], world, pad=False, name="test")}
    metrics = evaluate_loader(past.fit.eval, loaders, "test")  # the metrics all-reduce themselves
    note = _store_test_metrics(past, metrics) if world.rank == 0 else None
    return {"run": past.record["id"], "metrics": metrics, "stored": note is None, **({"note": note} if note else {})}


def _store_test_metrics(past: LoadedRun, metrics: dict[str, float]) -> str | None:
    """Store the metrics with the run; on a runs folder that cannot be written, say so instead (None: stored)."""
    from engineflow.record.recorder import now_iso
    from engineflow.record.runs import update_record
    from engineflow.record.store import ReadOnlyStoreError, RunStore

    record = past.record
    fields = {"metrics": {**record.get("metrics", {}), **metrics}, "tested_at": now_iso()}
    with RunStore.open(past.run_dir.parent.parent) as store:
        if store.read_only:
            return f"the metrics were not stored with run {record['id']}: {store.path.parent} is read-only here"
        try:
            update_record(store, record, fields)
        except ReadOnlyStoreError as err:
            return f"the metrics were not stored with run {record['id']}: {err}"
    return None
