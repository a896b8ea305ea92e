"""The benchmark runner: it runs, interleaves rounds, and writes the JSON it promises.

Nothing here asserts a time: only that the numbers exist, are positive, and are summarised right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ sits in the repository; it is not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks.harness import Case, Family, Sample, format_table, run_rounds, summarise  # noqa: E402
from benchmarks.targets import check, format_targets  # noqa: E402

CASE_KEYS = {"label", "values", "median", "min", "max", "cpu", "wall", "process_s", "peak_rss_mb"}


def run_benchmarks(tmp_path: Path, *args: str) -> dict[str, Any]:
    output = tmp_path / "results.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--quiet", "--output", str(output), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "### targets" in done.stdout
    return json.loads(output.read_text())


def assert_positive_cases(family: dict[str, Any], names: set[str]) -> None:
    assert names <= set(family["cases"])
    for name in names:
        case = family["cases"][name]
        assert CASE_KEYS <= set(case), name
        assert case["min"] > 0 and case["median"] > 0 and case["peak_rss_mb"] > 0, name
        assert case["min"] <= case["median"] <= case["max"], name
        for clock in ("cpu", "wall"):
            assert case[clock]["median"] > 0, (name, clock)
        if family["baseline"] is not None:
            assert case["ratio"] > 0 and case["paired_ratio"]["median"] > 0, name
            assert case["cpu"]["ratio"] > 0 and case["wall"]["ratio"] > 0, name


# Each case is a fresh process (~4 s of imports here); one run of every family with the cases that
# cover each family's code paths (engineflow's loop, TensorLoader, the recipe runner, handlers and
# dispatch, two and three ranks of a data-parallel fit, a full-state checkpoint, the command's start-up,
# the GPU loop) is what the checks below read. `mlp` is the case of both ddp families; `forked` (the
# launch family) says why --quick skips it. `activations` is the toolbox family's case whose options cost the
# most to check (hooks on every leaf, a read-back, both by hand and in engineflow).
QUICK_CASES = ("raw,engineflow,engineflow_tensor,engineflow_recipe,handlers,dispatch,full_state,help,import_engineflow,"
               "engineflow_resident,mlp,forked,activations")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict[str, Any]:
    """One quick run of every family (each check below reads it: the runner is the slow part)."""
    return run_benchmarks(tmp_path_factory.mktemp("bench"), "--cases", QUICK_CASES)


@pytest.mark.slow
def test_quick_run_writes_results(quick_results: dict[str, Any]) -> None:
    results = quick_results
    assert results["schema"] == 1
    assert results["settings"]["rounds"] == 1 and results["settings"]["quick"] is True
    assert results["machine"]["cores"] >= 1 and results["machine"]["packages"]["torch"]
    assert isinstance(results["unavailable"], dict)
    assert_positive_cases(results["families"]["overhead"], {"raw", "engineflow_tensor"})
    assert_positive_cases(results["families"]["paired"], {"handlers", "dispatch"})
    paired = results["families"]["paired"]["cases"]["handlers"]["details_median"]
    assert paired["engineflow_us"] > 0 and paired["engineflow+20_us"] > 0 and paired["engineflow+5_ratio"] > 0
    assert "engineflow+20_extra_us" in paired
    dispatch = results["families"]["paired"]["cases"]["dispatch"]["details_median"]
    # A step that does nothing still costs Ignite's loop; the handlers' cost is a difference to it.
    assert dispatch["engineflow_us"] > 0 and "engineflow+20_extra_us" in dispatch
    by_name = {t["target"]: t for t in results["targets"]}
    share = next(t for name, t in by_name.items() if "dispatch cost" in name)
    assert share["value"] == 1 + dispatch["engineflow+20_extra_us"] / paired["engineflow_us"]
    # Two ranks: rank 0 reports its loops' per-block ratios, and rank 1's
    assert_positive_cases(results["families"]["ddp"], {"mlp"})
    ddp = results["families"]["ddp"]["cases"]["mlp"]["details_median"]
    assert ddp["engineflow_ratio"] > 0 and ddp["engineflow_rank1_ratio"] > 0 and ddp["ignite_wall_ratio"] > 0
    assert next(t for name, t in by_name.items() if name.startswith("ddp"))["value"] == ddp["engineflow_ratio"]
    # Three ranks: the hook alone (the hand-written loop with ordered_sum), and one bucket reduced both ways
    assert_positive_cases(results["families"]["ddp3"], {"mlp"})
    ddp3 = results["families"]["ddp3"]["cases"]["mlp"]["details_median"]
    assert ddp3["raw_ordered_ratio"] > 0 and ddp3["engineflow_over_raw_ordered_ratio"] > 0
    assert ddp3["engineflow_rank2_ratio"] > 0 and ddp3["bucket_ordered_ratio"] > 0
    assert ddp3["bucket_allreduce_us"] > 0 and ddp3["bucket_ordered_us"] > 0
    if sys.platform.startswith("linux"):  # bytes written, from /proc/self/io
        # An all-gather sends more than a ring all-reduce; engineflow's fit sends what the hooked loop sends.
        assert ddp3["raw_ordered_mb"] > ddp3["raw_mb"] and ddp3["bucket_ordered_mb"] > ddp3["bucket_allreduce_mb"]
        assert ddp3["engineflow_mb"] > ddp3["raw_mb"] and ddp3["ignite_mb"] < ddp3["raw_ordered_mb"]
    # The toolbox's activation statistics: by hand and engineflow's, each paired with the raw loop of its process
    assert_positive_cases(results["families"]["toolbox"], {"activations"})
    toolbox = results["families"]["toolbox"]["cases"]["activations"]["details_median"]
    for key in ("raw_activations_ratio", "engineflow_ratio", "engineflow_activations_over_engineflow_ratio",
                "engineflow_activations_over_raw_activations_ratio"):
        assert toolbox[key] > 0, key
    # both read back every leaf layer of the CNN (the hooks ran, in the engineflow loop too)
    assert toolbox["raw_activations_layers"] == toolbox["engineflow_activations_layers"] == toolbox["leaf_layers"] > 0
    target = next(t for name, t in by_name.items() if name.startswith("toolbox: activation statistics"))
    assert target["value"] == toolbox["engineflow_activations_over_engineflow_ratio"]
    assert results["families"]["overhead"]["cases"]["raw"]["ratio"] == 1.0
    assert results["families"]["overhead"]["unit"] == "us/iteration"
    assert {t["target"] for t in results["targets"]} and all("met" in t for t in results["targets"])


@pytest.mark.slow
def test_every_family_runs(quick_results: dict[str, Any]) -> None:
    results = quick_results
    for name, family in results["families"].items():
        assert not family["errors"], (name, family["errors"])
        assert family["cases"] or family["skipped"], name
        for case in family["cases"].values():
            assert case["median"] > 0
    assert set(results["families"]) == {"overhead", "compute", "paired", "ddp", "ddp3", "end_to_end", "startup",
                                        "launch", "checkpoint", "gpu", "toolbox"}
    assert {"raw", "engineflow", "engineflow_recipe", "engineflow_tensor"} <= set(
        results["families"]["overhead"]["cases"])
    assert "--quick" in results["families"]["launch"]["skipped"]["forked"]


def test_hand_written_activation_stats_are_engineflows() -> None:
    """The toolbox family's raw loop computes by hand what ef.hooks.activation_stats records."""
    import torch

    from benchmarks.toolbox_loops import StatsByHand
    from engineflow.execute.activations import LayerStats

    torch.manual_seed(0)
    output = torch.cat((torch.randn(4, 300) * 3, torch.zeros(4, 20), torch.full((4, 5), 9.0)), dim=1).relu()
    by_hand: dict[str, torch.Tensor] = {}
    StatsByHand.record(by_hand, "layer", torch.nn.ReLU(), (), output)
    stats = LayerStats(50, -5.0, 5.0, 1e-3)
    stats.add(output)
    line = stats.summary(stats.sums.tolist())
    mean, std, near_zero, *histogram = by_hand["layer"].tolist()
    assert (mean, std, near_zero) == pytest.approx((line["mean"], line["std"], line["near_zero"]), rel=1e-5)
    assert [round(v) for v in histogram] == line["histogram"] and sum(histogram) == output.numel()


