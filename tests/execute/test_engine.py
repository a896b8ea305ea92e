"""StepEngine and the handler wiring: events that carry values, cleanup on failure, metrics of a stopped run."""

from __future__ import annotations

import json

import pytest
from ignite.engine import Engine, EventEnum

import engineflow as ef
from engineflow.declare.handlers import handler_specs
from engineflow.declare.steps import StepSpec
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import make_engine
from tests.conftest import BASE_RECIPE, read_run


def engine_with(*handlers, step=lambda batch: {"loss": batch}):
    engine = make_engine(StepSpec("train", step), {})
    attach_in_order(engine, [s for fn in handlers for s in handler_specs(fn)], {})
    return engine


def failing(batch):
    if batch == 2:
        raise ValueError("bad batch")
    return {"loss": batch}


def test_an_exception_handler_gets_the_exception_and_the_error_still_ends_the_run():
    seen = []

    @ef.on(ef.Events.EXCEPTION_RAISED)
    def clean_up(exception, state):
        seen.append((type(exception).__name__, str(exception), state.iteration))

    with pytest.raises(ValueError, match="bad batch"):
        engine_with(clean_up, step=failing).run([1, 2, 3], max_epochs=1)
    assert seen == [("ValueError", "bad batch", 2)]


def test_an_ignite_style_exception_handler_gets_engine_and_error_positionally():
    seen = []

    @ef.on(ef.Events.EXCEPTION_RAISED)
    def clean_up(engine, e):
        seen.append((engine.state.iteration, repr(e)))

    with pytest.raises(ValueError):
        engine_with(clean_up, step=failing).run([1, 2, 3], max_epochs=1)
    assert seen == [(2, "ValueError('bad batch')")]


def test_a_failing_cleanup_does_not_replace_the_error_and_later_cleanups_still_run():
    ran = []

    @ef.on(ef.Events.EXCEPTION_RAISED)
    def broken():
        ran.append("broken")
        raise OSError("cannot close")

    @ef.on(ef.Events.EXCEPTION_RAISED)
    def second():
        ran.append("second")

    with pytest.raises(ValueError, match="bad batch") as err:
        engine_with(broken, second, step=failing).run([1, 2, 3], max_epochs=1)
    assert ran == ["broken", "second"]
    assert any("OSError: cannot close" in note for note in err.value.__notes__)


def test_terminate_single_epoch_handlers_get_iter_counter_as_ignite_gives_it():
    def calls_of(engine, attach):
        calls = []
        attach(engine, calls)
        engine.run([1, 2, 3, 4], max_epochs=2)
        return calls

    def ours(engine, calls):
        @ef.on(ef.Events.ITERATION_COMPLETED)
        def end_at_3(engine):
            if engine.state.iteration == 3:
                engine.terminate_epoch()

        @ef.on(ef.Events.TERMINATE_SINGLE_EPOCH)
        def terminated(state, iter_counter):
            calls.append((state.epoch, iter_counter))

        attach_in_order(engine, [s for fn in (end_at_3, terminated) for s in handler_specs(fn)], {})

    def plain(engine, calls):
        engine.add_event_handler(ef.Events.ITERATION_COMPLETED,
                                 lambda e: e.terminate_epoch() if e.state.iteration == 3 else None)
        engine.add_event_handler(ef.Events.TERMINATE_SINGLE_EPOCH,
                                 lambda e, iter_counter: calls.append((e.state.epoch, iter_counter)))

    got = calls_of(make_engine(StepSpec("train", lambda batch: {"loss": batch}), {}), ours)
    assert got == [(1, 3)]
    assert got == calls_of(Engine(lambda e, b: None), plain)


class Custom(EventEnum):
    SAMPLED = "sampled"


def test_custom_events_deliver_their_values_to_handlers_as_ignite_does():
    def fire_sampled(engine):
        # Ignite's public fire_event passes no values; its handlers-with-values path is _fire_event
        engine._fire_event(Custom.SAMPLED, 7, tag="x")

    def calls_of(engine, attach):
        calls = []
        engine.register_events(*Custom)
        attach(engine, calls)
        engine.add_event_handler(ef.Events.EPOCH_COMPLETED, fire_sampled)
        engine.run([1], max_epochs=1)
        return calls

    def ours(engine, calls):
        @ef.on(Custom.SAMPLED)
        def sampled(state, count, tag):
            calls.append((state.epoch, count, tag))

        attach_in_order(engine, handler_specs(sampled), {})

    got = calls_of(make_engine(StepSpec("train", lambda batch: {"loss": batch}), {}), ours)
    assert got == [(1, 7, "x")]
    plain = calls_of(Engine(lambda e, b: None),
                     lambda engine, calls: engine.add_event_handler(
                         Custom.SAMPLED, lambda e, count=None, tag=None: calls.append((e.state.epoch, count, tag))))
    assert got == plain


def test_exception_handler_in_a_recipe_cleans_up_and_the_run_records_the_original_error(write_recipe, tmp_path):
    recipe = write_recipe(BASE_RECIPE.replace("    loss = F.cross_entropy(model(x), y)", """\
    loss = F.cross_entropy(model(x), y)
    if state.iteration == 4:
        raise RuntimeError("diverged at 4")""").replace("def train(batch, model, optimizer):",
                                                       "def train(batch, model, optimizer, state):") + """
CLEANED = []

@ef.on(ef.Events.EXCEPTION_RAISED)
def clean_up(exception):
    CLEANED.append(repr(exception))
    open(CLEANED_FILE, "w").write(repr(exception))
""" + f"\nCLEANED_FILE = {str(tmp_path / 'cleaned.txt')!r}\n")
    with pytest.raises(RuntimeError, match="diverged at 4"):
        ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))
    assert (tmp_path / "cleaned.txt").read_text() == "RuntimeError('diverged at 4')"
    record = read_run(tmp_path / "runs")
    assert record["status"] == "failed"
    assert record["error"] == "RuntimeError: diverged at 4"


