"""What a run prints: number, duration and count formats, the plain epoch lines, the tqdm bar."""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from ignite.engine import Engine, Events

from engineflow.app.report import Reporter, format_duration, format_metrics, format_value, plural
from engineflow.state.resume import StageInfo


@pytest.mark.parametrize(("value", "text"), [
    (0.98512, "0.9851"), (5e-06, "5e-06"), (123.456, "123.5"), (0.5, "0.5"), (-0.0012345, "-0.001234"),
    (12345.6, "1.235e+04"), (1.0, "1"), (0.0, "0"), (float("nan"), "nan"), (float("inf"), "inf"),
    (42, "42"), (10**7, "10000000"), (np.float32(5e-06), "5e-06"), (np.int64(3), "3"),
    (True, "True"), (None, "None"), ("text", "text"),
])
def test_format_value_keeps_four_significant_digits(value, text):
    assert format_value(value) == text


def test_format_value_takes_the_number_of_digits():
    assert format_value(2 / 3, digits=2) == "0.67" and format_value(2 / 3, digits=6) == "0.666667"


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0.0ms"), (0.0004, "0.4ms"), (0.00999, "10ms"), (0.06, "60ms"), (0.9994, "999ms"), (0.9996, "1.0s"),
    (1.23, "1.2s"), (59.94, "59.9s"), (59.96, "1m00s"), (125, "2m05s"), (3599.6, "1h00m"), (3725, "1h02m"),
    (-1, "0.0ms"),
])
def test_format_duration_picks_a_readable_unit(seconds, text):
    assert format_duration(seconds) == text


def test_plural_counts_nouns():
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert plural(1, "input") == "1 input" and plural(5, "input") == "5 inputs"
    assert plural(2, "batch") == "2 batches" and plural(2, "loss") == "2 losses"
    assert plural(3, "child", "children") == "3 children" and plural(1, "child", "children") == "1 child"


def test_format_metrics_prints_scalars_with_significant_digits():
    metrics = {"epoch": 2, "train/loss": 0.123456, "valid/mse": 5e-06, "valid/n": 10, "flag": True,
               "note": "text", "matrix": [[1, 0], [0, 1]]}
    assert format_metrics(metrics) == "train/loss 0.1235  valid/mse 5e-06  valid/n 10"


# A fit whose loss and validation error are 5e-6 every epoch: the lines must not read 0.0000.
TINY_ERROR_RECIPE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(epochs=2, seed=0)

def setup(cfg):
    data = TensorDataset(torch.zeros(8, 1), torch.zeros(8, 1))
    model = torch.nn.Linear(1, 1)
    return dict(model=model, loaders={"train": DataLoader(data, batch_size=4), "valid": DataLoader(data, batch_size=4)})

@ef.train_step
def train(batch, model):
    return {"loss": torch.tensor(5e-06)}