def fake_family() -> Family:
    cases = [Case(name, name.upper(), ("unused",)) for name in ("a", "b", "c")]
    return Family("fam", "a fake family", "us/iteration", "a", cases)


def test_rounds_are_interleaved_and_failures_not_retried() -> None:
    order: list[str] = []
    values = iter(range(1, 100))

    def runner(case: Case) -> Sample:
        order.append(case.name)
        if case.name == "c":
            raise RuntimeError("boom")
        value = float(next(values))
        return Sample(wall=value, cpu=value / 2, process_s=1.0, peak_rss_mb=10.0)

    samples, errors = run_rounds([fake_family()], 3, runner=runner)
    assert order == ["a", "b", "c", "a", "b", "a", "b"]
    assert [s.wall for s in samples["fam"]["a"]] == [1.0, 3.0, 5.0]
    assert errors == {"fam": {"c": "boom"}}


def test_summary_medians_and_ratios() -> None:
    family = fake_family()
    samples = {"a": [Sample(wall=2 * v, cpu=v, process_s=1.0, peak_rss_mb=5.0) for v in (10.0, 20.0, 30.0)],
               "b": [Sample(wall=v, cpu=v, process_s=1.0, peak_rss_mb=5.0) for v in (30.0, 20.0, 90.0)]}
    summary = summarise(family, samples, {"c": "boom"})
    b = summary["cases"]["b"]
    assert summary["clock"] == "cpu"
    assert (b["median"], b["min"], b["max"]) == (30.0, 20.0, 90.0)
    assert b["ratio"] == 1.5 and b["cpu"]["ratio"] == 1.5
    assert b["paired_ratio"] == {"median": 3.0, "min": 1.0, "max": 3.0}
    assert b["wall"]["ratio"] == 0.75
    table = format_table("fam", summary, 3)
    assert "| B " in table and "1.500" in table and "0.750" in table and "FAILED `c`: boom" in table


def test_targets_not_checked_without_data() -> None:
    results = check({})
    assert results and all(r["met"] is None for r in results)
    summaries = {"overhead": {"cases": {"raw": {"median": 100.0}, "engineflow": {"median": 105.0}}}}
    by_name = {r["target"]: r for r in check(summaries)}
    assert by_name["overhead: engineflow no handlers / raw <= 1.10"]["met"] is True
    assert "met" in format_targets(check(summaries))


def test_handler_target_is_their_dispatch_cost_over_the_training_loop() -> None:
    summaries = {"paired": {"cases": {
        "dispatch": {"details_median": {"engineflow+20_extra_us": 6.0}},
        "handlers": {"details_median": {"engineflow_us": 200.0, "engineflow+20_ratio": 1.06}}}}}
    by_name = {r["target"]: r for r in check(summaries)}
    share = next(r for name, r in by_name.items() if "dispatch cost" in name)
    inside = next(r for name, r in by_name.items() if "inside that training" in name)
    assert share["value"] == 1.03 and share["met"] is True
    assert inside["value"] == 1.06 and inside["met"] is False
