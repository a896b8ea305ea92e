"""``recipes/digits.py`` written as a plain PyTorch script: the end-to-end benchmark's baseline.

The same split, model, optimizer, seed, epochs and per-epoch validation (accuracy and loss) as the
recipe, and the same epoch lines on stdout; no run folder. ``--loader tensor`` swaps the
``DataLoader``s for engineflow's ``TensorLoader`` (which imports torch only, not Ignite).

    python benchmarks/digits_raw.py [--epochs 20] [--loader dataloader|tensor]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS, BATCH_SIZE, LR, MOMENTUM, HIDDEN, DROPOUT, SEED = 20, 64, 0.05, 0.9, 128, 0.1, 0


def load_splits(seed: int) -> dict[str, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_valid = int(0.7 * len(x)), int(0.15 * len(x))
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}


def loaders(kind: str, splits: dict[str, TensorDataset]) -> tuple[object, object]:
    if kind == "tensor":
        from engineflow.data import TensorLoader

        return (TensorLoader(*splits["train"].tensors, batch_size=BATCH_SIZE, shuffle=True, seed=SEED),
                TensorLoader(*splits["valid"].tensors, batch_size=256))
    return (DataLoader(splits["train"], batch_size=BATCH_SIZE, shuffle=True,
                       generator=torch.Generator().manual_seed(SEED)),
            DataLoader(splits["valid"], batch_size=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--loader", choices=["dataloader", "tensor"], default="dataloader")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    train_loader, valid_loader = loaders(args.loader, load_splits(SEED))
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(HIDDEN, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    best = 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.monotonic()
        model.train()
        total, count = 0.0, 0
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        model.eval()
        correct, loss_sum, seen = 0, 0.0, 0
        with torch.no_grad():
            for x, y in valid_loader:
                logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(F.cross_entropy(logits, y)) * len(y)
                seen += len(y)
        accuracy = correct / seen
        best = max(best, accuracy)
        print(f"epoch {epoch}/{args.epochs}  train/loss {total / count:.4f}  valid/accuracy {accuracy:.4f}  "
              f"valid/loss {loss_sum / seen:.4f}  {time.monotonic() - started:.1f}s", flush=True)
    print(f"best valid/accuracy {best:.4f}")


if __name__ == "__main__":
    main()
