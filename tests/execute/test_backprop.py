"""Step options at run time: accumulation, clipping, mixed precision, the grad scaler, exact resume
mid-accumulation, and the errors of a step that does not honour them."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import engineflow as ef
from engineflow.errors import RecipeError
from tests.recipes import IMPORTS

# 40 samples in batches of 8: 5 batches an epoch. The model, its optimizer and loss_fn for the default step.
SETUP = IMPORTS + '''
config = ef.config(epochs=1, lr=0.1, accumulate=4, samples=40, batch_size=8, seed=0, clip=0.0)

def setup(cfg):
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.randn(cfg.samples, 4, generator=gen), torch.randint(0, 2, (cfg.samples,), generator=gen)
    model = torch.nn.Linear(4, 2)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9),
                loss_fn=F.cross_entropy, data=(x, y),
                loaders={"train": DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)})
'''

HAND_WRITTEN = (SETUP + '''
@ef.train_step(accumulate="accumulate", precision="precision")
def train(batch, model, optimizer, backprop):
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out, y)
    backprop(loss, optimizer)
    return {"loss": loss, "forward": str(out.dtype)}
''').replace("clip=0.0)", "clip=0.0, precision='32')")

DEFAULT_STEP = SETUP + '''
train = ef.supervised_train_step(accumulate="accumulate")
'''


def _watch(fit):
    """Each iteration's gradient (as ITERATION_COMPLETED handlers see it), weight and ``stepped``."""
    seen = []

    @ef.on(ef.Events.ITERATION_COMPLETED, engine=fit.train)
    def note(model, backprop):
        seen.append((model.weight.grad.clone(), model.weight.detach().clone(), backprop.stepped))

    return seen


@pytest.mark.parametrize("recipe", [HAND_WRITTEN, DEFAULT_STEP], ids=["hand-written", "default-step"])
def test_four_batches_of_8_accumulated_give_the_gradient_of_one_batch_of_32(write_recipe, recipe):
    fit, _, _ = ef.build(write_recipe(recipe))
    model = fit.components["model"]
    start = copy.deepcopy(model)
    x, y = fit.components["data"]
    F.cross_entropy(start(x[:32]), y[:32]).backward()
    seen = _watch(fit)
    fit.run(1)
    # 5 batches: a group of 4 steps, then the epoch's last batch steps on its own
    assert [s for _, _, s in seen] == [False, False, False, True, True]
    assert all(torch.equal(w, start.weight) for _, w, _ in seen[:3]), "no step before the group ends"
    grad, weight, _ = seen[3]
    assert torch.allclose(grad, start.weight.grad, atol=1e-6, rtol=0), (grad - start.weight.grad).abs().max()
    assert not torch.equal(weight, start.weight)


def test_clipping_by_norm_bounds_the_norm_and_by_value_each_element(write_recipe):
    recipe = SETUP + '''
@ef.train_step(clip_norm="clip")
def train(batch, model, optimizer, backprop):
    x, y = batch
    loss = 100 * F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return loss
'''
    fit, _, _ = ef.build(write_recipe(recipe), {"clip": 0.01})
    norms = []
    fit.train.add_event_handler(ef.Events.ITERATION_COMPLETED, lambda _: norms.append(
        torch.nn.utils.get_total_norm([p.grad for p in fit.components["model"].parameters()]).item()))
    fit.run(1)
    assert len(norms) == 5 and max(norms) <= 0.01 + 1e-6
    unclipped = F.cross_entropy(fit.components["model"](fit.components["data"][0]), fit.components["data"][1])
    assert torch.autograd.grad(100 * unclipped, fit.components["model"].weight)[0].norm() > 0.1  # it did clip

    values = []
    fit, _, _ = ef.build(write_recipe(recipe.replace('clip_norm="clip"', "clip_value=0.001")))
    fit.train.add_event_handler(ef.Events.ITERATION_COMPLETED, lambda _: values.append(
        max(p.grad.abs().max().item() for p in fit.components["model"].parameters())))
    fit.run(1)
    assert max(values) == pytest.approx(0.001)


def test_fp16_on_cpu_trains_with_a_grad_scaler_whose_state_is_in_the_checkpoint(write_recipe):
    fit, _, _ = ef.build(write_recipe(HAND_WRITTEN), {"precision": "fp16", "accumulate": 1})
    backprop = fit.parts["backprop"]
    assert isinstance(backprop.scaler, torch.amp.GradScaler) and backprop.scaler.is_enabled()
    before = fit.components["model"].weight.detach().clone()
    dtypes = []

    @ef.on(ef.Events.ITERATION_COMPLETED, engine=fit.train)
    def note(output):
        dtypes.append(output["forward"])

    fit.run(2)
    assert not torch.equal(fit.components["model"].weight, before)
    assert torch.isfinite(fit.components["model"].weight).all()
    state = fit.state_dict()["parts"]["backprop"]
    assert state["scaler"]["scale"] == backprop.scaler.get_scale() and "_growth_tracker" in state["scaler"]
    assert state["position"] == 0
    assert dtypes == ["torch.float16"] * 10, "the step's forward ran under autocast"


