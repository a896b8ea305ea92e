"""SkipBatch, EndEpoch and StopFit, raised from steps and from handlers."""

from __future__ import annotations

import pytest

import engineflow as ef
from engineflow.declare.handlers import handler_specs
from engineflow.declare.steps import StepSpec
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import make_engine


class Log:
    def __init__(self):
        self.steps, self.completed, self.epochs = [], [], []


def make(step, *handlers, log):
    def recorded(batch, state):
        log.steps.append((state.epoch, batch))
        return step(batch, state)

    engine = make_engine(StepSpec("train", recorded), {})

    @ef.on(ef.Events.ITERATION_COMPLETED)
    def completed(state, output):
        log.completed.append((state.epoch, output["loss"]))

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def epoch_done(state):
        log.epochs.append((state.epoch, state.iteration))

    attach_in_order(engine, [s for fn in (completed, epoch_done, *handlers) for s in handler_specs(fn)], {})
    return engine


def plain(batch, state):
    return {"loss": batch}


def test_skip_batch_in_step_skips_its_completed_handlers():
    log = Log()

    def step(batch, state):
        if batch == 2:
            raise ef.SkipBatch
        return {"loss": batch}

    state = make(step, log=log).run([1, 2, 3], max_epochs=1)
    assert log.steps == [(1, 1), (1, 2), (1, 3)]
    assert log.completed == [(1, 1), (1, 3)]
    assert state.iteration == 3, "a skipped batch still counts as an iteration"


def test_skip_batch_before_the_step_means_the_step_is_not_called():
    log = Log()

    @ef.on(ef.Events.ITERATION_STARTED)
    def skip_second(state):
        if state.iteration == 2:
            raise ef.SkipBatch

    make(plain, skip_second, log=log).run([1, 2, 3], max_epochs=1)
    assert log.steps == [(1, 1), (1, 3)]
    assert log.completed == [(1, 1), (1, 3)]


def test_skip_batch_in_a_completed_handler_skips_only_later_handlers():
    log = Log()
    later = []

    @ef.on(ef.Events.ITERATION_COMPLETED, order=1)
    def skipper(output):
        if output["loss"] == 2:
            raise ef.SkipBatch

    @ef.on(ef.Events.ITERATION_COMPLETED, order=2)
    def after(output):
        later.append(output["loss"])

    make(plain, skipper, after, log=log).run([1, 2, 3], max_epochs=1)
    assert log.completed == [(1, 1), (1, 2), (1, 3)], "handlers of order 0 ran before the skip"
    assert later == [1, 3]


def test_end_epoch_in_step_ends_the_epoch_and_epoch_completed_still_fires():
    log = Log()

    def step(batch, state):
        if batch == 2:
            raise ef.EndEpoch
        return {"loss": batch}

    state = make(step, log=log).run([1, 2, 3], max_epochs=2)
    assert log.steps == [(1, 1), (1, 2), (2, 1), (2, 2)], "each epoch restarts from the first batch"
    assert log.completed == [(1, 1), (2, 1)]
    assert log.epochs == [(1, 2), (2, 4)]
    assert state.epoch == 2


def test_end_epoch_from_a_handler():
    log = Log()

    @ef.on(ef.Events.ITERATION_COMPLETED(once=1), order=-1)
    def end_now():
        raise ef.EndEpoch

    make(plain, end_now, log=log).run([1, 2, 3], max_epochs=2)
    assert log.completed == [(2, 1), (2, 2), (2, 3)], "the ending batch's later handlers are skipped"
    assert [e for e, _ in log.epochs] == [1, 2]


def test_stop_fit_in_a_handler_lets_the_events_other_handlers_run():
    log = Log()
    after = []

    @ef.on(ef.Events.EPOCH_COMPLETED(once=2), order=1)
    def stop():
        raise ef.StopFit

    @ef.on(ef.Events.EPOCH_COMPLETED, order=2)
    def still_runs(state):
        after.append(state.epoch)

    finished = []

    @ef.on(ef.Events.COMPLETED)
    def completed():
        finished.append(True)

    state = make(plain, stop, still_runs, completed, log=log).run([1, 2], max_epochs=5)
    assert after == [1, 2]
    assert state.epoch == 2 and finished == [True]


def test_stop_fit_in_the_step_stops_at_once():
    log = Log()

    def step(batch, state):
        if state.iteration == 2:
            raise ef.StopFit
        return {"loss": batch}

    state = make(step, log=log).run([1, 2, 3], max_epochs=3)
    assert log.steps == [(1, 1), (1, 2)]
    assert log.completed == [(1, 1)]
    assert log.epochs == [] and state.iteration == 2


def test_stop_fit_in_a_nested_eval_run_stops_the_outer_fit():
    evaluator = make_engine(StepSpec("eval", lambda batch: {"y_pred": batch}), {})

    @ef.on(ef.Events.COMPLETED, engine="eval")
    def early_stop():
        raise ef.StopFit

    attach_in_order(evaluator, handler_specs(early_stop), {})
    log = Log()

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def validate():
        evaluator.run([1, 2], max_epochs=1)

    state = make(plain, validate, log=log).run([1, 2], max_epochs=4)
    assert state.epoch == 1
    assert log.epochs == [(1, 2)]


@pytest.mark.parametrize("signal", [ef.SkipBatch, ef.EndEpoch])
def test_batch_signals_outside_a_batch_are_a_clear_error(signal):
    @ef.on(ef.Events.EPOCH_COMPLETED)
    def misplaced():
        raise signal

    with pytest.raises(ef.RecipeError, match=f"{signal.__name__} was raised by a handler of .*EPOCH_COMPLETED"):
        make(plain, misplaced, log=Log()).run([1], max_epochs=1)


def test_end_epoch_before_the_step_does_not_drop_the_next_epochs_first_batch():
    log = Log()

    @ef.on(ef.Events.ITERATION_STARTED)
    def end_early(state):
        if state.iteration == 2:
            raise ef.EndEpoch

    make(plain, end_early, log=log).run([1, 2, 3], max_epochs=2)
    assert log.steps == [(1, 1), (2, 1), (2, 2), (2, 3)]
    assert log.completed == [(1, 1), (2, 1), (2, 2), (2, 3)]
