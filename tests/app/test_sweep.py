"""``engineflow sweep``: trials are recorded runs, pruned per epoch, resumed after a kill, shared by workers.

The fast tests run sweeps in this process on a tiny recipe (10 samples, Linear(4, 2), 3 epochs); the
slow ones kill a real sweep worker, run 3 workers on a PostgreSQL server the module starts on
127.0.0.1, and prune a trial that trains on 2 processes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install -e '.[sweep]'")

import engineflow as ef  # noqa: E402
from engineflow.app.studies import trial_seed  # noqa: E402
from tests.conftest import invoke_cli  # noqa: E402
from tests.recipes import IMPORTS  # noqa: E402

# sign=-1 climbs the loss instead of descending it: the diverging region of the space
TINY = IMPORTS + '''
import os, time
config = ef.config(epochs=3, lr=0.1, batch_size=4, seed=0, sign=1.0, hidden=2)
SPACE

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    data = TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(4, cfg.hidden), torch.nn.Linear(cfg.hidden, 2))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr),
                loaders={"train": DataLoader(data, batch_size=cfg.batch_size, shuffle=True),
                         "valid": DataLoader(data, batch_size=cfg.batch_size)})

@ef.train_step
def train(batch, model, optimizer, cfg, state):
    stall = os.environ.get("EF_TEST_STALL")
    if stall and state.iteration == 5 and not os.path.exists(stall):   # mid-epoch 2 of the first trial
        open(stall, "w").close()
        time.sleep(120)
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    (cfg.sign * loss).backward()
    optimizer.step()
    return {"loss": loss}

@ef.eval_step(metrics={"loss": ef.metrics.Loss(F.cross_entropy)})
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}
'''
DICT_SPACE = 'space = {"lr": ef.search.loguniform(0.01, 0.5), "hidden": ef.search.choice(2, 3)}'
# trials 0 and 1 descend, the later ones alternate: a space with a diverging region, known per trial
DIVERGING = '''
def space(trial):
    sign = 1.0 if trial.number < 2 or trial.number % 2 == 0 else -1.0
    return {"sign": sign, "lr": trial.suggest_float("lr", 0.2, 0.3)}
'''


def stored(runs: Path) -> object:
    """The default storage of a runs folder: Optuna's journal file ``sweeps.log``."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(runs / "sweeps.log")))


