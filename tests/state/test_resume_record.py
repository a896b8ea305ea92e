"""The typed resume record: the one owner of a checkpoint's shape, older layouts included."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import engineflow as ef
from engineflow.errors import RecipeError
from engineflow.shards import Layout
from engineflow.state.checkpoint_files import load_record, load_state, save_checkpoint
from engineflow.state.position import plan_resume
from engineflow.state.resume import FORMAT, Position, RankState, ResumeRecord, StageInfo
from tests.conftest import BASE_RECIPE

PACKAGE = Path(ef.__file__).parent
PREVIOUS_VERSION = Path(__file__).parents[1] / "fixtures" / "checkpoint-1ddb4e4" / "state-000000003.pt"
# Keys only a full-state checkpoint has (words such as "best" or "history" are also keys of run.json).
CHECKPOINT_KEYS = {"engine", "components", "requires_grad", "train_metrics", "rng", "order", "ranks",
                   "best_checkpoints", "best_stage", "best_mode", "epochs_completed", "batches_in_epoch",
                   "saved_at", "parts"}
# A weights file (best.pt, last.pt) is another format, owned by checkpoint_files.py: it has requires_grad too.
OTHER_FORMATS = {("state/checkpoint_files.py", "requires_grad")}


def keys_read(path: Path) -> list[tuple[int, str]]:
    """Every ``x["key"]``, ``x.get("key")`` and ``x.pop("key")`` with a checkpoint key in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop")
              and node.args and isinstance(node.args[0], ast.Constant)):
            key = node.args[0].value
        if key in CHECKPOINT_KEYS:
            found.append((node.lineno, key))
    return found


def test_only_the_resume_record_reads_a_checkpoints_keys():
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "state/resume.py":
            continue
        elsewhere += [f"{rel}:{line} reads {key!r}" for line, key in keys_read(path) if (rel, key) not in OTHER_FORMATS]
    assert elsewhere == []
    assert len(keys_read(PACKAGE / "state" / "resume.py")) >= 10  # the check sees the reads where they are


def test_no_parameter_takes_a_fit_or_a_pipeline_typed_any():
    untyped = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.args, *node.args.kwonlyargs]:
                    if arg.arg in ("fit", "pipeline", "past") and (arg.annotation is None
                                                                   or ast.unparse(arg.annotation) == "Any"):
                        untyped.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}({arg.arg})")
    assert untyped == []


def loss(running: float) -> dict:
    return {"running": running, "totals": {}, "counts": {}, "main": None}


def test_a_record_goes_through_a_checkpoint_file_unchanged(tmp_path):
    record = ResumeRecord(
        run_id="r1", reason="interrupt", saved_at=12.5, position=Position(7, 2, 1, 3, 4),
        stage=StageInfo("finetune", 1, prefix="finetune/", epochs_before=2, iterations_before=6,
                        done=({"name": "pretrain", "epochs": 2},)),
        seed=3, components={"model": {"weight": torch.arange(4.0)}}, requires_grad={"model": [True, False]},
        best={"metric": "valid/accuracy", "mode": "max", "epoch": 1, "value": 0.5}, history=[{"epoch": 1, "x": 1.0}],
        layout=Layout("tensor", samples=10, batch=4, world=2, offset=0, drop_last=False),
        ranks=[RankState({"torch": torch.get_rng_state()}, loss(0.5), {"train/accuracy": None}),
               RankState({"torch": torch.get_rng_state()}, loss(0.25))],
        parts={"early_stopping": {"counter": 2}})
    save_checkpoint(tmp_path, "state-000000013.pt", record.to_dict())
    back = load_record(tmp_path / "state-000000013.pt")
    assert load_state(tmp_path / "state-000000013.pt")["format"] == FORMAT == 2
    assert back.position == record.position and back.stage == record.stage and back.world_size == 2
    assert back.pipeline_iteration == 13 and back.parts == record.parts and back.layout == record.layout
    assert torch.equal(back.components["model"]["weight"], torch.arange(4.0))
    assert [r.loss["running"] for r in back.ranks] == [0.5, 0.25] and not back.finished
    assert back.with_reason("stage-end").finished


