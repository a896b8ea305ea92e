"""The README's examples run as written."""

from __future__ import annotations

import io
import re

import pytest

from tests.conftest import REPO, read_run

README = (REPO / "README.md").read_text()


def python_block_after(marker: str) -> str:
    start = README.index(marker)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_tutorial_recipe_trains_xor_and_stops_early(cli, tmp_path):
    recipe = tmp_path / "xor.py"
    recipe.write_text(python_block_after("<!-- tutorial -->"))
    result = cli("run", str(recipe), "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = read_run(tmp_path / "runs")
    assert summary["best"]["value"] == 1.0
    assert summary["epochs"] < 40, "StopFit ended the fit once accuracy reached 1.0"
    assert f"epoch {summary['epochs']}: valid accuracy 1.00" in result.output


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    code = python_block_after("## Python API").replace('"recipes/digits.py"', repr(str(REPO / "recipes/digits.py")))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].best["epoch"] is not None
    assert len(namespace["fit"].history) == 3
    assert (tmp_path / "runs" / "digits").is_dir()


def test_load_run_example_runs(tmp_path, monkeypatch):
    import engineflow as ef
    from tests.record.test_registry import RECIPE

    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    ef.run(recipe, device="cpu", stream=io.StringIO())
    namespace: dict = {"ef": ef}
    exec(compile(python_block_after("A past run, as it was"), "README.md", "exec"), namespace)
    assert namespace["past"].module.SCALE == 1.0 and namespace["past"].model is not None


def test_cleanup_example_runs_when_a_fit_fails_and_the_error_stays():
    import torch

    import engineflow as ef

    model = torch.nn.Linear(2, 1)
    namespace: dict = {"ef": ef, "HOOKS": [model.register_forward_hook(lambda *a: None)]}
    exec(compile(python_block_after("**Cleanup when a fit fails**"), "README.md", "exec"), namespace)

    @ef.train_step
    def train(batch, model):
        model(batch)
        raise ValueError("diverged")

    with pytest.raises(ValueError, match="diverged"):
        ef.engine(train, namespace["remove_hooks"], model=model).run([torch.ones(1, 2)])
    assert not model._forward_hooks, "the cleanup removed the hook"


def test_engine_value_example_runs():
    import torch

    import engineflow as ef

    logged = []

    @ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
    def evaluate(batch, model):
        x, y = batch
        return {"y_pred": model(x), "y": y}

    @ef.on(ef.Events.COMPLETED, engine=evaluate)
    def log_results(metrics):
        logged.append(dict(metrics))

    x = torch.randn(8, 3)
    namespace = {"ef": ef, "evaluate": evaluate, "log_results": log_results, "model": torch.nn.Linear(3, 2),
                 "test_loader": [(x, torch.zeros(8, dtype=torch.long))]}
    exec(compile(python_block_after("A step with its handlers is also a value"), "README.md", "exec"), namespace)
    assert set(namespace["evaluator"].state.metrics) == {"accuracy"} and logged and "accuracy" in logged[0]


def test_attach_to_a_built_engine_example_runs(capsys):
    import torch

    import engineflow as ef

    logged = []

    @ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy()})
    def evaluate(batch, model):
        x, y = batch
        return {"y_pred": model(x), "y": y}

    def log_results(metrics):
        logged.append(dict(metrics))

    x = torch.randn(8, 3)
    loader = [(x, torch.zeros(8, dtype=torch.long))] * 2
    namespace = {"ef": ef, "log_results": log_results, "test_loader": loader,
                 "evaluator": ef.engine(evaluate, model=torch.nn.Linear(3, 2))}
    exec(compile(python_block_after("`ef.on` also attaches to an engine"), "README.md", "exec"), namespace)
    assert capsys.readouterr().out == "torch.Size([8, 2])\n" * 2, "printed in the first run only"
    assert len(logged) == 1 and "accuracy" in logged[0], "log_results ran in the with block's run only"
    namespace["evaluator"].run(loader)
    assert len(logged) == 1 and capsys.readouterr().out == ""


def test_fine_tuning_example_loads_the_pretrained_encoder(tmp_path, write_recipe):
    import torch

    import engineflow as ef
    from engineflow.runtime import RunContext
    from tests.conftest import BASE_RECIPE

    pretrain = BASE_RECIPE.replace("    model = torch.nn.Linear(4, 2)\n",
                                   "    model = torch.nn.Linear(4, 2)\n    encoder = torch.nn.Linear(4, 3)\n").replace(
        "return dict(model=model,", "return dict(model=model, encoder=encoder,") + "\nexperiment = 'pretrain'\n"
    ef.run(write_recipe(pretrain, "pretrain.py"), device="cpu", runs_dir=tmp_path / "runs", stream=io.StringIO())
    encoder = torch.nn.Linear(4, 3)
    namespace: dict = {"ef": ef, "make_encoder": lambda: encoder}
    exec(compile(python_block_after("**Fine-tuning from another run**"), "README.md", "exec"), namespace)
    run = RunContext("new", "finetune", tmp_path, torch.device("cpu"), 0, runs_dir=tmp_path / "runs")
    namespace["setup"](ef.config(), run)  # the example's setup, up to its "..."
    past = ef.load_run("last", runs_dir=tmp_path / "runs", experiment="pretrain")
    assert torch.equal(encoder.weight, past.components["encoder"].weight)