def recipe(folder: Path, space: str, name: str = "tiny.py") -> Path:
    path = folder / name
    path.write_text(TINY.replace("SPACE", space))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A sweep of 4 trials of the dict space, in this process."""
    folder = tmp_path_factory.mktemp("sweep")
    done = ef.sweep(recipe(folder, DICT_SPACE), 4, runs_dir=folder / "runs", seed=3, device="cpu",
                    stream=io.StringIO())
    return folder, done


def test_trials_are_listed_runs_whose_configs_hold_their_params(swept: tuple[Path, dict], cli) -> None:
    folder, done = swept
    assert [t["state"] for t in done["trials"]] == ["complete"] * 4
    assert done["direction"] == "min" and done["metric"] == "valid/loss"
    listed = cli("runs", "list", "--sweep", "tiny", "--json", "--runs-dir", str(folder / "runs"))
    runs = {r["id"]: r for r in json.loads(listed.stdout)}
    assert sorted(runs) == sorted(t["run_id"] for t in done["trials"])
    for t in done["trials"]:
        run = runs[t["run_id"]]
        assert run["sweep"] == {"study": "tiny", "trial": t["number"], "params": t["params"]}
        assert {k: run["config"][k] for k in t["params"]} == t["params"]
        assert run["seed"] == trial_seed(3, t["number"])
        assert run["best"]["value"] == t["value"]
    other = cli("runs", "list", "--sweep", "other", "--json", "--runs-dir", str(folder / "runs"))
    assert json.loads(other.stdout) == []
    best = min(done["trials"], key=lambda t: t["value"])
    assert done["best"]["number"] == best["number"] and done["best"]["run_id"] == best["run_id"]
    # the Optuna trial holds the run id; runs compare takes the trials
    study = optuna.load_study(study_name="tiny", storage=stored(folder / "runs"))
    assert [t.user_attrs["run_id"] for t in study.trials] == [t["run_id"] for t in done["trials"]]
    compared = cli("runs", "compare", *runs, "--json", "--runs-dir", str(folder / "runs"))
    assert compared.exit_code == 0, compared.output


def test_sweep_show_and_plot(swept: tuple[Path, dict], cli) -> None:
    folder, done = swept
    shown = cli("sweep", "show", "--runs-dir", str(folder / "runs"))
    assert shown.exit_code == 0, shown.output
    assert f"best: trial {done['best']['number']} (run {done['best']['run_id']})" in shown.stdout
    assert "importance: " in shown.stdout
    as_json = json.loads(cli("sweep", "show", "tiny", "--json", "--runs-dir", str(folder / "runs")).stdout)
    assert as_json == done and set(as_json["trials"][0]) == {"number", "state", "params", "value", "epochs", "run_id"}
    plotted = cli("sweep", "plot", "--out", str(folder / "sweep.png"), "--runs-dir", str(folder / "runs"))
    assert plotted.exit_code == 0, plotted.output
    assert (folder / "sweep.png").stat().st_size > 10_000


def test_runs_plot_of_trials_labels_curves_by_params_on_whole_epochs_with_the_best_marked(
        swept: tuple[Path, dict], cli) -> None:
    from engineflow.app.views import plot_figure
    from engineflow.record.runs import get_run

    folder, done = swept
    records = [get_run(folder / "runs", t["run_id"]) for t in done["trials"]]
    fig = plot_figure(records)
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in sorted(t["params"].items())) for t in done["trials"]]
    assert all(float(tick).is_integer() for tick in ax.get_xticks())
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    name = ax.get_title()
    assert sorted((int(s.get_xdata()[0]), float(s.get_ydata()[0])) for s in stars) == sorted(
        (r["best"]["epoch"], next(row[name] for row in r["history"] if row["epoch"] == r["best"]["epoch"]))
        for r in records)
    out = folder / "curves.png"
    assert cli("runs", "plot", *(t["run_id"] for t in done["trials"]), "--out", str(out), "--runs-dir",
               str(folder / "runs")).exit_code == 0 and out.is_file()


def test_the_same_command_again_adds_nothing_to_a_finished_study_and_more_trials_add_the_difference(
        swept: tuple[Path, dict], cli) -> None:
    folder, done = swept
    again = ef.sweep(folder / "tiny.py", 4, runs_dir=folder / "runs", seed=3, device="cpu", stream=io.StringIO(),
                     resume=True)
    assert again == done
    more = ef.sweep(folder / "tiny.py", 5, runs_dir=folder / "runs", seed=3, device="cpu", stream=io.StringIO())
    assert more["trials"][:4] == done["trials"] and [t["number"] for t in more["trials"]] == [0, 1, 2, 3, 4]
    missing = cli("sweep", str(folder / "tiny.py"), "--trials", "2", "--study", "nope", "--resume", "--runs-dir",
                  str(folder / "runs"))
    assert missing.exit_code == 2 and "no study 'nope'" in missing.stderr


def test_no_trial_starts_after_the_timeout(swept: tuple[Path, dict]) -> None:
    folder, _ = swept
    timed = ef.sweep(folder / "tiny.py", 2, study="timed", timeout=1e-9, runs_dir=folder / "runs", device="cpu",
                     stream=io.StringIO())
    assert timed["study"] == "timed" and timed["trials"] == [] and timed["best"] is None


def test_the_readme_space_example_is_digits_space_and_its_conditional_space_gives_config_values() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- sweep -->")
    block = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"ef": ef}
    exec(block, scope)
    assert scope["space"] == ef.load_recipe("recipes/digits.py").module.space
    from engineflow.app.sweep import _checked

    config = ef.config(optim={"name": "adam", "momentum": 0.9})
    recipe = type("R", (), {"config": config, "path": "r.py"})
    for params, expected in [({"optim.name": "sgd", "optim.momentum": 0.85}, {"optim.name": "sgd",
                                                                              "optim.momentum": 0.85}),
                             ({"optim.name": "adam"}, {"optim.name": "adam"})]:
        values = scope["conditional"](optuna.trial.FixedTrial(params))
        assert _checked(values, recipe) == expected


def test_median_pruner_prunes_the_diverging_trials_after_fewer_epochs(tmp_path: Path, cli) -> None:
    done = ef.sweep(recipe(tmp_path, DIVERGING), 5, runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO(),
                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    states = {t["number"]: t["state"] for t in done["trials"]}
    assert states == {0: "complete", 1: "complete", 2: "complete", 3: "pruned", 4: "complete"}
    epochs = {t["number"]: t["epochs"] for t in done["trials"]}
    assert epochs[3] < 3 and all(epochs[n] == 3 for n in (0, 1, 2, 4))
    pruned = json.loads(cli("runs", "show", done["trials"][3]["run_id"], "--json", "--runs-dir",
                            str(tmp_path / "runs")).stdout)
    assert pruned["status"] == "pruned" and pruned["epochs"] == epochs[3]
    assert pruned["stages"][0]["stopped"]["by"] == "pruning"
    assert Path(pruned["run_dir"], "checkpoints", "last.pt").is_file()
    assert list(Path(pruned["run_dir"], "checkpoints", "state").glob("state-*.pt"))
    listed = cli("runs", "list", "--status", "pruned", "--runs-dir", str(tmp_path / "runs"))
    assert pruned["id"] in listed.stdout and done["trials"][0]["run_id"] not in listed.stdout
    again = cli("run", str(tmp_path / "tiny.py"), "--resume", pruned["id"], "--runs-dir", str(tmp_path / "runs"))
    assert again.exit_code == 0 and f"run {pruned['id']} already pruned; nothing to resume" in again.stdout
    assert json.loads(cli("runs", "show", pruned["id"], "--json", "--runs-dir",
                          str(tmp_path / "runs")).stdout)["status"] == "pruned"


def test_a_staged_recipe_reports_each_train_stage_at_the_pipelines_epoch(tmp_path: Path) -> None:
    from engineflow.record.runs import get_run

    path = tmp_path / "staged.py"
    path.write_text(recipe(tmp_path, DICT_SPACE).read_text() + """
