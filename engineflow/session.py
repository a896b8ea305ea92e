"""Starting a recorded run: a new one (with the history semantics) or a resumed one.

Either way the result is a :class:`Session`: the run's context, its recorder (folder and store
row already written, status "running") and the config it trains with.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engineflow.configuration import Config, flatten
from engineflow.errors import RecipeError
from engineflow.recipe import Recipe
from engineflow.registry.recorder import RunRecorder, environment, now_iso
from engineflow.registry.snapshot import capture
from engineflow.registry.store import RunStore
from engineflow.runtime import RunContext, new_run_id, resolve_device

CHECK_EPOCHS = 2  # --check: 2 epochs (of engineflow.runner.CHECK_BATCHES batches)


@dataclass(frozen=True)
class Session:
    """A run about to train.

    Attributes:
        context: the run's identity and placement.
        recorder: writes its folder and store row.
        cfg: the resolved config.
        epochs: how many epochs the fit has in all.
        resumed: True when it continues an earlier process's run.
    """

    context: RunContext
    recorder: RunRecorder
    cfg: Config
    epochs: int
    resumed: bool = False


def new_session(recipe: Recipe, store: RunStore, cfg: Config, *, seed: int, check: bool, device: str,
                force: bool, retrain: bool) -> Session:
    """Record a new run (status "running"); refuses to repeat a completed run (see ``claim_run_id``)."""
    epochs = CHECK_EPOCHS if check else cfg.get("epochs", 1)
    code = capture(recipe.path)
    run_id = claim_run_id(store, code.fingerprint(cfg.to_dict()), check=check, force=force, retrain=retrain)
    runs_root = store.path.parent
    context = RunContext(run_id, recipe.name, runs_root / recipe.name / run_id, resolve_device(device), seed, check)
    record = {
        "id": run_id, "experiment": recipe.name, "status": "running", "started_at": now_iso(), "ended_at": None,
        "config": cfg.to_dict(), "seed": seed, "check": check, "epochs": 0, "max_epochs": epochs,
        "metrics": {}, "best": {}, "run_dir": str(context.run_dir.resolve()), "recipe": str(recipe.path),
        "code": code.record(cfg.to_dict()), "env": environment(str(context.device)), "error": None,
        "artifacts": {}, "resumes": [], "exact_resume": exact_resume(context.device),
    }
    return Session(context, RunRecorder.start(store, context.run_dir, record, code), cfg, epochs)


def exact_resume(device: Any) -> bool:
    """Whether a resume of this run can be bit-identical: on CPU yes; on CUDA only with
    ``torch.use_deterministic_algorithms(True)``, since some CUDA kernels (atomics in index_add,
    scatter, cuDNN convolutions' backward) sum in a different order on every call."""
    import torch

    return getattr(device, "type", str(device)) == "cpu" or torch.are_deterministic_algorithms_enabled()


def claim_run_id(store: RunStore, fingerprint: str, *, check: bool, force: bool, retrain: bool) -> str:
    """A new run id, or the id of the completed run that ``retrain`` resets.

    A completed (non-check) run with the same code and config means this run would repeat it:
    refuse unless ``force`` (a new run anyway) or ``retrain`` (reset the latest such run).
    """
    if force and retrain:
        raise RecipeError("--force and --retrain exclude each other: --force makes a new run, --retrain resets the old")
    done = [] if check else [r for r in store.find_completed(fingerprint) if not r.get("check")]
    if not done or force:
        return new_run_id()
    previous = done[0]
    if not retrain:
        raise RecipeError(
            f"run {previous['id']} ({previous['run_dir']}) already completed with this code and config. "
            "Use --force to train a new run anyway, or --retrain to reset that run and train it again."
        )
    shutil.rmtree(previous["run_dir"], ignore_errors=True)
    store.delete_run(previous["id"])
    return str(previous["id"])


def resume_session(recipe: Recipe, store: RunStore, ref: str, overrides: Mapping[str, Any] | None, *,
                   ignore_changes: bool, device: str) -> Session | None:
    """Reopen run ``ref`` of this recipe to continue it; None when it already completed.

    Refuses (RecipeError) when the recipe's code or the config differs from the run's, unless
    ``ignore_changes``.
    """
    record = store.resolve(ref, recipe.name)
    if record["status"] == "completed":
        return None
    if record["status"] == "running":
        raise RecipeError(f"run {record['id']} is still running (pid {record.get('pid')} on "
                          f"{record.get('hostname')}); stop it before resuming it")
    cfg = recipe.config.override(flatten(record["config"])).override(overrides or {})
    changes = _changes(record, recipe, cfg)
    if changes and not ignore_changes:
        raise RecipeError(
            f"run {record['id']} was trained with other {' and '.join(changes)}; resuming would mix them. "
            "Resume with the same recipe and config, or pass --ignore-changes to continue anyway."
        )
    run_dir = Path(record["run_dir"])
    context = RunContext(record["id"], record["experiment"], run_dir, resolve_device(device), record["seed"],
                         bool(record.get("check")))
    recorder = RunRecorder.reopen(store, run_dir, record, changed=changes)
    return Session(context, recorder, cfg, int(record.get("max_epochs") or cfg.get("epochs", 1)), resumed=True)


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
