"""Handler decorators: explicit order, schedules, Ignite filters, errors that name the handler."""

from __future__ import annotations

import pytest

import engineflow as ef
from engineflow.declare.handlers import handler_specs
from engineflow.declare.steps import StepSpec
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import make_engine


def engine_with(*handlers, step=None):
    spec = StepSpec("train", step or (lambda batch: {"loss": float(batch)}))
    engine = make_engine(spec, {})
    attach_in_order(engine, [s for fn in handlers for s in handler_specs(fn)], {})
    return engine


def test_handlers_on_one_event_run_by_order_then_declaration():
    calls = []

    @ef.on(ef.Events.EPOCH_COMPLETED, order=5)
    def late():
        calls.append("late")

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def first_default():
        calls.append("first_default")

    @ef.on(ef.Events.EPOCH_COMPLETED, order=-1)
    def early():
        calls.append("early")

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def second_default():
        calls.append("second_default")

    # attach in scrambled order: the result must not depend on it
    engine_with(second_default, late, first_default, early).run([1, 2], max_epochs=1)
    assert calls == ["early", "first_default", "second_default", "late"]


def test_order_holds_across_filtered_and_plain_events():
    calls = []

    @ef.every_n_epochs(1, order=1)
    def b():
        calls.append("b")

    @ef.on(ef.Events.EPOCH_COMPLETED, order=0)
    def a():
        calls.append("a")

    engine_with(b, a).run([1], max_epochs=2)
    assert calls == ["a", "b", "a", "b"]


@pytest.mark.parametrize(("skip_zero", "expected"), [(True, [2, 4]), (False, [0, 2, 4])])
def test_every_n_epochs_with_and_without_skip_zero(skip_zero, expected):
    epochs = []

    @ef.every_n_epochs(2, skip_zero=skip_zero)
    def record(state):
        epochs.append(state.epoch)

    engine_with(record).run([1, 2, 3], max_epochs=5)
    assert epochs == expected


def test_every_n_iterations_counts_across_epochs():
    iterations = []

    @ef.every_n_iterations(2)
    def record(state, output):
        iterations.append((state.iteration, output["loss"]))

    engine_with(record).run([10, 20, 30], max_epochs=2)
    assert iterations == [(2, 20.0), (4, 10.0), (6, 30.0)]


def test_ignite_filters_once_before_after():
    seen = {"once": [], "before": [], "after": []}

    @ef.on(ef.Events.ITERATION_COMPLETED(once=3))
    def once(state):
        seen["once"].append(state.iteration)

    @ef.on(ef.Events.EPOCH_COMPLETED(before=3))
    def before(state):
        seen["before"].append(state.epoch)

    @ef.on(ef.Events.EPOCH_COMPLETED(after=3))
    def after(state):
        seen["after"].append(state.epoch)

    engine_with(once, before, after).run([1, 2], max_epochs=5)
    assert seen == {"once": [3], "before": [1, 2], "after": [4, 5]}


def test_one_function_on_two_events():
    events = []

    @ef.on(ef.Events.STARTED)
    @ef.on(ef.Events.COMPLETED)
    def both(engine):
        events.append(engine.last_event_name.name)

    engine_with(both).run([1], max_epochs=1)
    assert events == ["STARTED", "COMPLETED"]


def test_decorators_return_the_function_unchanged():
    def handler(state):
        return state

    assert ef.every_n_epochs(3)(handler) is handler
    assert handler("x") == "x"


def test_handler_error_names_the_handler_and_the_event():
    @ef.on(ef.Events.ITERATION_COMPLETED(once=2))
    def broken():
        raise ValueError("boom")

    with pytest.raises(ef.HandlerError) as err:
        engine_with(broken).run([1, 2, 3], max_epochs=1)
    message = str(err.value)
    assert "'test_handler_error_names_the_handler_and_the_event.<locals>.broken'" in message
    assert "ITERATION_COMPLETED" in message and "iteration 2" in message and "ValueError: boom" in message
    assert isinstance(err.value.__cause__, ValueError)