def test_bf16_runs_the_step_under_autocast_without_a_call(write_recipe):
    recipe = SETUP + '''
@ef.train_step(precision="bf16")
def train(batch, model, optimizer):
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss, "dtype": str(out.dtype)}
'''
    fit, _, _ = ef.build(write_recipe(recipe))
    fit.run(1)
    assert fit.train.state.output["dtype"] == "torch.bfloat16"
    assert fit.parts["backprop"].stepped is True


def test_a_state_taken_mid_accumulation_continues_bit_for_bit(write_recipe):
    recipe = write_recipe(HAND_WRITTEN.replace("precision='32'", "precision='fp16'"))
    overrides = {"epochs": 2, "accumulate": 3}
    unbroken, _, _ = ef.build(recipe, overrides)
    unbroken.run(2)

    first, _, _ = ef.build(recipe, overrides)
    taken = {}

    @ef.on(ef.Events.ITERATION_COMPLETED, engine=first.train)
    def take(state):
        if state.iteration == 7:  # epoch 2, batch 2: two batches into its group of 3
            taken.update(first.state_dict())
            raise ef.StopFit

    first.run(2)
    assert taken["parts"]["backprop"]["position"] == 2
    assert taken["rank_parts"]["gradients"], "the gradients added up so far are saved"
    again, _, _ = ef.build(recipe, overrides)
    again.load_state_dict(taken)
    again.run(2)
    for name, value in unbroken.components["model"].state_dict().items():
        assert torch.equal(value, again.components["model"].state_dict()[name]), name
    opt_a, opt_b = unbroken.components["optimizer"].state_dict(), again.components["optimizer"].state_dict()
    assert all(torch.equal(opt_a["state"][k]["momentum_buffer"], opt_b["state"][k]["momentum_buffer"])
               for k in opt_a["state"])
    assert unbroken.parts["backprop"].state_dict() == again.parts["backprop"].state_dict()


def test_a_step_that_never_calls_backprop_while_its_options_need_it_is_an_error_naming_it(write_recipe):
    recipe = SETUP + '''
@ef.train_step(accumulate=2)
def train(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
'''
    fit, _, _ = ef.build(write_recipe(recipe))
    with pytest.raises(RecipeError, match=r"train step 'train' .* never called backprop\(loss, optimizer\), which "
                                          r"its options need \(accumulate=2\)"):
        fit.run(1)
    assert fit.train.state.iteration == 1


@pytest.mark.parametrize("options, message", [
    ({"precision": 16}, "precision= expects one of '32', 'bf16', 'fp16' or the name of a config key"),
    ({"accumulate": 0}, "accumulate= expects a whole number of batches >= 1"),
    ({"clip_norm": 1.0, "clip_value": 1.0}, "give clip_norm= or clip_value=, not both"),
    ({"clip_norm": -1}, "clip_norm= expects a number > 0"),
    ({"compile": "yes"}, "compile= expects True, False or a dict"),
])
def test_bad_options_name_the_step(options, message):
    def train(batch):
        return batch

    with pytest.raises(RecipeError, match=rf"@ef.train_step of .*train.*: {message}") as caught:
        ef.train_step(**options)(train)
    assert "\n" not in str(caught.value)
    with pytest.raises(RecipeError, match=rf"stage 'tune': {message}"):
        ef.stage("tune", train=ef.train_step(train), **options)


def test_a_precision_that_is_neither_a_value_nor_a_config_key_is_refused_when_the_fit_is_built(write_recipe):
    recipe = write_recipe(HAND_WRITTEN.replace('precision="precision"', 'precision="fp8"'))
    with pytest.raises(RecipeError, match=r"train step 'train' \(.*recipe.py:\d+\): precision= expects one of '32', "
                                          r"'bf16', 'fp16' or the name of a config key; 'fp8' is not a key"):
        ef.build(recipe)
    with pytest.raises(RecipeError, match=r"precision must be one of '32', 'bf16', 'fp16', got 'fp8'"):
        ef.build(write_recipe(HAND_WRITTEN), {"precision": "fp8"})


def test_a_step_with_options_is_still_callable_with_a_backprop_of_its_own():
    @ef.train_step(precision="fp16", accumulate=4)
    def train(batch, model, optimizer, backprop):
        loss = model(batch).float().pow(2).mean()  # the loss in float32, as GradScaler wants
        backprop(loss, optimizer)
        return loss

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bp = ef.backprop(precision="fp16", accumulate=4)
    before = model.weight.detach().clone()
    for _ in range(3):
        with bp.iteration():
            train(torch.full((2, 3), 0.01), model, optimizer, bp)
        assert not bp.stepped and torch.equal(model.weight, before)
    with bp.iteration():
        train(torch.full((2, 3), 0.01), model, optimizer, bp)
    assert bp.stepped and not torch.equal(model.weight, before) and bp.position == 0


