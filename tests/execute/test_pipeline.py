"""Pipelines of stages: records per stage, handlers across stages, exact resume anywhere, ``--stage``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import read_run

RECIPE = r'''
import json, os, signal
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import engineflow as ef

config = ef.config(warmup_epochs=2, frozen_epochs=2, finetune_epochs=2, lr=0.05, seed=1)


def setup(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    encoder = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2))
    head = nn.Linear(12, 2)
    loaders = {"train": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
               "labelled": DataLoader(TensorDataset(x[:48], y[:48]), batch_size=8, shuffle=True),
               "valid": DataLoader(TensorDataset(x[48:], y[48:]), batch_size=32),
               "test": DataLoader(TensorDataset(x[:40], y[:40]), batch_size=32)}
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=cfg.lr)
    return dict(encoder=encoder, head=head, optimizer=optimizer, loaders=loaders)


def _kill_in(where):
    if os.environ.get("KILL_IN") == where:
        _kill_once(where)


def freeze(encoder, cfg):
    encoder.requires_grad_(False)
    head = nn.Linear(12, 2)
    return {"head": head, "optimizer": torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=0.9)}


def unfreeze(encoder, head, cfg):
    _kill_in("unfreeze")  # between stages: "frozen" has ended, "finetune" has not started
    encoder.requires_grad_(True)
    groups = [{"params": encoder.parameters(), "lr": cfg.lr / 10}, {"params": head.parameters()}]
    return {"optimizer": torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)}


def _kill_once(tag):
    marker = os.environ.get("KILL_MARKER", "") + "." + tag
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


@ef.train_step
def train(batch, encoder, head, optimizer, state, pipeline):
    if (pipeline.stage, state.iteration) == (os.environ.get("KILL_STAGE"), int(os.environ.get("KILL_AT", "0"))):
        _kill_once("iteration")
    x, y = batch
    loss = F.cross_entropy(head(encoder(x)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()}, main_metric="valid/accuracy")
def evaluate(batch, encoder, head):
    x, y = batch
    return {"y_pred": head(encoder(x)), "y": y}


@ef.infer_step
def predict(x, encoder, head):
    _kill_in("predict")
    return head(encoder(x)).argmax(-1)


@ef.every_n_iterations(5)
def every_five(pipeline, state, run):
    with open(os.path.join(run.run_dir, "wide.jsonl"), "a") as out:
        out.write(json.dumps([pipeline.stage, pipeline.iteration, state.iteration]) + "\n")


@ef.every_n_epochs(1)
def maybe_stop(pipeline, state):
    if os.environ.get("STOP_IN") == pipeline.stage:
        raise ef.StopFit


@ef.every_n_iterations(5, stage="finetune")
def finetune_five(pipeline, state, run):
    with open(os.path.join(run.run_dir, "finetune.jsonl"), "a") as out:
        out.write(json.dumps([pipeline.stage, pipeline.iteration, state.iteration]) + "\n")


stages = [
    ef.stage("warmup", train=train, eval=evaluate, epochs="warmup_epochs"),
    ef.stage("frozen", train=train, eval=evaluate, epochs="frozen_epochs", prepare=freeze,
             loaders={"train": "labelled", "valid": "valid"}),
    ef.stage("finetune", train=train, eval=evaluate, epochs="finetune_epochs", prepare=unfreeze,
             loaders={"train": "labelled", "valid": "valid"}),
    ef.stage("test", eval=evaluate),
    ef.stage("predict", infer=predict, loaders={"test": "test"}),
]
'''

STAGES = ["warmup", "frozen", "finetune", "test", "predict"]
# iterations per epoch: warmup 96 samples / 16, frozen and finetune 48 labelled / 8; 2 epochs each
ITERATIONS = {"warmup": 6, "frozen": 6, "finetune": 6}


def engineflow(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engineflow", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) in a nested state, by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: torch.tensor(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensors(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in tensors(item, f"{prefix}.{i}").items()}
    return {}


def final_components(runs: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of every component (both models, the optimizer and its param groups) at the end of
    the last train stage, and the requires_grad flags."""
    (run_dir,) = (p.parent for p in runs.glob("*/*/run.json"))
    state = torch.load(run_dir / "checkpoints" / "stages" / "finetune.pt", weights_only=True)
    return tensors(state["components"]), state["requires_grad"]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "pipe.py").write_text(RECIPE)
    return folder