def test_stop_fit_during_validation_records_no_metric_of_another_epoch(write_recipe, tmp_path):
    # An eval ITERATION_COMPLETED handler stops the fit in the middle of epoch 3's validation: epoch 3
    # has no complete validation, so it records none (never epoch 2's values), and best ignores it.
    recipe = write_recipe(BASE_RECIPE.replace("epochs=2", "epochs=5") + """
TRAIN_EPOCH = []

@ef.on(ef.Events.EPOCH_STARTED)
def note_epoch(state):
    TRAIN_EPOCH.append(state.epoch)

@ef.on(ef.Events.ITERATION_COMPLETED, engine="eval")
def stop(state):
    if TRAIN_EPOCH[-1] == 3 and state.iteration == 2:
        raise ef.StopFit
""")
    result = ef.run(recipe, device="cpu", runs_dir=tmp_path / "runs", stream=open(tmp_path / "out.txt", "w"))
    assert result.status == "completed" and result.epochs == 3
    record = read_run(tmp_path / "runs")
    by_epoch = {row["epoch"]: row for row in record["history"]}
    assert "valid/accuracy" in by_epoch[2] and "train/loss" in by_epoch[3]
    assert "valid/accuracy" not in by_epoch[3], "epoch 3's validation was stopped: no value may stand for it"
    assert "valid/accuracy" not in result.history[2] and "valid/accuracy" not in result.metrics
    assert result.best["epoch"] in (1, 2)
    jsonl = next((tmp_path / "runs").glob("*/*/metrics.jsonl"))
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert not [row for row in lines if row["epoch"] == 3 and row["name"].startswith("valid/")]


def test_a_stopped_eval_run_reports_no_metrics():
    evaluator = make_engine(StepSpec("eval", lambda batch: {"y_pred": batch, "y": batch}), {})
    ef.metrics.MeanAbsoluteError().attach(evaluator, "mae")

    @ef.on(ef.Events.ITERATION_COMPLETED, engine="eval")
    def stop(state):
        if state.iteration == 2:
            raise ef.StopFit

    import torch

    data = [torch.ones(2), torch.ones(2)]
    assert evaluator.run(data, max_epochs=1).metrics == {"mae": 0.0}
    attach_in_order(evaluator, handler_specs(stop), {})
    assert evaluator.run(data, max_epochs=1).metrics == {}


def test_an_engine_is_a_value_run_on_any_loader_and_from_another_engines_handler():
    import torch

    @ef.eval_step(metrics={"mae": ef.metrics.MeanAbsoluteError()})
    def check(batch, scale):
        return {"y_pred": batch * scale, "y": batch}

    seen = []

    @ef.on(ef.Events.COMPLETED, engine=check)
    def report(metrics):
        seen.append(dict(metrics))

    evaluator = ef.engine(check, report, scale=2.0)
    assert evaluator.run([torch.ones(3)]).metrics == {"mae": 1.0}
    assert evaluator.run([torch.full((2,), 3.0)]).metrics == {"mae": 3.0}  # another loader, a fresh result

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def validate(state):
        state.metrics["checked"] = evaluator.run([torch.ones(1) * state.epoch]).metrics["mae"]

    trainer = ef.engine(ef.train_step(lambda batch: {"loss": batch}), validate)
    assert trainer.run([1.0, 2.0], max_epochs=2).metrics == {"checked": 2.0}
    assert seen == [{"mae": 1.0}, {"mae": 3.0}, {"mae": 1.0}, {"mae": 2.0}]


def test_an_engine_refuses_a_handler_of_another_kind_and_an_unmarked_step():
    @ef.eval_step
    def check(batch):
        return {"y_pred": batch}

    @ef.on(ef.Events.COMPLETED)  # the train engine's
    def done():
        pass

    with pytest.raises(ef.RecipeError, match=r"is for the train engine.*engine='eval'"):
        ef.engine(check, done)
    with pytest.raises(ef.RecipeError, match="not marked"):
        ef.engine(lambda batch: batch)


def test_a_cleanup_gets_the_error_a_handler_raised_not_its_wrapper():
    seen = []

    @ef.on(ef.Events.ITERATION_COMPLETED(every=2))
    def broken(state):
        raise KeyError("no such key")

    @ef.on(ef.Events.EXCEPTION_RAISED)
    def clean_up(exception):
        seen.append(type(exception).__name__)

    with pytest.raises(ef.HandlerError) as err:
        engine_with(broken, clean_up).run([1, 2, 3], max_epochs=1)
    assert seen == ["KeyError"]
    assert "Events.ITERATION_COMPLETED of the train engine" in str(err.value)
    assert "filter=" not in str(err.value) and "0x" not in str(err.value)


def test_a_filter_on_an_event_without_a_count_is_refused_when_attached():
    @ef.on(ef.Events.TERMINATE_SINGLE_EPOCH(once=1))
    def once(iter_counter):
        pass

    with pytest.raises(ef.RecipeError, match="keeps no count of its own, so it takes no filter"):
        engine_with(once)


def test_a_thousand_engines_leave_one_handler_on_their_shared_logger():
    """Every StepEngine logs to the one logger Ignite names after the class: it gets one NullHandler."""
    import logging

    engines = [make_engine(StepSpec("train", lambda batch: {"loss": batch}), {}) for _ in range(1001)]
    assert len({id(e.logger) for e in engines}) == 1
    assert sum(isinstance(h, logging.NullHandler) for h in engines[0].logger.handlers) == 1