def test_handler_asking_for_unknown_component_fails_at_attach_time():
    @ef.on(ef.Events.EPOCH_COMPLETED)
    def needs_scheduler(scheduler):
        pass

    with pytest.raises(ef.RecipeError, match=r"asks for 'scheduler'.*Available: .*state"):
        engine_with(needs_scheduler)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ef.RecipeError, match="whole number"):
        ef.every_n_epochs(bad)


def test_on_refuses_a_non_event():
    with pytest.raises(ef.RecipeError, match="Ignite event"):
        ef.on("epoch_completed")


def test_engine_option_accepts_a_step_function():
    @ef.eval_step
    def evaluate(batch):
        return {"y_pred": batch}

    @ef.on(ef.Events.COMPLETED, engine=evaluate)
    def after_eval():
        pass

    assert handler_specs(after_eval)[0].engine == "eval"
    with pytest.raises(ef.RecipeError, match="step function"):
        ef.on(ef.Events.COMPLETED, engine=print)


def test_handlers_added_through_ignite_get_what_ignite_gives_them():
    # engineflow calls Ignite's handlers itself (without Ignite's debug line): the same calls as Ignite.
    from ignite.engine import Engine

    def calls_of(engine):
        calls = []

        def completed(e, tag, scale=1):
            calls.append((tag, scale, e.state.iteration))
            if e.state.iteration == 3:
                e.terminate_epoch()

        engine.add_event_handler(ef.Events.ITERATION_COMPLETED, completed, "x", scale=3)
        engine.add_event_handler(ef.Events.EPOCH_COMPLETED, lambda: calls.append("no engine"))
        # Events that carry arguments: the event's come before the handler's own, keywords merged.
        engine.add_event_handler(ef.Events.TERMINATE_SINGLE_EPOCH, lambda e, tag, iter_counter: calls.append(
            ("terminated", iter_counter, tag)), "t")
        engine.add_event_handler(ef.Events.EXCEPTION_RAISED, lambda e, err, tag: calls.append((repr(err), tag)), "u")
        engine.run([1.0, 2.0, 3.0, 4.0], max_epochs=1)
        engine.add_event_handler(ef.Events.ITERATION_STARTED, lambda: 1 / 0)
        engine.run([1.0], max_epochs=1)  # Ignite hands the error to EXCEPTION_RAISED handlers
        return calls

    ours = calls_of(engine_with())
    assert ours[:5] == [("x", 3, 1), ("x", 3, 2), ("x", 3, 3), ("terminated", 3, "t"), "no engine"]
    assert ("ZeroDivisionError('division by zero')", "u") in ours
    assert ours == calls_of(Engine(lambda engine, batch: None))


