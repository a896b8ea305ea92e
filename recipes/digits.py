"""Classify 8x8 handwritten digits (the UCI set that scikit-learn ships; no download).

    engineflow run recipes/digits.py
    engineflow run recipes/digits.py --set hidden=256 --set lr=0.1
    engineflow test recipes/digits.py                      # the latest run on the test split
    engineflow eval recipes/digits.py images/ preds.csv    # .npy images of 8x8 pixels, values 0-16
    engineflow sweep recipes/digits.py --trials 12         # search the space below with Optuna
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engineflow as ef

config = ef.config(epochs=20, batch_size=64, lr=0.05, momentum=0.9, hidden=128, dropout=0.1, seed=0)
# engineflow sweep's search space: config keys to ranges
space = {"lr": ef.search.loguniform(1e-3, 0.5), "momentum": ef.search.uniform(0.5, 0.99),
         "hidden": ef.search.choice(32, 64, 128, 256), "dropout": ef.search.uniform(0.0, 0.5)}


def load_splits(seed: int) -> dict[str, TensorDataset]:
    """70% train, 15% valid, 15% test, split by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_valid = int(0.7 * len(x)), int(0.15 * len(x))
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}


def setup(cfg):
    """Build what the steps need; engineflow hands these to the steps by parameter name."""
    splits = load_splits(0)  # one split for every seed: runs of other seeds (a sweep's trials) compare
    loaders = {
        "train": DataLoader(splits["train"], batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed)),
        "valid": DataLoader(splits["valid"], batch_size=256),
        "test": DataLoader(splits["test"], batch_size=256),
    }
    model = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return dict(model=model, optimizer=optimizer, loaders=loaders)


@ef.train_step
def train(batch, model, optimizer):
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@ef.eval_step(
    metrics={"accuracy": ef.metrics.Accuracy(), "loss": ef.metrics.Loss(F.cross_entropy)},
    main_metric="valid/accuracy",
)
def evaluate(batch, model):
    x, y = batch
    return {"y_pred": model(x), "y": y}


@ef.infer_step
def predict(x, model):
    """Class probabilities for a batch of flattened, scaled images."""
    return model(x).softmax(-1)


def load_sample(path):
    """One image for `engineflow eval`: an .npy array of 8x8 (or 64) pixel values in 0-16."""
    pixels = np.load(path, allow_pickle=False)
    if pixels.size != 64:
        raise ValueError(f"expected 8x8 = 64 pixel values, got shape {pixels.shape}")
    return torch.tensor(pixels, dtype=torch.float32).reshape(64) / 16.0