def test_the_stages_example_is_the_pipeline_recipes_own():
    block = python_block_after("<!-- stages -->")
    recipe = (REPO / "recipes" / "pretrain_finetune.py").read_text()
    listed = block[block.index("stages = ["):]
    assert listed in recipe, "the README's stages list is the recipe's, as written there"
    for name in ("freeze_encoder", "unfreeze_encoder"):
        assert f"def {name}(" in recipe


def readme_order_table() -> list[dict[str, str]]:
    """The rows of the README's table of engineflow's own handler orders."""
    section = README[README.index("### Handlers: order and control flow"):]
    header = "| event | order | constant | what runs |"
    lines = section[section.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        event, order, constant, what = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append({"events": event, "order": order, "constant": constant.strip("`"), "what": what})
    return rows


def orders_in_code() -> dict[str, set[str]]:
    """Each ``orders.NAME`` the package passes to a call, with the ``Events.X`` of that call; fails on
    a handler spec whose order is a literal."""
    import ast

    def events_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Call):
            node = node.func
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Events":
            return node.attr
        return None

    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "engineflow").rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call):
                continue
            values = [*call.args, *(k.value for k in call.keywords)]
            events = {e for e in map(events_of, values) if e is not None}
            named = [v.attr for v in values if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                     and v.value.id == "orders"]
            callee = getattr(call.func, "id", getattr(call.func, "attr", ""))
            if events and callee in ("HandlerSpec", "spec") and path.name != "handlers.py":
                assert named, f"{path.relative_to(REPO)}:{call.lineno}: an own handler's order is not a constant " \
                              "of engineflow/declare/orders.py"
            for name in named:
                found.setdefault(name, set()).update(events)
    return found


def test_handler_order_table_is_the_orders_module():
    import inspect

    import engineflow as ef
    from engineflow.declare import orders

    constants = {name: value for name, value in vars(orders).items() if name.isupper() and isinstance(value, int)}
    rows = readme_order_table()
    assert {row["constant"] for row in rows} == set(constants), "every constant has one row, and no row is extra"
    assert len(rows) == len(constants)
    for row in rows:
        assert int(row["order"]) == constants[row["constant"]], row
    used = orders_in_code()
    for row in rows:
        if row["constant"] == "USER":
            assert row["events"] == "any"
            for decorator in (ef.on, ef.every_n_epochs, ef.every_n_iterations):
                assert inspect.signature(decorator).parameters["order"].default == orders.USER
            continue
        listed = {event.strip().strip("`") for event in row["events"].split(",")}
        assert listed == used.get(row["constant"]), f"{row['constant']}: README says {listed}, the code attaches " \
                                                   f"it on {used.get(row['constant'])}"


def test_the_stopping_example_declares_two_early_stoppings_in_the_pipeline_recipe(tmp_path):
    import engineflow as ef

    block = python_block_after("### Stopping")
    recipe = tmp_path / "pretrain_finetune.py"
    recipe.write_text((REPO / "recipes" / "pretrain_finetune.py").read_text() + "\n" + block)
    tools = {tool.name: tool for tool in ef.load_recipe(recipe).tools}
    assert {name: (type(t).__name__, t.stage, t.patience) for name, t in tools.items()} == {
        "early_stopping": ("EarlyStopping", None, 5), "finetune_stop": ("EarlyStopping", "finetune", 3)}


def test_the_activation_statistics_example_runs_in_the_pipeline_recipe(tmp_path, capsys):
    import json

    import engineflow as ef

    recipe = tmp_path / "pretrain_finetune.py"
    recipe.write_text((REPO / "recipes" / "pretrain_finetune.py").read_text() + "\n"
                      + python_block_after("### Activation statistics and hooks"))
    result = ef.run(recipe, check=True, device="cpu", runs_dir=tmp_path / "runs", stream=io.StringIO())
    assert result.status == "completed"
    lines = [json.loads(line) for line in (result.run_dir / "activations.jsonl").read_text().splitlines()]
    # --check: 4 iterations of pretraining, 2 of each stage on the one batch of labelled data; a read-back
    # every 2 of every Linear (the head's from "frozen" on), iterations counted across the stages
    assert [(line["stage"], line["iteration"]) for line in lines if line["layer"] == "encoder.0"] == [
        ("pretrain", 2), ("pretrain", 4), ("frozen", 6), ("finetune", 8)]
    # the decoder, not called after pretraining, has no read-back there
    assert {line["layer"] for line in lines if line["stage"] == "finetune"} == {"encoder.0", "encoder.2", "head"}
    # the encoder's four layers in each of the finetune stage's forward passes: 2 steps, then validation
    printed = capsys.readouterr().out.splitlines()
    assert printed[:8] == ["(50, 128)", "(50, 128)", "(50, 24)", "(50, 24)"] * 2 and len(printed) % 4 == 0
