"""TensorLoader: batches, epochs' orders, resumable state, and use as an engine's loader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from engineflow.data import TensorLoader
from engineflow.declare.steps import StepSpec
from engineflow.execute.engine import make_engine


def ids(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose single feature is the sample's index, and the index as target."""
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)


def epoch_ids(loader: TensorLoader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_per_epoch(shuffle: bool) -> None:
    loader = TensorLoader(*ids(10), batch_size=3, shuffle=shuffle, seed=1)
    for _ in range(3):
        assert sorted(epoch_ids(loader)) == list(range(10))


def test_rows_stay_together() -> None:
    loader = TensorLoader(*ids(10), batch_size=4, shuffle=True, seed=0)
    for x, y in loader:
        assert torch.equal(x.squeeze(1).long(), y)


def test_uneven_last_batch() -> None:
    loader = TensorLoader(*ids(10), batch_size=4)
    assert len(loader) == 3
    assert [len(y) for _, y in loader] == [4, 4, 2]
    assert epoch_ids(loader) == list(range(10))


def test_drop_last() -> None:
    loader = TensorLoader(*ids(10), batch_size=4, shuffle=True, drop_last=True, seed=0)
    assert len(loader) == 2
    seen = epoch_ids(loader)
    assert len(seen) == 8 and len(set(seen)) == 8


def test_single_tensor_yields_tensors() -> None:
    x, _ = ids(5)
    batches = list(TensorLoader(x, batch_size=2))
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert [len(b) for b in batches] == [2, 2, 1]


def test_same_seed_same_orders() -> None:
    a = TensorLoader(*ids(50), batch_size=8, shuffle=True, seed=7)
    b = TensorLoader(*ids(50), batch_size=8, shuffle=True, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part once the seed is set
    assert [epoch_ids(a) for _ in range(3)] == [epoch_ids(b) for _ in range(3)]


def test_different_seeds_and_epochs_give_different_orders() -> None:
    loader = TensorLoader(*ids(50), batch_size=8, shuffle=True, seed=7)
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert first != second
    assert epoch_ids(TensorLoader(*ids(50), batch_size=8, shuffle=True, seed=8)) != first


def test_default_seed_follows_torch_manual_seed() -> None:
    torch.manual_seed(0)
    a = TensorLoader(*ids(50), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    b = TensorLoader(*ids(50), batch_size=8, shuffle=True)
    assert a.seed == b.seed
    assert epoch_ids(a) == epoch_ids(b)


def test_an_ordered_loader_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    TensorLoader(*ids(10), batch_size=4)
    assert torch.equal(torch.rand(3), expected)


def test_unshuffled_batches_are_views() -> None:
    x, y = ids(10)
    first = next(iter(TensorLoader(x, y, batch_size=4)))[0]
    assert first.data_ptr() == x.data_ptr()


def test_state_dict_round_trip_between_epochs() -> None:
    loader = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=3)
    epoch_ids(loader)
    state = loader.state_dict()
    assert state == {"seed": 3, "epoch": 1, "batch": 0}
    expected = [epoch_ids(loader) for _ in range(2)]

    resumed = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=99)
    resumed.load_state_dict(state)
    assert resumed.seed == 3
    assert [epoch_ids(resumed) for _ in range(2)] == expected


def test_state_dict_resumes_mid_epoch() -> None:
    loader = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=3)
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    assert state == {"seed": 3, "epoch": 0, "batch": 2}
    rest = [y.tolist() for _, y in batches]

    resumed = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert [y.tolist() for _, y in resumed] == rest
    assert resumed.state_dict() == {"seed": 3, "epoch": 1, "batch": 0}


def test_a_pass_stopped_early_still_ends_its_epoch() -> None:
    loader = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=3)
    reference = TensorLoader(*ids(20), batch_size=6, shuffle=True, seed=3)
    next(iter(loader))  # peek at one batch
    reference.set_epoch(1)
    assert epoch_ids(loader) == epoch_ids(reference)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"batch_size": 2}, "at least one tensor"),
        ((torch.zeros(3), torch.zeros(4)), {"batch_size": 2}, "same number of samples"),
        (([1, 2, 3],), {"batch_size": 2}, "torch.as_tensor"),
        ((torch.zeros(3),), {"batch_size": 0}, "batch_size"),
        ((torch.zeros(3),), {"batch_size": 2, "seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_say_what_to_do(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TensorLoader(*args, **kwargs)


def test_load_state_dict_needs_seed_and_epoch() -> None:
    with pytest.raises(ValueError, match="state_dict"):
        TensorLoader(torch.zeros(3), batch_size=2).load_state_dict({"epoch": 1})


def test_trains_like_a_dataloader_on_an_engine() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    seen: list[list[int]] = []

    def train(batch: tuple[torch.Tensor, torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        xb, yb = batch
        seen.append(yb.tolist())
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    def fit(loader: object) -> torch.nn.Module:
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        make_engine(StepSpec("train", train), {"model": model, "optimizer": optimizer}).run(loader, max_epochs=3)
        return model

    with_tensors = fit(TensorLoader(x, y, batch_size=4))
    with_dataloader = fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert len(seen) == 18 and seen[:9] == seen[9:]  # 3 batches x 3 epochs, same batches
    for a, b in zip(with_tensors.parameters(), with_dataloader.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_engine_epochs_follow_the_loader_epochs() -> None:
    loader = TensorLoader(*ids(10), batch_size=4, shuffle=True, seed=5)
    reference = TensorLoader(*ids(10), batch_size=4, shuffle=True, seed=5)
    seen: list[int] = []

    def record(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        seen.extend(batch[1].tolist())
        return {"loss": 0.0}

    engine = make_engine(StepSpec("train", record), {})
    engine.run(loader, max_epochs=3)
    assert seen == [i for _ in range(3) for i in epoch_ids(reference)]
    assert loader.state_dict() == {"seed": 5, "epoch": 3, "batch": 0}
