"""Pretrain an autoencoder on digits without labels, then finetune a classifier on 50 labelled ones.

scikit-learn's 8x8 digits (no download), split 70/15/15 as recipes/digits.py splits them. Five stages:

1. ``pretrain``: a denoising autoencoder (pixels masked at random) learns to reconstruct every
   training image; the labels are not used.
2. ``frozen``: a new classifier head on the frozen encoder, trained on the first ``labels`` training
   images (the labelled budget).
3. ``finetune``: the encoder unfrozen, everything trained on the same budget at a lower rate.
4. ``test``: the classifier's accuracy on the test split.
5. ``predict``: class predictions for the test split, written to the run folder.

With the defaults, on each of seeds 0-4, the finetuned classifier reaches a higher validation
accuracy than the same classifier trained from scratch on the same 50 images for the same 150
epochs (``--set pretrained=false``); ``python -m benchmarks.pretraining`` measures both, and
benchmarks/README.md has the figures. The denoising (masked pixels) and the tanh code matter: a
plain autoencoder's features did not beat training from scratch. With 100 labels the gain shrinks
to about what a tuned baseline closes (digits is nearly linearly separable).

    engineflow run recipes/pretrain_finetune.py
    engineflow run recipes/pretrain_finetune.py --set pretrained=false --set pretrain_epochs=1   # from scratch
    engineflow run recipes/pretrain_finetune.py --stage finetune --from last --set finetune_lr=0.001
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engineflow as ef

config = ef.config(
    labels=50, hidden=128, code=24, mask=0.3,
    pretrain_epochs=50, pretrain_lr=0.01, pretrain_batch=128,
    frozen_epochs=50, frozen_lr=0.03,
    finetune_epochs=100, finetune_lr=0.001,
    pretrained=True, scratch_lr=0.003, threads=1, seed=0,
)

# every epoch of the small stages would be a checkpoint and a validation: a tenth of them is enough
checkpoints = ef.checkpoints(every_epochs=10)


def load_splits(seed):
    """70% train, 15% valid, 15% test, split by a fixed permutation (as recipes/digits.py)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_valid = int(0.7 * len(x)), int(0.15 * len(x))
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def make_encoder(cfg):
    return nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.code), nn.Tanh())


def setup(cfg):
    if cfg.threads:
        # networks this small gain nothing from parallel kernels; on a busy machine threads cost
        torch.set_num_threads(cfg.threads)
    splits = load_splits(cfg.seed)
    x, y = splits["train"]
    shuffle = torch.Generator().manual_seed(cfg.seed)
    loaders = {
        "train": DataLoader(TensorDataset(x, y), batch_size=cfg.pretrain_batch, shuffle=True, generator=shuffle),
        # the labelled budget: one batch of the first `labels` training images
        "labelled": DataLoader(TensorDataset(x[:cfg.labels], y[:cfg.labels]), batch_size=cfg.labels),
        "valid": DataLoader(TensorDataset(*splits["valid"]), batch_size=512),
        "test": DataLoader(TensorDataset(*splits["test"]), batch_size=512),
    }
    encoder = make_encoder(cfg)
    decoder = nn.Sequential(nn.Linear(cfg.code, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 64))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=cfg.pretrain_lr)
    return dict(encoder=encoder, decoder=decoder, optimizer=optimizer, loaders=loaders)


@ef.train_step
def reconstruct(batch, encoder, decoder, optimizer, cfg):
    """Denoising: reconstruct each image from a copy with a share `mask` of its pixels set to 0."""
    x, _ = batch
    kept = (torch.rand_like(x) >= cfg.mask).float()
    loss = F.mse_loss(decoder(encoder(x * kept)), x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@ef.eval_step(metrics={"mse": ef.metrics.MeanSquaredError()}, every=10)
def reconstruction(batch, encoder, decoder):
    x, _ = batch
    return {"y_pred": decoder(encoder(x)), "y": x}


def freeze_encoder(encoder, cfg):
    """Stage "frozen": a new classifier head on the frozen pretrained encoder."""
    head = nn.Linear(cfg.code, 10)
    if not cfg.pretrained:  # the baseline: the same classifier from a fresh encoder, all of it training
        fresh = make_encoder(cfg)
        encoder.load_state_dict(fresh.state_dict())
        return {"head": head, "optimizer": torch.optim.Adam([*encoder.parameters(), *head.parameters()],
                                                            lr=cfg.scratch_lr)}
    encoder.requires_grad_(False)
    return {"head": head, "optimizer": torch.optim.Adam(head.parameters(), lr=cfg.frozen_lr)}


def unfreeze_encoder(encoder, head, optimizer, cfg):
    """Stage "finetune": everything trains, at a lower learning rate."""
    if not cfg.pretrained:
        return None  # the baseline goes on as it started
    encoder.requires_grad_(True)
    return {"optimizer": torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=cfg.finetune_lr)}


@ef.train_step
def classify(batch, encoder, head, optimizer):
    x, y = batch
    loss = F.cross_entropy(head(encoder(x)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss}


@ef.eval_step(metrics={"accuracy": ef.metrics.Accuracy(), "loss": ef.metrics.Loss(F.cross_entropy)},
              main_metric="valid/accuracy", every=10)
def evaluate(batch, encoder, head):
    x, y = batch
    return {"y_pred": head(encoder(x)), "y": y}


@ef.infer_step
def predict(x, encoder, head):
    """The class of each image."""
    return head(encoder(x)).argmax(-1)


stages = [
    ef.stage("pretrain", train=reconstruct, eval=reconstruction, epochs="pretrain_epochs",
             loaders={"train": "train", "valid": "valid"}),
    ef.stage("frozen", train=classify, eval=evaluate, epochs="frozen_epochs", prepare=freeze_encoder,
             loaders={"train": "labelled", "valid": "valid"}),
    ef.stage("finetune", train=classify, eval=evaluate, epochs="finetune_epochs", prepare=unfreeze_encoder,
             loaders={"train": "labelled", "valid": "valid"}),
    ef.stage("test", eval=evaluate),
    ef.stage("predict", infer=predict, loaders={"test": "test"}),
]