@ef.eval_step(metrics={"mae": ef.metrics.MeanAbsoluteError()})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": y + 5e-06, "y": y}
'''


def test_epoch_lines_print_small_values_with_significant_digits(write_recipe, tmp_path):
    import engineflow as ef

    out = io.StringIO()
    result = ef.run(write_recipe(TINY_ERROR_RECIPE), runs_dir=tmp_path, device="cpu", progress=False, stream=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, out.getvalue()
    for line in lines:
        assert "train/loss 5e-06" in line and "valid/mae 5e-06" in line, line
        assert re.search(r"  (\d+\.\dms|\d+ms|\d+\.\ds)(  \*)?$", line), f"epoch time in ms or s: {line}"
    assert "0.0000" not in "".join(lines)
    log = (result.run_dir / "log.txt").read_text()
    assert all(line + "\n" in log for line in lines), "log.txt gets the same lines"
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue(), "no bar drawn when progress=False"


def fake_fit(loss: float | None = 0.25) -> SimpleNamespace:
    """What the reporter reads from a fit: history, best epoch and the running loss."""
    return SimpleNamespace(history=[], best=SimpleNamespace(epoch=None), loss=SimpleNamespace(running=loss),
                           stage=StageInfo())


def attach(reporter: Reporter, fit: SimpleNamespace, step_seconds: float = 0.0, fail_at: int | None = None) -> Engine:
    """A plain Ignite engine with the reporter's handlers, and a stand-in for the fit's own epoch record."""

    def step(engine, batch):
        time.sleep(step_seconds)
        if engine.state.iteration == fail_at:
            raise RuntimeError("boom")

    engine = Engine(step)

    @engine.on(Events.EPOCH_COMPLETED)
    def record(engine):  # the fit records history before the reporter's order-1000 handlers
        fit.history.append({"epoch": engine.state.epoch, "train/loss": 0.5 / engine.state.epoch})
        fit.best.epoch = engine.state.epoch

    for spec in reporter.handlers(fit):
        assert spec.order == 1000 and spec.raw, "the reporter runs after every other handler"
        engine.add_event_handler(spec.event, spec.fn)
    return engine


def test_progress_bar_shows_rate_and_time_left_then_clears_for_the_epoch_line(tmp_path):
    out = io.StringIO()
    reporter = Reporter(out, progress=True, log_path=tmp_path / "log.txt")
    # 0.06 s per batch: the bar (redrawn at most every 0.1 s) is drawn mid-epoch
    attach(reporter, fake_fit(loss=5e-06), step_seconds=0.06).run(range(4), max_epochs=2)
    text = out.getvalue()
    assert "epoch 1/2" in text and "batch/s" in text, text
    assert re.search(r"\d+/4 \[\d\d:\d\d<\d\d:\d\d, [\d.]+batch/s, loss 5e-06\]", text), "rate, time left, loss"
    lines = text.split("\n")
    assert "epoch 1/2  train/loss 0.5  " in lines[0] and lines[0].rstrip().endswith("*")
    assert lines[0].rsplit("\r", 1)[-1].startswith("epoch 1/2  train/loss"), "the bar is erased before the line"
    assert lines[1].rsplit("\r", 1)[-1].startswith("epoch 2/2  train/loss 0.25"), text
    assert lines[2] == "", "nothing after the last line: the bar is gone"
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert [line.split("  ")[:2] for line in log] == [["epoch 1/2", "train/loss 0.5"], ["epoch 2/2", "train/loss 0.25"]]
    assert "\r" not in "".join(log) and "batch/s" not in "".join(log), "log.txt has lines, never the bar"


def test_a_line_printed_mid_epoch_goes_above_the_bar():
    out = io.StringIO()
    reporter = Reporter(out, progress=True)
    engine = attach(reporter, fake_fit())
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda: reporter.line("checkpoint written"))
    engine.run(range(4), max_epochs=1)
    before, after = out.getvalue().split("checkpoint written\n")
    assert before.endswith("\r"), "the bar was cleared before the line"
    assert "epoch 1/1:" in after.split("\n")[0], "and drawn again below it"


def test_close_leaves_a_bar_cut_short_on_its_own_line():
    out = io.StringIO()
    reporter = Reporter(out, progress=True)
    with pytest.raises(RuntimeError, match="boom"), reporter:
        attach(reporter, fake_fit(), fail_at=3).run(range(4), max_epochs=1)
    text = out.getvalue()
    assert text.endswith("\n") and "2/4" in text.rsplit("\r", 1)[-1], "the bar as it stood, then a newline"
    reporter.close()  # closing twice is harmless
    assert out.getvalue() == text


def test_no_bar_and_no_per_iteration_handler_without_progress():
    out = io.StringIO()
    reporter = Reporter(out, progress=False)
    fit = fake_fit()
    assert {spec.event for spec in reporter.handlers(fit)} == {Events.EPOCH_STARTED, Events.EPOCH_COMPLETED}
    attach(reporter, fit).run(range(4), max_epochs=2)
    assert out.getvalue().count("\n") == 2 and "\r" not in out.getvalue() and "\033" not in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_defaults_to_whether_the_stream_is_a_terminal():
    assert Reporter(Terminal()).progress is True
    assert Reporter(io.StringIO()).progress is False
    assert Reporter(Terminal(), progress=False).progress is False


def test_runs_tables_print_values_as_the_reporter_does():
    from engineflow.app import views

    record = {"id": "20261130-000000-abcd", "experiment": "sine", "status": "completed",
              "started_at": "2026-11-30T00:00:00", "epochs": 1, "config": {"lr": 0.001},
              "metrics": {"train/loss": 5e-06, "valid/mse": 4.2e-06, "valid/n": 10},
              "best": {"epoch": 1, "metric": "valid/mse", "value": 4.2e-06, "mode": "min"}}
    assert "valid/mse=4.2e-06" in views.list_table([record])
    shown = views.show_text(record)
    assert "valid/mse = 4.2e-06 (min)" in shown and "train/loss = 5e-06" in shown and "valid/n = 10" in shown
    other = {**record, "id": "20261130-000001-ef01", "metrics": {"train/loss": 0.98512, "valid/mse": None}}
    table = views.compare_text(views.compare(record, other))
    assert "5e-06" in table and "0.9851" in table and "0.0000" not in table
