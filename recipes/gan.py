"""A GAN on a 2-D toy distribution: two models, two optimizers, one train step (no download).

The real data is a mixture of 8 Gaussians on a ring (radius 2, standard deviation 0.15), drawn
from a random number generator seeded with the run's seed. The generator maps 8-D noise to
points; the discriminator tells real points from generated ones. The train step updates both and
returns ``{"g_loss", "d_loss"}``, which engineflow checks, averages and logs as ``train/g_loss``
and ``train/d_loss``.

Each validation compares the generator's points for fixed noise with held-out real points:

- ``mmd``: maximum mean discrepancy between generated and real points (an RBF kernel); the main
  metric, lower is better. It falls only when the points both land on the modes and spread over
  all of them. An untrained generator scores about 1, two independent real samples about 0.04.
- ``modes``: how many of the 8 modes the generator covers (at least a quarter of its share of the
  points within 3 standard deviations of the mode's centre); a collapsed GAN covers few.
- ``quality``: the share of generated points within 3 standard deviations of some mode (real
  points: 0.99).

With the default config the best epoch reaches ``valid/mmd`` below 0.12, covers all 8 modes and
puts at least 70% of its points within 3 standard deviations of one (``tests/test_recipes.py``).

    engineflow run recipes/gan.py
    engineflow test recipes/gan.py                         # the best generator on fresh real points
    engineflow eval recipes/gan.py noise/ points.csv       # .npy or .csv files of 8 noise values each

From Python, ``ef.load_run("last").components["generator"]`` is the trained generator.
"""

import math

import torch
import torch.nn.functional as F
from ignite.exceptions import NotComputableError
from torch import nn

import engineflow as ef
from engineflow.data import TensorLoader

# The distribution is fixed: the metrics below are declared with it, before any config exists.
MODES, RADIUS, STD = 8, 2.0, 0.15

config = ef.config(epochs=20, batch_size=128, lr=2e-3, hidden=64, latent=8, samples=8192, threads=1, seed=0)


def centres() -> torch.Tensor:
    """The ``(MODES, 2)`` centres of the mixture, evenly spaced on the ring."""
    angles = 2 * math.pi * torch.arange(MODES, dtype=torch.float32) / MODES
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def real_points(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the mixture: a uniformly chosen mode each, plus Gaussian noise."""
    mode = torch.randint(0, MODES, (n,), generator=generator)
    return centres()[mode] + STD * torch.randn(n, 2, generator=generator)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, outputs))


def setup(cfg):
    if cfg.threads:
        # Networks this small gain nothing from parallel kernels, and on a busy machine their threads
        # wait for each other many times longer than the work takes. 0 keeps torch's setting.
        torch.set_num_threads(cfg.threads)
    data = torch.Generator().manual_seed(cfg.seed)
    train = real_points(cfg.samples, data)
    # Validation and test pair real points with fixed noise, so every evaluation of one generator
    # draws the same generated points and takes nothing from the RNGs that training uses.
    held_out = {name: (real_points(1024, data), torch.randn(1024, cfg.latent, generator=data))
                for name in ("valid", "test")}
    generator, discriminator = mlp(cfg.latent, cfg.hidden, 2), mlp(2, cfg.hidden, 1)
    # beta1 = 0.5, as is usual for GANs: with 0.9 the momentum carries each player past the other's moves.
    return dict(
        generator=generator,
        discriminator=discriminator,
        g_optimizer=torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999)),
        d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999)),
        loaders={"train": TensorLoader(train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed),
                 **{name: TensorLoader(*tensors, batch_size=1024) for name, tensors in held_out.items()}},
    )


@ef.train_step
def train(batch, generator, discriminator, g_optimizer, d_optimizer, cfg):
    real = batch
    # The noise comes from torch's global RNG, which engineflow seeds per epoch and checkpoints.
    fake = generator(torch.randn(len(real), cfg.latent))
    ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

    d_loss = (F.binary_cross_entropy_with_logits(discriminator(real), ones)
              + F.binary_cross_entropy_with_logits(discriminator(fake.detach()), zeros))
    d_optimizer.zero_grad()  # also drops what the last g_loss.backward() left on the discriminator
    d_loss.backward()
    d_optimizer.step()

    # The non-saturating generator loss: "make the discriminator call these real".
    g_loss = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
    g_optimizer.zero_grad()
    g_loss.backward()
    g_optimizer.step()
    return {"g_loss": g_loss, "d_loss": d_loss}


# Metrics: each compares all the generated points of a loader with all its real points --------------

def mmd(generated: torch.Tensor, real: torch.Tensor, bandwidth: float = 0.5) -> float:
    """Maximum mean discrepancy with an RBF kernel: 0 for equal sets of points.

    The bandwidth lies between a mode's width and the distance between modes, so the kernel tells
    a point on a mode from one between modes, and one mode from the next.
    """
    points = torch.cat([generated, real])
    kernel = torch.exp(torch.cdist(points, points).square() / (-2 * bandwidth**2))
    n = len(generated)
    # The biased estimate: a squared norm, so never negative but for rounding.
    squared = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()
    return squared.clamp(min=0).sqrt().item()


def near_modes(generated: torch.Tensor) -> torch.Tensor:
    """For each point, the index of the mode it lies within 3 standard deviations of, or -1."""
    distance, mode = torch.cdist(generated, centres()).min(dim=1)
    return torch.where(distance < 3 * STD, mode, -1)


def modes_covered(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Modes holding at least a quarter of their share of the points (the real ones are not needed)."""
    counts = torch.bincount(near_modes(generated) + 1, minlength=MODES + 1)[1:]
    return float((counts >= len(generated) / MODES / 4).sum())


def quality(generated: torch.Tensor, real: torch.Tensor) -> float:
    """The share of points within 3 standard deviations of some mode."""
    return (near_modes(generated) >= 0).float().mean().item()


class PointSets(ef.metrics.Metric):
    """``score(generated, real)`` on every point of a loader; ``y_pred`` is generated, ``y`` real."""

    def __init__(self, score):
        self.score = score
        super().__init__()

    def reset(self):
        self._generated, self._real = [], []

    def update(self, output):
        generated, real = output
        self._generated.append(generated.detach())
        self._real.append(real.detach())

    def compute(self):
        if not self._generated:
            raise NotComputableError("no points to compare")
        return self.score(torch.cat(self._generated), torch.cat(self._real))


@ef.eval_step(metrics={"mmd": PointSets(mmd), "modes": PointSets(modes_covered), "quality": PointSets(quality)},
              main_metric="valid/mmd", mode="min")
def evaluate(batch, generator):
    real, noise = batch
    return {"y_pred": generator(noise), "y": real}


@ef.infer_step
def sample(noise, generator):
    """Generated points for a batch of noise vectors (``cfg.latent`` values each)."""
    return generator(noise)