stages = [ef.stage("warm", train=train, eval=evaluate, epochs=2),
          ef.stage("tune", train=train, eval=evaluate, epochs=2)]
""")
    done = ef.sweep(path, 1, runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO(), pruner="none")
    study = optuna.load_study(study_name="staged", storage=stored(tmp_path / "runs"))
    history = {row["epoch"]: row for row in get_run(tmp_path / "runs", done["trials"][0]["run_id"])["history"]}
    expected = {epoch: history[epoch][f"{'warm' if epoch <= 2 else 'tune'}/valid/loss"] for epoch in (1, 2, 3, 4)}
    assert study.trials[0].intermediate_values == pytest.approx(expected)


def test_a_failing_trial_is_failed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    space = 'space = {"lr": ef.search.choice(0.1, 1e30)}\n'  # 1e30 makes the loss inf at once: a failed run
    done = ef.sweep(recipe(tmp_path, space), 4, runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO(),
                    sampler="grid")
    by_lr = {t["params"]["lr"]: t["state"] for t in done["trials"]}
    assert by_lr == {0.1: "complete", 1e30: "failed"} and len(done["trials"]) == 4


def test_without_optuna_a_sweep_is_one_line_naming_the_extra(tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # an import of it fails as if it were not installed
    monkeypatch.delitem(sys.modules, "engineflow.app.studies", raising=False)
    monkeypatch.delattr(sys.modules["engineflow.app"], "studies", raising=False)
    for argv in (["sweep", str(recipe(tmp_path, DICT_SPACE)), "--trials", "2"], ["sweep", "show"]):
        result = cli(*argv, "--runs-dir", str(tmp_path / "runs"))
        assert result.exit_code == 2
        assert result.stderr.strip() == "error: engineflow sweep needs Optuna: pip install 'engineflow[sweep]'"
    assert not (tmp_path / "runs").exists()


def test_sweep_show_of_a_folder_without_sweeps_is_one_line(tmp_path: Path, cli) -> None:
    result = cli("sweep", "show", "--runs-dir", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no sweeps in" in result.stderr and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(("space", "extra", "says"), [
    ('space = {"lrr": ef.search.loguniform(1e-3, 1.0)}', (), "space key 'lrr' is not a config key"),
    ('space = {"hidden": ef.search.uniform(1, 4)}', (), "space key 'hidden' has a default of type int"),
    ('space = {"lr": ef.search.choice("fast", 0.1)}', (), "holds 'fast'"),
    ('space = {"lr": 0.1}', (), "must be an ef.search range"),
    ("", (), "declares no search space"),
    (DICT_SPACE, ("--space", "lr=normal(0, 1)"), "--space expects KEY=RANGE"),
    ('def space(trial):\n    return {"momentum": 0.9}\n', (), "returned 'momentum', which is not a config key"),
    ('space = {"lr": ef.search.loguniform(0, 1.0)}', (), "ef.search.loguniform(low, high) expects"),
    (DICT_SPACE, ("--sampler", "grid"), "--sampler grid needs countable ranges; space key 'lr'"),
])
def test_bad_spaces_exit_2_with_one_line(tmp_path: Path, cli, space: str, extra: tuple[str, ...], says: str) -> None:
    path = recipe(tmp_path, space)
    result = cli("sweep", str(path), "--trials", "2", "--runs-dir", str(tmp_path / "runs"), *extra)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert says in line
    assert not (tmp_path / "runs" / "sweeps.log").exists() or "space(trial)" in space  # no study was made


@pytest.mark.slow
def test_a_killed_sweep_continues_its_trial_exactly(tmp_path: Path) -> None:
    # a function space whose values are not all Optuna's parameters: the takeover runs the same values
    path = recipe(tmp_path, 'def space(trial):\n    lr = trial.suggest_float("lr", 0.01, 0.5)\n'
                            '    return {"lr": lr, "hidden": 2 if lr < 0.1 else 3}\n')
    runs = tmp_path / "runs"
    stall = tmp_path / "stalled"
    argv = [sys.executable, "-m", "engineflow", "sweep", str(path), "--trials", "3", "--runs-dir", str(runs),
            "--seed", "5", "--device", "cpu"]
    worker = subprocess.Popen(argv, env={**os.environ, "EF_TEST_STALL": str(stall)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not stall.exists() and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.1)
    assert stall.exists(), worker.communicate()[0]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="tiny", storage=stored(runs))
    (running,) = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = running.user_attrs["run_id"]

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name="tiny", storage=stored(runs))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    trial = study.trials[running.number]
    assert trial.user_attrs["run_id"] == interrupted and trial.params == running.params
    record = json.loads(next(runs.glob(f"*/{interrupted}/run.json")).read_text())
    assert record["status"] == "completed" and len(record["resumes"]) == 1
    # an unbroken run of the same params and seed ends with the same weights
    values = running.user_attrs["values"]
    assert record["sweep"]["params"] == values and set(values) == {"lr", "hidden"}
    unbroken = ef.run(path, values, seed=trial_seed(5, running.number), device="cpu",
                      runs_dir=tmp_path / "unbroken", stream=io.StringIO())
    ours = torch.load(Path(record["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["weights"]["model"]
    theirs = torch.load(unbroken.run_dir / "checkpoints" / "last.pt", weights_only=True)["weights"]["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (pgserver's binaries), started and stopped by this module."""
    pgserver = pytest.importorskip("pgserver", reason="the sweep extra's test server: pip install -e '.[sweep]'")
    import shutil
    import tempfile

    from pgserver._commands import initdb, pg_ctl
    from pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
        find_suitable_port,
    )

    home = Path(tempfile.mkdtemp(prefix="engineflow-pg-"))  # outside pytest's 0700 folders: its own user reads it
    home.chmod(0o755)
    data = home / "data"
    data.mkdir()
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as pgserver does, a user of its own
        import pwd
        import stat

        from pgserver._commands import POSTGRES_BIN_PATH

        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        os.chown(data, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=data, user=user)
    for attempt in range(3):  # another process may take the free port before the server binds it
        port = find_suitable_port("127.0.0.1")
        try:
            pg_ctl(["-w", "-o", f"-h 127.0.0.1 -p {port} -k ''", "-l", str(data / "log"), "start"], pgdata=data,
                   user=user, timeout=30)
            break
        except subprocess.CalledProcessError:
            if attempt == 2:
                raise
    del pgserver
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data, user=user, timeout=30)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_three_workers_on_postgresql_run_exactly_n_trials(tmp_path: Path, postgres: str) -> None:
    """Two commands, one of them with --jobs 2: three worker processes, each command with its own runs folder."""
    path = recipe(tmp_path, DICT_SPACE)
    commands = [subprocess.Popen([sys.executable, "-m", "engineflow", "sweep", str(path), "--trials", "6", "--study",
                                  "shared", "--storage", postgres, "--runs-dir", str(tmp_path / f"runs{i}"),
                                  "--device", "cpu", "--pruner", "none", "--jobs", str(jobs)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                for i, jobs in enumerate((2, 1))]
    outputs = [c.communicate(timeout=300)[0] for c in commands]
    assert [c.returncode for c in commands] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=postgres)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6, outputs
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # none sampled twice
    found = {p.parent.name: i for i in range(2) for p in (tmp_path / f"runs{i}").glob("tiny/*/run.json")}
    assert {t.user_attrs["run_id"] for t in study.trials} == set(found)  # every trial's run, in its worker's folder
    by_pid = {t.user_attrs["pid"] for t in study.trials if found[t.user_attrs["run_id"]] == 0}
    assert commands[0].pid not in by_pid  # --jobs: the command's worker processes ran its trials


@pytest.mark.slow
def test_a_pruned_trial_on_two_processes_stops_both_ranks_together(tmp_path: Path) -> None:
    # successive halving keeps the best of trials 1 and 2 at epoch 1: trial 2, which climbs the loss, is pruned
    third_diverges = 'def space(trial):\n    return {"sign": -1.0 if trial.number == 2 else 1.0}\n'
    done = ef.sweep(recipe(tmp_path, third_diverges), 3, runs_dir=tmp_path / "runs", device="cpu",
                    stream=io.StringIO(), pruner="successive-halving", nproc=2)
    states = [t["state"] for t in done["trials"]]
    assert states == ["complete", "complete", "pruned"], done
    for t in done["trials"]:
        record = json.loads(next((tmp_path / "runs").glob(f"tiny/{t['run_id']}/run.json")).read_text())
        assert record["world_size"] == 2
        if t["state"] == "pruned":
            assert record["status"] == "pruned" and record["epochs"] < 3 and record["epochs"] == t["epochs"]


@pytest.mark.slow
def test_with_the_mlflow_mirror_each_trial_is_an_mlflow_run_nested_under_the_study(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a database store keeps the artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = recipe(tmp_path, DICT_SPACE + f"\nmlflow = {uri!r}\n")
    done = ef.sweep(path, 2, runs_dir=tmp_path / "runs", device="cpu", stream=io.StringIO())
    # what a busy machine left unpushed when the runs ended (each waits 10 s at most) goes now
    assert invoke_cli(["runs", "sync", "--runs-dir", str(tmp_path / "runs")]).exit_code == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("engineflow.sweep_parent") == "tiny"]
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["engineflow.run_id"]: r for r in runs if r is not parent}
    assert sorted(children) == sorted(t["run_id"] for t in done["trials"])
    for t in done["trials"]:
        tags = children[t["run_id"]].data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["engineflow.trial"] == str(t["number"])
        assert children[t["run_id"]].info.status == "FINISHED"
