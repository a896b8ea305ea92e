"""The training state's parts: RNG capture and restore, per-epoch seeding, mid-epoch positioning."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from engineflow.data import TensorLoader
from engineflow.state.components import stateful_components
from engineflow.state.position import EpochData
from engineflow.state.rng import epoch_seed, rng_state, seed_epoch, set_rng_state


def draws() -> tuple:
    return random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(3).tolist()


def test_restored_rng_states_draw_the_same_numbers():
    np.random.standard_normal()  # leaves a cached gaussian: part of NumPy's state
    saved = rng_state()
    first = draws()
    draws()
    set_rng_state(saved)
    assert draws() == first


def test_the_numpy_state_is_saved_as_plain_values():
    state = rng_state()["numpy"]
    assert state[0] == "MT19937" and isinstance(state[1], list) and len(state[1]) == 624
    assert all(type(value) in (str, int, float, list) for value in state)


def test_a_numpy_key_saved_as_an_array_still_restores():
    # earlier versions saved np.random.get_state() as it is
    np.random.seed(11)
    saved = {**rng_state(), "numpy": np.random.get_state()}
    first = draws()
    set_rng_state(saved)
    assert draws() == first


def test_epoch_seeds_are_fixed_per_seed_and_epoch():
    # Resuming a run relies on the same values in every process and every engineflow version.
    assert epoch_seed(0, 1) == 332834979338936117
    assert epoch_seed(0, 2) == 2790873019712557592
    assert epoch_seed(1, 1) == 2159722659576044157
    assert all(0 <= epoch_seed(seed, epoch) < 2**63 - 1 for seed in range(3) for epoch in range(1, 4))


def shuffled_loader() -> DataLoader:
    data = TensorDataset(torch.arange(20))
    return DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator())


def order(loader: DataLoader) -> list[int]:
    return torch.cat([batch for (batch,) in loader]).tolist()


def test_seeding_an_epoch_fixes_the_order_and_the_global_rngs_whatever_came_before():
    loader = shuffled_loader()
    seed_epoch(5, 2, loader)
    expected = order(loader), draws()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    loader.generator.manual_seed(123)
    seed_epoch(5, 2, loader)
    assert (order(loader), draws()) == expected
    seed_epoch(5, 3, loader)
    assert order(loader) != expected[0]


def test_a_resumed_epoch_skips_the_batches_done_then_restores():
    loader = shuffled_loader()
    data = EpochData(loader, seed=4, epoch=lambda: 2)
    full = list(data)
    restored = []
    data.resume_at(2, lambda: restored.append(len(restored)))
    iterator = iter(data)
    assert restored == [], "nothing happens before the first batch is asked for"
    rest = list(iterator)
    assert [b.tolist() for (b,) in rest] == [b.tolist() for (b,) in full[2:]] and restored == [0]
    assert len(list(data)) == len(full) and restored == [0], "the next pass is a whole epoch again"


def test_a_loader_that_positions_itself_is_not_skipped():
    data = EpochData(TensorLoader(torch.arange(12), batch_size=4), seed=0, epoch=lambda: 1)
    assert data.positions_itself
    data.resume_at(2, lambda: None)
    assert len(list(data)) == 3


def test_stateful_components_are_found_by_name_and_inside_dicts():
    model = torch.nn.Linear(2, 2)
    loader = TensorLoader(torch.arange(4), batch_size=2)
    found = stateful_components({"model": model, "loaders": {"train": loader, "valid": [1, 2]}, "cfg": 3})
    assert found == {"model": model, "loaders.train": loader}


def test_a_fit_state_keeps_which_parameters_train(write_recipe):
    import engineflow as ef
    from tests.conftest import BASE_RECIPE

    fit, _, _ = ef.build(write_recipe(BASE_RECIPE))
    model = fit.components["model"]
    model.weight.requires_grad_(False)  # frozen part-way, as a fine-tuning recipe does
    state = fit.state_dict()
    model.weight.requires_grad_(True)
    model.bias.requires_grad_(False)
    fit.load_state_dict(state)
    assert [p.requires_grad for p in model.parameters()] == [False, True]


def test_the_running_loss_goes_on_from_a_checkpoint_at_an_epochs_end(write_recipe):
    """The progress line's running loss is an average over epochs: a resume from an epoch's end keeps
    it (and the next epoch's sums start anew, as they would have)."""
    import engineflow as ef
    from tests.conftest import BASE_RECIPE

    recipe = write_recipe(BASE_RECIPE)
    fit, _, _ = ef.build(recipe)
    fit.run(1)
    state = fit.state_dict()
    assert fit.position() == {"epochs_completed": 1, "batches_in_epoch": 0} and fit.loss.running is not None
    resumed, _, _ = ef.build(recipe)
    resumed.load_state_dict(state)
    assert resumed.loss.running == fit.loss.running
    fit.run(2)
    resumed.run(2)
    assert resumed.loss.running == fit.loss.running
    assert resumed.history[-1]["train/loss"] == fit.history[-1]["train/loss"]