# Two processes: 64 samples in batches of 4 (8 batches a rank, in order); the step counts DDP's all-reduces.
ON_TWO = SETUP.replace("samples=40, batch_size=8", "samples=64, batch_size=4") + '''
ALL_REDUCES = []

def counted(state, bucket):
    ALL_REDUCES.append(bucket.index())
    work = torch.distributed.all_reduce(bucket.buffer().div_(torch.distributed.get_world_size()), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])

@ef.train_step(accumulate="accumulate")
def train(batch, model, optimizer, backprop):
    if not ALL_REDUCES and not getattr(model, "counted", False):
        model.register_comm_hook(None, counted)
        model.counted = True
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    backprop(loss, optimizer)
    return {"loss": loss, "all_reduces": len(ALL_REDUCES)}
'''


def _one_of_two(rank, store, recipe, results):
    import torch.distributed as dist

    from engineflow.runtime import RunContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        context = RunContext("two", "recipe", store.parent, torch.device("cpu"), 0, rank=rank, world_size=2)
        fit, _, _ = ef.build(recipe, context=context)
        start = {k: v.clone() for k, v in fit.components["model"].state_dict().items()}
        seen = _watch(fit)
        fit.run(1)
        # pickled here: a queue would share the tensors' memory with a process that is about to end
        results.put(pickle.dumps((rank, start, [(g, s) for g, _, s in seen], fit.train.state.output["all_reduces"])))
    except BaseException as err:
        results.put(pickle.dumps((rank, None, repr(err), None)))
        raise
    finally:
        dist.destroy_process_group()


def test_on_two_processes_accumulation_all_reduces_once_a_group_and_gives_the_gradient_of_every_sample(
        write_recipe, tmp_path):
    import multiprocessing

    recipe = write_recipe(ON_TWO)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_one_of_two, args=(rank, tmp_path / "store", recipe, results))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    got = {r[0]: r[1:] for r in (pickle.loads(results.get(timeout=120)) for _ in workers)}
    for worker in workers:
        worker.join(timeout=60)
    assert all(start is not None for start, _, _ in got.values()), got
    start, _, _ = got[0]
    model = torch.nn.Linear(4, 2)
    model.load_state_dict(start)
    fit, _, _ = ef.build(recipe)  # the same data, on one process
    x, y = fit.components["data"]
    F.cross_entropy(model(x[:32]), y[:32]).backward()  # the first group: 4 batches of 4 samples on each rank
    for rank, (_, seen, all_reduces) in got.items():
        assert [stepped for _, stepped in seen] == [False, False, False, True] * 2
        assert torch.allclose(seen[3][0], model.weight.grad, atol=1e-6, rtol=0), rank
        # one bucket, all-reduced once a group: without no_sync every backward would all-reduce (8)
        assert all_reduces == 2, rank


def test_channels_last_converts_the_modules_and_the_default_step_s_inputs(write_recipe):
    recipe = IMPORTS + '''
config = ef.config(epochs=1, seed=0)

def setup(cfg):
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 2, (4,))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(18, 2))
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                loaders={"train": DataLoader(TensorDataset(x, y), batch_size=2)})

def forward(model, x):
    assert x.is_contiguous(memory_format=torch.channels_last)
    return model(x)

train = ef.supervised_train_step(forward=forward, channels_last=True)
'''
    fit, _, _ = ef.build(write_recipe(recipe))
    conv = fit.components["model"][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fit.components["optimizer"].param_groups[0]["params"][0] is conv.weight
    fit.run(1)
    assert fit.train.state.iteration == 2


def test_compile_gives_the_step_compiled_modules_and_checkpoints_keep_their_keys(write_recipe):
    from tests.conftest import BASE_RECIPE

    # dynamo traces the step's modules; the eager backend spares this test inductor's code generation
    recipe = BASE_RECIPE.replace("@ef.train_step\n", "@ef.train_step(compile={'backend': 'eager'})\n").replace(
        "    x, y = batch\n", "    x, y = batch\n    assert type(model).__name__ == 'OptimizedModule'\n", 1)
    fit, _, _ = ef.build(write_recipe(recipe))
    fit.run(1)
    assert sorted(fit.state_dict()["components"]["model"]) == ["bias", "weight"]
    plain, _, _ = ef.build(write_recipe(BASE_RECIPE, "plain.py"))
    plain.run(1)  # the compiled step trained the components' own parameters, as the plain step does
    for name, tensor in plain.components["model"].state_dict().items():
        assert torch.equal(fit.components["model"].state_dict()[name], tensor), name
