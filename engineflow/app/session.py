"""Starting a recorded run: a new one (with the history semantics) or a resumed one.

Either way the result is a :class:`Session`: the run's context, its recorder and the config it
trains with. Nothing is written until :meth:`Session.begin`, which the runner calls once the
recipe is built and checked, so a recipe that cannot start leaves no run behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engineflow.declare.configuration import Config, flatten
from engineflow.declare.recipe import Recipe
from engineflow.errors import RecipeError, UnknownRunError
from engineflow.execute.pipeline import stage_epochs
from engineflow.naming import option
from engineflow.record.recorder import RunRecorder, environment, now_iso
from engineflow.record.snapshot import CodeState, capture
from engineflow.record.store import RunStore
from engineflow.runtime import RunContext, new_run_id, resolve_device

RESUME_LATEST = "last"
RESUME_AUTO = "auto"


@dataclass(frozen=True)
class Session:
    """A run about to train.

    Attributes:
        context: the run's identity and placement.
        recorder: writes its folder and store row (nothing written before :meth:`begin`).
        cfg: the resolved config.
        epochs: how many epochs the run has in all (every train stage's).
        stage_epochs: the epochs of each stage in order (0 for test and infer passes).
        resumed: True when it continues an earlier process's run.
        code: the code snapshot a new run records.
        changed: what differs from the run being resumed (with ``ignore_changes``).
        replaces: the completed run a ``retrain`` replaces once this one completes.
    """

    context: RunContext
    recorder: RunRecorder
    cfg: Config
    epochs: int
    stage_epochs: tuple[int, ...] = ()
    resumed: bool = False
    code: CodeState | None = None
    changed: list[str] = field(default_factory=list)
    replaces: dict[str, Any] | None = None

    def begin(self) -> None:
        """Record the run: a new run's folder and row (status "running"), or a resumed run's reopening."""
        if self.resumed:
            self.recorder.begin_resumed(changed=self.changed, world_size=self.context.world_size)
        else:
            assert self.code is not None  # new_session always sets it
            self.recorder.begin_new(self.code)

    def completed(self) -> None:
        """After the run completed: the run a ``retrain`` replaces is removed (folder and row)."""
        if self.replaces is not None:
            self.recorder.store.delete_run(self.replaces["id"])
            shutil.rmtree(self.replaces["run_dir"], ignore_errors=True)


def new_session(recipe: Recipe, store: RunStore, cfg: Config, *, seed: int, check: bool, device: str,
                force: bool, retrain: bool, start: Mapping[str, Any] | None = None,
                deterministic: bool = False) -> Session:
    """Plan a new run; refuses to repeat a completed run (see :func:`claim_run_id`). Writes nothing.

    ``start``: ``{"stage": NAME, "from": RUN or None}`` for a run of one stage (``--stage``).
    """
    per_stage = stage_epochs(recipe, cfg, check=check, only=start["stage"] if start is not None else None)
    code = capture(recipe.path)
    # a run of one stage from another run's state is not a repeat of the whole recipe's run
    fingerprinted = cfg.to_dict() if start is None else {**cfg.to_dict(), "engineflow": dict(start)}
    run_id, replaces = claim_run_id(store, code.fingerprint(fingerprinted), check=check, force=force,
                                    retrain=retrain)
    epochs = sum(per_stage)
    runs_root = store.path.parent
    context = RunContext(run_id, recipe.name, runs_root / recipe.name / run_id, resolve_device(device), seed, check,
                         runs_dir=runs_root)
    record = {
        "id": run_id, "experiment": recipe.name, "status": "running", "started_at": now_iso(), "ended_at": None,
        "config": cfg.to_dict(), "seed": seed, "check": check, "deterministic": deterministic, "epochs": 0,
        "max_epochs": epochs,
        "metrics": {}, "best": {}, "run_dir": str(context.run_dir.resolve()), "recipe": str(recipe.path),
        "code": code.record(cfg.to_dict()), "env": environment(str(context.device)), "error": None,
        "artifacts": {}, "resumes": [], "exact_resume": exact_resume(context.device),
    }
    if replaces is not None:
        record["replaces"] = replaces["id"]
    if start is not None:
        record["start"] = dict(start)
    return Session(context, RunRecorder(store, context.run_dir, record), cfg, epochs, tuple(per_stage), code=code,
                   replaces=replaces)


def exact_resume(device: Any, backend: str | None = None) -> bool:
    """Whether a resume of this run can be bit-identical: on CPU yes (gloo included); on CUDA only
    with ``torch.use_deterministic_algorithms(True)``, since some CUDA kernels (atomics in index_add,
    scatter, cuDNN convolutions' backward) sum in a different order on every call; never with NCCL,
    whose all-reduce does not fix the order of its sums.

    Example:
        >>> exact_resume("cpu"), exact_resume("cpu", "gloo"), exact_resume("cuda", "nccl")
        (True, True, False)
    """
    import torch

    if backend == "nccl":
        return False
    return getattr(device, "type", str(device)) == "cpu" or torch.are_deterministic_algorithms_enabled()


def claim_run_id(store: RunStore, fingerprint: str, *, check: bool, force: bool,
                 retrain: bool) -> tuple[str, dict[str, Any] | None]:
    """A new run id, and the completed run it replaces when ``retrain``.

    A completed (non-check) run with the same code and config means this run would repeat it:
    refuse unless ``force`` (a new run anyway) or ``retrain`` (a new run that replaces the latest
    such run once it completes; until then that run stays whole and listed).
    """
    if force and retrain:
        raise RecipeError(f"{option('force')} and {option('retrain')} exclude each other: {option('force')} makes "
                          f"a new run beside the old, {option('retrain')} replaces the old")
    done = [] if check else [r for r in store.find_completed(fingerprint) if not r.get("check")]
    if not done or force:
        return new_run_id(), None
    previous = done[0]
    if not retrain:
        raise RecipeError(
            f"run {previous['id']} ({previous['run_dir']}) already completed with this code and config. "
            f"Use {option('force')} to train a new run anyway, or {option('retrain')} to train it again and "
            "replace that run."
        )
    return new_run_id(), previous


def find_resumable(recipe: Recipe, store: RunStore, ref: str, cfg: Config | None, *, seed: int | None = None,
                   check: bool) -> dict[str, Any] | None:
    """The record of the run ``ref`` names, or None when a new run should start instead.

    ``ref`` is a run id (or unique prefix), ``"last"`` (the recipe's newest run) or ``"auto"`` (the newest
    run of this recipe with this code, config ``cfg`` and ``seed``): a completed one is returned (nothing to
    resume), an unfinished one (interrupted, failed) is continued. "last" and "auto" give None when
    there is no such run, e.g. a job killed before its run was recorded: it starts afresh.
    """
    if ref == RESUME_AUTO:
        assert cfg is not None
        fingerprint = capture(recipe.path).fingerprint(cfg.to_dict())
        for record in store.list_runs(experiment=recipe.name):
            if (record["code"].get("fingerprint") == fingerprint and bool(record.get("check")) == check
                    and (seed is None or record.get("seed") == seed)):
                return store.get_run(record["id"])
        return None
    try:
        return store.resolve(ref, recipe.name)
    except UnknownRunError:
        if ref == RESUME_LATEST and not store.list_runs(experiment=recipe.name):
            return None
        raise


def resume_session(recipe: Recipe, store: RunStore, record: dict[str, Any], overrides: Mapping[str, Any] | None,
                   *, seed: int | None, check: bool | None, ignore_changes: bool, device: str,
                   deterministic: bool | None = None) -> Session | None:
    """Plan the continuation of run ``record``; None when it already completed (or was pruned). Writes nothing.

    A seed, check or deterministic flag given again must equal the run's. Refuses (RecipeError) when the recipe's
    code or the config differs from the run's, unless ``ignore_changes``.
    """
    if seed is not None and seed != record["seed"]:
        raise RecipeError(f"run {record['id']} was started with seed {record['seed']}; resuming it with seed {seed} "
                          "would not continue the same run. Drop the seed or give the same one, or start a new run")
    if record["status"] in ("completed", "pruned"):  # pruned: a sweep's pruner ended it, as planned
        return None
    if record["status"] == "damaged":
        raise RecipeError(f"run {record['id']} is damaged ({record.get('error')}); it cannot be resumed. "
                          f"See engineflow runs show {record['id']}, or start a new run")
    if record["status"] == "running":
        raise RecipeError(f"run {record['id']} is still running (pid {record.get('pid')} on "
                          f"{record.get('hostname')}); stop it before resuming it")
    if check is not None and check != bool(record.get("check")):
        what = "a --check smoke run" if record.get("check") else "a full run, not a --check smoke run"
        raise RecipeError(f"run {record['id']} is {what}; resume it the way it was started")
    if deterministic and not record.get("deterministic"):
        raise RecipeError(f"run {record['id']} was started without {option('deterministic')}: its steps so far ran "
                          f"the default kernels. Resume it without {option('deterministic')}, or start a new run")
    cfg = recipe.config.override(flatten(record["config"])).override(overrides or {})
    changes = _changes(record, recipe, cfg)
    if changes and not ignore_changes:
        raise RecipeError(
            f"run {record['id']} was trained with other {' and '.join(changes)}; resuming would mix them. "
            f"Resume with the same recipe and config, or pass {option('ignore_changes')} to continue anyway."
        )
    run_dir = Path(record["run_dir"])
    context = RunContext(record["id"], record["experiment"], run_dir, resolve_device(device), record["seed"],
                         bool(record.get("check")), runs_dir=store.path.parent)
    recorder = RunRecorder(store, run_dir, {k: v for k, v in record.items() if k != "history"})
    if recipe.stages:
        started = record.get("start")
        per_stage = stage_epochs(recipe, cfg, check=bool(record.get("check")),
                                 only=started["stage"] if started else None)
    else:
        per_stage = [int(record.get("max_epochs") or cfg.get("epochs", 1))]
    return Session(context, recorder, cfg, sum(per_stage), tuple(per_stage), resumed=True,
                   changed=changes, replaces=_still_replaced(store, record))


def _still_replaced(store: RunStore, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The completed run that ``record`` (a ``retrain``) replaces once it completes, if it is still there."""
    replaced = record.get("replaces")
    if not replaced:
        return None
    try:
        old = store.get_run(replaced)
    except UnknownRunError:
        return None
    return old if old["status"] == "completed" else None


def _changes(record: Mapping[str, Any], recipe: Recipe, cfg: Config) -> list[str]:
    changes = []
    if capture(recipe.path).source != record["code"]["source"]:
        changes.append(f"code ({recipe.path.name} or the modules it imports changed)")
    before, after = flatten(record["config"]), flatten(cfg.to_dict())
    differing = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                 if before.get(k) != after.get(k)]
    if differing:
        changes.append("config (" + ", ".join(differing) + ")")
    return changes