def test_the_previous_versions_checkpoint_reads_as_a_record_in_todays_shape():
    record = ResumeRecord.from_dict(load_state(PREVIOUS_VERSION))
    assert record.position == Position(iteration=3, epochs_completed=1, batches_in_epoch=1, epoch_length=2,
                                       max_epochs=2)
    assert record.stage == StageInfo() and not record.finished and record.world_size == 1
    (rank,) = record.ranks
    assert rank.rng["numpy"][0] == "MT19937" and isinstance(rank.rng["numpy"][1], list)  # the array, as a list
    assert np.array_equal(np.asarray(rank.rng["numpy"][1], dtype=np.uint32),
                          load_state(PREVIOUS_VERSION)["rng"]["numpy"][1])
    assert record.requires_grad == {} and record.parts == {} and "model" in record.components
    assert rank.parts == {}  # written before per-rank parts: none


def test_per_rank_parts_go_through_a_checkpoint_rank_by_rank():
    ranks = [RankState({}, {}, {}, {"gradients": {"model.weight": torch.full((2,), float(r))}}) for r in range(2)]
    again = ResumeRecord.from_dict(ResumeRecord(ranks=ranks).to_dict())
    assert [r.parts["gradients"]["model.weight"].tolist() for r in again.ranks] == [[0.0, 0.0], [1.0, 1.0]]


def test_the_single_loss_layout_and_a_checkpoint_without_stage_or_ranks_read_as_today():
    old = {"format": 1, "engine": {"iteration": 4, "epoch_length": 2, "max_epochs": 3, "epochs_completed": 2,
                                   "batches_in_epoch": 0},
           "components": {}, "rng": {"torch": torch.get_rng_state()}, "loss": {"running": 0.3, "total": 1.5,
                                                                                "count": 3},
           "best": {"metric": "valid/loss", "mode": "min", "epoch": 2, "value": 0.1}, "history": []}
    record = ResumeRecord.from_dict(old)
    assert record.ranks[0].loss == {"running": 0.3, "totals": {"loss": 1.5}, "counts": {"loss": 3}, "main": "loss"}
    assert record.best_mode == "min" and record.seed == 0 and record.layout is None
    assert record.ranks[0].train_metrics == {}


def test_a_format_from_a_later_version_is_refused_naming_it():
    with pytest.raises(RecipeError, match=r"checkpoint format 3 is not one this engineflow reads \(it reads 1 and 2\)"):
        ResumeRecord.from_dict({"format": 3, "engine": {}})


def test_a_mid_epoch_record_of_another_world_plans_the_rest_of_its_order_or_refuses():
    layout = Layout("shard", samples=10, batch=2, world=2, offset=0, drop_last=False)
    saved = ResumeRecord(position=Position(5, 1, 2), layout=layout, ranks=[RankState({}, {})] * 2)
    assert plan_resume(saved, layout, 2).skip == 2 and plan_resume(saved, layout, 2).start_at == 0
    assert plan_resume(saved, replace(layout, world=3), 3).start_at == 8
    with pytest.raises(RecipeError, match="dealt out 10 samples in batches of 2"):
        plan_resume(saved, replace(layout, world=3, samples=12), 3)
    plain = ResumeRecord(position=Position(5, 1, 2), ranks=[RankState({}, {})] * 2)
    with pytest.raises(RecipeError, match="resume it on 2 \\(--nproc 2\\)"):
        plan_resume(plain, None, 1)
    assert plan_resume(ResumeRecord(position=Position(6, 2, 0)), None, 3).skip == 0  # an epoch's end: anywhere


class Counter:
    """A stateful piece a fit registers (as the toolbox's early stopping or EMA will)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def test_a_registered_part_is_saved_and_loaded_and_run_after_a_load_trains_up_to_the_epochs_asked(write_recipe):
    recipe = write_recipe(BASE_RECIPE)
    fit = ef.build(recipe)[0]
    counter = Counter()
    fit.register("counter", counter)
    fit.train.add_event_handler(ef.Events.ITERATION_COMPLETED, lambda _: setattr(counter, "count", counter.count + 1))
    fit.run(1)
    state = fit.state_dict()
    assert state["parts"]["counter"] == {"count": 3}
    assert state["parts"]["backprop"] == {"position": 0, "stepped": True, "scaler": None}  # every fit has one

    again = ef.build(recipe)[0]
    restored = Counter()
    again.register("counter", restored)
    again.load_state_dict(state)
    assert restored.count == 3 and again.position() == {"epochs_completed": 1, "batches_in_epoch": 0}
    again.run(3)  # the saved run asked for 1 epoch; this one asks for 3 in all
    assert again.train.state.epoch == 3 and len(again.history) == 3
    with pytest.raises(TypeError, match=r"Fit.register\('x', ...\) expects an object with state_dict"):
        again.register("x", object())