def test_ignite_own_event_firing_is_bypassed_unless_its_logger_is_at_debug(monkeypatch, caplog):
    from ignite.engine import Engine

    seen = []
    engine = engine_with()
    engine.add_event_handler(ef.Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    real_fire = Engine._fire_event
    ignite_fired = []
    monkeypatch.setattr(Engine, "_fire_event", lambda self, event, *a, **k: (
        ignite_fired.append(event), real_fire(self, event, *a, **k)))
    engine.run([1.0, 2.0], max_epochs=1)
    assert seen == [1, 2] and ignite_fired == []

    with caplog.at_level("DEBUG", logger=engine.logger.name):
        engine.run([1.0, 2.0], max_epochs=1)
    assert seen == [1, 2, 1, 2] and ignite_fired.count(ef.Events.ITERATION_COMPLETED) == 2
    assert sum("Firing handlers for event Events.ITERATION_COMPLETED" in r.message for r in caplog.records) == 2


def test_every_is_ignites_filter_with_no_schedule_of_its_own():
    import dataclasses

    from engineflow.declare.handlers import HandlerSpec

    @ef.every_n_iterations(3)
    @ef.every_n_epochs(2)
    def handler():
        pass

    assert "every" not in {f.name for f in dataclasses.fields(HandlerSpec)}, "one scheduler: the event's filter"
    for spec, n in zip(handler_specs(handler), (2, 3), strict=True):
        assert [spec.event.filter(None, count) for count in range(1, 7)] == [c % n == 0 for c in range(1, 7)]


def test_pipeline_wide_filters_see_the_count_across_stages():
    # a filter of a handler for every stage gets the pipeline's iteration (the engine's plus those before)
    seen = []

    @ef.on(ef.Events.ITERATION_COMPLETED(event_filter=lambda engine, i: seen.append(i) or i == 7))
    def at_seven(state):
        seen.append(("ran", state.iteration))

    engine = make_engine(StepSpec("train", lambda batch: {"loss": float(batch)}), {})
    attach_in_order(engine, handler_specs(at_seven), {}, before=(5, 0))
    engine.run([1, 2, 3], max_epochs=1)
    assert seen == [6, 7, ("ran", 2), 8]


def test_on_given_a_function_and_an_engine_returns_a_handle_that_detaches_it():
    from ignite.engine.events import RemovableEventHandle

    calls = []

    @ef.on(ef.Events.EPOCH_COMPLETED)
    def declared(state):
        calls.append(("declared", state.epoch))

    engine = engine_with(declared)

    def later(state, engine):
        calls.append(("later", state.epoch, engine is engine_ref))

    engine_ref = engine
    handle = ef.on(ef.Events.EPOCH_COMPLETED, later, engine=engine, order=-1)
    assert isinstance(handle, RemovableEventHandle)
    engine.run([1], max_epochs=1)
    assert calls == [("later", 1, True), ("declared", 1)], "order=-1 runs before a handler attached earlier"
    handle.remove()
    handle.remove()  # a second remove does nothing, as Ignite's
    engine.run([1], max_epochs=1)
    assert calls[2:] == [("declared", 1)], "removed: not called"

    with ef.on(ef.Events.ITERATION_COMPLETED(every=2), lambda state: calls.append(state.iteration), engine=engine):
        engine.run([1, 2, 3, 4], max_epochs=1)
    engine.run([1, 2, 3, 4], max_epochs=1)
    assert calls[3:] == [2, 4, ("declared", 1), ("declared", 1)], "the with block detached it"


def test_on_decorator_on_a_built_engine_attaches_and_returns_the_function():
    calls = []
    engine = engine_with()

    def log(state):
        calls.append(state.iteration)

    assert ef.on(ef.Events.ITERATION_COMPLETED, engine=engine)(log) is log
    engine.run([1, 2], max_epochs=1)
    assert calls == [1, 2] and handler_specs(log) == (), "attached to that engine, declared for no recipe"


def test_attach_in_order_returns_a_handle_per_handler():
    calls = []

    @ef.every_n_epochs(1, skip_zero=False)
    def each_epoch(state):
        calls.append(("epoch", state.epoch))

    @ef.on(ef.Events.COMPLETED)
    def done():
        calls.append("done")

    engine = make_engine(StepSpec("train", lambda batch: {"loss": float(batch)}), {})
    handles = attach_in_order(engine, [*handler_specs(each_epoch), *handler_specs(done)], {})
    assert len(handles) == 2
    handles[0].remove()  # its epoch-0 call on STARTED goes with it
    engine.run([1], max_epochs=2)
    assert calls == ["done"]
    handles[1].remove()
    engine.run([1], max_epochs=2)
    assert calls == ["done"]


def test_on_with_a_function_needs_a_built_engine():
    with pytest.raises(ef.RecipeError, match="needs an engine engineflow built"):
        ef.on(ef.Events.EPOCH_COMPLETED, print)
    with pytest.raises(ef.RecipeError, match="leave stage= out"):
        ef.on(ef.Events.EPOCH_COMPLETED, print, engine=engine_with(), stage="pretrain")