@pytest.fixture(scope="module")
def unbroken(folder):
    """The pipeline run once, never interrupted, checkpointing every 4 iterations."""
    runs = folder / "unbroken"
    proc = engineflow("run", "pipe.py", "--runs-dir", str(runs), "--device", "cpu", "--checkpoint-every", "4",
                      cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return runs, proc.stdout


def test_every_stage_runs_in_order_and_is_recorded_under_its_name(unbroken):
    runs, out = unbroken
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("stage ")] == [
        f"stage {i + 1}/5 {name}" for i, name in enumerate(STAGES)]
    assert "frozen epoch 2/2" in out and "test  test/test/accuracy" in out and "predict  predictions: test 40" in out
    record = read_run(runs)
    shown = json.loads(engineflow("runs", "show", record["id"], "--runs-dir", str(runs), "--json",
                                  cwd=runs.parent).stdout)
    assert [(s["name"], s["kind"], s["status"], s["epochs"]) for s in shown["stages"]] == [
        ("warmup", "train", "completed", 2), ("frozen", "train", "completed", 2),
        ("finetune", "train", "completed", 2), ("test", "test", "completed", 0), ("predict", "infer", "completed", 0)]
    finetune = shown["stages"][2]
    assert finetune["best"]["metric"] == "finetune/valid/accuracy" and finetune["best"]["epoch"] in (1, 2)
    # finetune's optimizer has two param groups
    assert set(finetune["metrics"]) == {"finetune/train/loss", "finetune/train/lr", "finetune/train/lr.1",
                                        "finetune/valid/accuracy"}
    assert set(shown["stages"][3]["metrics"]) == {"test/test/accuracy"}
    # the run's own best is the last train stage's, at the pipeline's epoch (4 epochs came before)
    assert shown["best"]["metric"] == "finetune/valid/accuracy"
    assert shown["best"]["epoch"] == 4 + finetune["best"]["epoch"]
    assert shown["best"]["value"] == finetune["best"]["value"]
    # metrics.jsonl, the index and the history count epochs across stages, names carry the stage
    assert [row["epoch"] for row in shown["history"]] == [1, 2, 3, 4, 5, 6]
    assert set(shown["history"][0]) == {"epoch", "warmup/train/loss", "warmup/train/lr", "warmup/labelled/accuracy",
                                        "warmup/valid/accuracy"}
    # the test pass's metrics count at the pipeline's last epoch (as in TensorBoard and MLflow)
    assert set(shown["history"][5]) == {"epoch", "finetune/train/loss", "finetune/train/lr", "finetune/train/lr.1",
                                        "finetune/valid/accuracy", "test/test/accuracy"}
    assert record["history"] == shown["history"]
    lines = [json.loads(line) for line in (Path(shown["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["value"]) for e in lines if e["name"] == "test/test/accuracy"] == [
        (6, shown["metrics"]["test/test/accuracy"])]
    assert shown["metrics"]["test/test/accuracy"] == finetune_free(shown)["test/test/accuracy"]
    # predictions of the infer pass: one per test sample, from the finished model
    run_dir = Path(shown["run_dir"])
    predictions = torch.load(run_dir / "predictions" / "predict" / "test.pt", weights_only=True)
    assert predictions.shape == (40,) and predictions.dtype == torch.int64
    assert shown["artifacts"]["predictions"] == {"predict/test": "predictions/predict/test.pt"}


def finetune_free(shown: dict) -> dict:
    return shown["stages"][3]["metrics"]


def test_tensorboard_tags_carry_the_stage_and_steps_count_across_stages(unbroken):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs, _ = unbroken
    (run_dir,) = (p.parent for p in runs.glob("*/*/run.json"))
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"warmup/valid/accuracy", "frozen/valid/accuracy", "finetune/valid/accuracy", "finetune/train/loss",
            "test/test/accuracy"} <= tags
    assert [e.step for e in events.Scalars("finetune/valid/accuracy")] == [5, 6]
    assert [e.step for e in events.Scalars("warmup/train/loss")] == [1, 2]
    shown = read_run(runs)
    assert [e.value for e in events.Scalars("finetune/valid/accuracy")] == pytest.approx(
        [row["finetune/valid/accuracy"] for row in shown["history"][4:]])


def test_a_loaded_pipeline_evaluates_any_of_setups_loaders(unbroken):
    """Its fit is the last train stage's, which trains on 'labelled' as 'train'; evaluate() also reaches
    setup()'s other loaders, and a name that is neither is refused naming the stage's mapping."""
    import engineflow as ef

    runs, _ = unbroken
    shown = read_run(runs)
    past = ef.load_run(shown["id"], runs_dir=runs, which="last")
    # the test pass ran the same eval step on the same weights
    assert past.fit.evaluate("test") == {"test/accuracy": shown["metrics"]["test/test/accuracy"]}
    assert set(past.fit.evaluate("labelled")) == {"labelled/accuracy"}
    with pytest.raises(ef.RecipeError) as refused:
        past.fit.evaluate("tset")
    assert str(refused.value) == ("no loader named 'tset': stage 'finetune' uses loaders train (setup()'s "
                                  "'labelled'), valid, and setup() returned loaders train, labelled, valid, test")


def test_a_pipeline_wide_handler_counts_across_stages_and_a_stage_handler_restarts(unbroken):
    runs, _ = unbroken
    (run_dir,) = (p.parent for p in runs.glob("*/*/run.json"))
    wide = [json.loads(line) for line in (run_dir / "wide.jsonl").read_text().splitlines()]
    # every 5 iterations of the pipeline (36 in all), whichever stage they fall in; state.iteration restarts
    assert wide == [["warmup", 5, 5], ["warmup", 10, 10], ["frozen", 15, 3], ["frozen", 20, 8],
                    ["finetune", 25, 1], ["finetune", 30, 6], ["finetune", 35, 11]]
    own = [json.loads(line) for line in (run_dir / "finetune.jsonl").read_text().splitlines()]
    assert own == [["finetune", 29, 5], ["finetune", 34, 10]]  # every 5 of its own stage, only there


def test_each_stage_changes_the_components_it_prepares(unbroken):
    runs, _ = unbroken
    (run_dir,) = (p.parent for p in runs.glob("*/*/run.json"))
    frozen = torch.load(run_dir / "checkpoints" / "stages" / "frozen.pt", weights_only=True)
    finetune = torch.load(run_dir / "checkpoints" / "stages" / "finetune.pt", weights_only=True)
    warmup = torch.load(run_dir / "checkpoints" / "stages" / "warmup.pt", weights_only=True)
    assert not any(frozen["requires_grad"]["encoder"]) and all(finetune["requires_grad"]["encoder"])
    # frozen: the encoder did not move; its new head's optimizer has one group, finetune's two
    for name, value in warmup["components"]["encoder"].items():
        assert torch.equal(value, frozen["components"]["encoder"][name])
    assert len(frozen["components"]["optimizer"]["param_groups"]) == 1
    assert [g["lr"] for g in finetune["components"]["optimizer"]["param_groups"]] == pytest.approx([0.005, 0.05])


# where the run is killed: mid-stage in the second stage, right after the unfreeze, between two stages
# (in the next stage's prepare), in the last train stage, and in the inference pass after training
KILLS = {
    "second-stage-mid-epoch": {"KILL_STAGE": "frozen", "KILL_AT": "7"},
    "right-after-unfreeze": {"KILL_STAGE": "finetune", "KILL_AT": "1"},
    "between-stages": {"KILL_IN": "unfreeze"},
    "last-stage-last-epoch": {"KILL_STAGE": "finetune", "KILL_AT": "9"},
    "inference-pass": {"KILL_IN": "predict"},
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILLS))
def test_a_pipeline_killed_anywhere_resumes_bit_identical(folder, unbroken, tmp_path, where):
    runs = tmp_path / "runs"
    options = ["--runs-dir", str(runs), "--device", "cpu", "--checkpoint-every", "4"]
    killed = engineflow("run", str(folder / "pipe.py"), *options, cwd=tmp_path,
                        env={**KILLS[where], "KILL_MARKER": str(tmp_path / "m")})
    assert killed.returncode == -9, killed.stderr
    resumed = engineflow("run", str(folder / "pipe.py"), *options, "--resume", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from checkpoint" in resumed.stdout
    expected, expected_flags = final_components(unbroken[0])
    found, flags = final_components(runs)
    assert differing(found, expected) == [] and flags == expected_flags
    a, b = read_run(runs), read_run(unbroken[0])
    assert a["history"] == b["history"] and a["stages"] == b["stages"] and a["best"] == b["best"]
    assert a["metrics"] == b["metrics"]
    (run_dir,) = (p.parent for p in runs.glob("*/*/run.json"))
    (ref_dir,) = (p.parent for p in unbroken[0].glob("*/*/run.json"))
    assert (run_dir / "wide.jsonl").read_text() == (ref_dir / "wide.jsonl").read_text()
    # each metric once, the test pass's too (a resume after it runs it again)
    assert sorted((run_dir / "metrics.jsonl").read_text().splitlines()) == sorted(
        (ref_dir / "metrics.jsonl").read_text().splitlines())
    assert torch.equal(torch.load(run_dir / "predictions" / "predict" / "test.pt", weights_only=True),
                       torch.load(ref_dir / "predictions" / "predict" / "test.pt", weights_only=True))


@pytest.mark.slow
def test_one_stage_from_another_runs_state_equals_that_stage_of_the_whole_run(folder, unbroken, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(unbroken[0], runs)
    source = read_run(runs)["id"]
    proc = engineflow("run", str(folder / "pipe.py"), "--runs-dir", str(runs), "--device", "cpu",
                      "--stage", "finetune", "--from", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"of stage finetune from run {source}" in proc.stdout and "completed 2 epochs" in proc.stdout
    assert "stage 3/5 finetune" in proc.stdout and "stage 4/5" not in proc.stdout  # that stage alone
    listed = json.loads(engineflow("runs", "list", "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    new = next(r for r in listed if r["id"] != source)
    shown = json.loads(engineflow("runs", "show", new["id"], "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert [(s["name"], s.get("from")) for s in shown["stages"]] == [
        ("warmup", source), ("frozen", source), ("finetune", None)]
    assert [row["epoch"] for row in shown["history"]] == [5, 6]
    new_state = torch.load(Path(shown["run_dir"]) / "checkpoints" / "stages" / "finetune.pt", weights_only=True)
    expected, _ = final_components(unbroken[0])
    assert differing(tensors(new_state["components"]), expected) == []
    # `engineflow test` takes the newest run of every stage over a newer run of one stage, and says so first
    tested = engineflow("test", str(folder / "pipe.py"), "--runs-dir", str(runs), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert tested.stdout.splitlines()[0] == (f"testing run {source} (the latest completed run of pipe that ran "
                                             "every stage)")
    assert tested.stdout.splitlines()[-1].startswith(f"run {source}: test/accuracy ")


@pytest.mark.slow
def test_a_run_of_one_stage_killed_and_resumed_ends_as_that_stage_of_the_whole_run(folder, unbroken, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(unbroken[0], runs)
    options = ["--runs-dir", str(runs), "--device", "cpu", "--checkpoint-every", "4"]
    kill = {"KILL_STAGE": "finetune", "KILL_AT": "9", "KILL_MARKER": str(tmp_path / "m")}
    killed = engineflow("run", str(folder / "pipe.py"), *options, "--stage", "finetune", "--from", "last",
                        cwd=tmp_path, env=kill)
    assert killed.returncode == -9, killed.stderr
    resumed = engineflow("run", str(folder / "pipe.py"), *options, "--resume", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage 4/5" not in resumed.stdout  # still that stage alone
    shown = json.loads(engineflow("runs", "show", "last", "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert [(s["name"], s["status"]) for s in shown["stages"]] == [
        ("warmup", "completed"), ("frozen", "completed"), ("finetune", "completed")]
    state = torch.load(Path(shown["run_dir"]) / "checkpoints" / "stages" / "finetune.pt", weights_only=True)
    expected, _ = final_components(unbroken[0])
    assert differing(tensors(state["components"]), expected) == []


def test_check_runs_every_stage_briefly(folder, tmp_path):
    proc = engineflow("run", str(folder / "pipe.py"), "--runs-dir", str(tmp_path / "runs"), "--check",
                      "--set", "warmup_epochs=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = read_run(tmp_path / "runs")
    assert [(s["name"], s["status"], s["epochs"]) for s in shown["stages"]] == [
        ("warmup", "completed", 2), ("frozen", "completed", 2), ("finetune", "completed", 2),
        ("test", "completed", 0), ("predict", "completed", 0)]
    (run_dir,) = (p.parent for p in (tmp_path / "runs").glob("*/*/run.json"))
    for stage in ("warmup", "frozen", "finetune"):  # 2 epochs of 2 batches
        state = torch.load(run_dir / "checkpoints" / "stages" / f"{stage}.pt", weights_only=True)
        assert state["engine"]["iteration"] == 4, stage


def test_stop_fit_ends_its_stage_and_the_next_one_starts(folder, tmp_path):
    proc = engineflow("run", str(folder / "pipe.py"), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
                      env={"STOP_IN": "frozen"})
    assert proc.returncode == 0, proc.stderr
    stages = read_run(tmp_path / "runs")["stages"]
    assert [(s["name"], s["epochs"]) for s in stages[:3]] == [("warmup", 2), ("frozen", 1), ("finetune", 2)]


ERRORS = [
    (["--stage", "nope"], "has no stage 'nope'; its stages are warmup, frozen, finetune, test, predict"),
    (["--stage", "finetune"], "stage 'finetune' starts from the state stage 'frozen' ended with; name the run"),
    (["--from", "last"], "--from last names the run whose state a stage starts from; give the stage too"),
    (["--stage", "warmup", "--from", "last"], "stage 'warmup' starts from what setup() builds"),
    (["--stage", "finetune", "--resume", "last"], "--resume last continues a recorded run; --stage finetune starts"),
]


@pytest.mark.parametrize(("options", "message"), ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_stage_options_misused_exit_2_with_one_line(folder, tmp_path, cli, options, message):
    result = cli("run", str(folder / "pipe.py"), *options)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "runs" / "pipe").exists()


BAD_STAGES = [
    ('ef.stage("idle")', "stage 'idle' has no step: give it train="),
    ('ef.stage("predict", infer=predict, loaders={"train": "train"})',
     "stage 'predict' is an inference pass (no gradients, eval mode); it takes no train loader"),
    ('ef.stage("predict", infer=predict, loaders={"all": "train"})',
     "stage 'predict' is an inference pass (no gradients, eval mode); it takes no train loader"),
    ('ef.stage("wrong", train=evaluate)', "stage 'wrong': train= expects a function decorated with @ef.train_step"),
    ('ef.stage("extra", train=train, epochs="no_such_key")', "takes its epochs from config key 'no_such_key'"),
    # found before the first stage trains, though it is the last stage's
    ('ef.stage("predict", infer=predict, loaders={"test": "tset"})', "stage 'predict' uses loader 'tset', but setup()"),
]


@pytest.mark.parametrize(("declaration", "message"), BAD_STAGES, ids=[b[1][:30] for b in BAD_STAGES])
def test_a_bad_stage_declaration_exits_2_with_one_line(folder, tmp_path, cli, declaration, message):
    recipe = tmp_path / "bad.py"
    recipe.write_text(RECIPE.replace('    ef.stage("predict", infer=predict, loaders={"test": "test"}),',
                                     f"    {declaration},"))
    result = cli("run", str(recipe))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert str(recipe) in lines[0]  # the file it is in


@pytest.mark.parametrize(("returned", "fragment"), [
    ('"cfg": 3', "returned 'cfg', a name engineflow provides itself (the run's config)"),
    ('"device": "gpu9"', "returned 'device', a name engineflow provides itself"),
    ('"run": None', "returned 'run', a name engineflow provides itself"),
])
def test_a_prepare_returning_engineflows_own_names_exits_2_naming_it(folder, tmp_path, cli, returned, fragment):
    """Such a name would replace what later stages are given (or be ignored): refused when the stage starts."""
    recipe = tmp_path / "bad.py"
    recipe.write_text(RECIPE.replace('return {"head": head, "optimizer"',
                                     f'return {{{returned}, "head": head, "optimizer"'))
    result = cli("run", str(recipe))
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert fragment in line and "prepare 'freeze' (" in line and "of stage 'frozen'" in line
    assert "Traceback" not in result.output
    assert read_run(tmp_path / "runs")["status"] == "failed"  # the stage before it trained: the run is recorded


def test_a_prepare_that_asks_for_the_pipeline_sees_its_own_stage(tmp_path):
    """``prepare`` runs as its stage begins: ``pipeline`` (and ``run``) name that stage, not the one before."""
    import engineflow as ef

    recipe = tmp_path / "pipe.py"
    recipe.write_text(RECIPE.replace("def freeze(encoder, cfg):\n",
                                     "SEEN = []\n\ndef freeze(encoder, cfg, pipeline, run):\n"
                                     "    SEEN.append((pipeline.stage, pipeline.index, run.stage))\n"))
    pipeline, _, _ = ef.build(recipe, device="cpu")
    pipeline.enter(1)  # prepares stage 1, "frozen"; nothing trains
    assert pipeline.recipe.module.SEEN == [("frozen", 1, "frozen")]


def test_a_handler_for_an_unknown_stage_is_refused(folder, tmp_path, cli):
    recipe = tmp_path / "bad.py"
    recipe.write_text(RECIPE.replace('@ef.every_n_iterations(5, stage="finetune")',
                                     '@ef.every_n_iterations(5, stage="finetuning")'))
    result = cli("run", str(recipe))
    assert result.exit_code == 2
    assert "handler 'finetune_five' is for stage 'finetuning', which is not one of the recipe's stages" in result.output


def test_load_run_gives_the_components_the_whole_pipeline_made_and_leaves_the_caller_alone(unbroken, monkeypatch):
    import engineflow as ef

    monkeypatch.setenv("PYTHONHASHSEED", "123")
    before = torch.random.get_rng_state()
    past = ef.load_run("last", runs_dir=unbroken[0])
    assert os.environ["PYTHONHASHSEED"] == "123"  # a child process started after it still starts
    assert torch.equal(torch.random.get_rng_state(), before)
    assert {"encoder", "head", "optimizer"} <= past.components.keys()
    assert past.fit.stage.name == "finetune"
    best = torch.load(past.run_dir / "checkpoints" / "best.pt", weights_only=True)["weights"]
    for name in ("encoder", "head"):
        state = past.components[name].state_dict()
        assert all(torch.equal(state[key], best[name][key]) for key in state), name
    assert past.fit.evaluate("valid")["valid/accuracy"] == read_run(unbroken[0])["best"]["value"]
