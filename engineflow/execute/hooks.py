"""``ef.hooks``: forward hooks that live as long as a fit, and activation statistics built on them.

A recipe declares them at its top level, under any name (they are toolbox pieces: see
:mod:`engineflow.declare.tools`); each train stage's fit hooks the layers it picks when it starts and
unhooks them when it ends, also when it fails (an exception in a step, a NaN loss, Ctrl-C), so that
no hook outlives its fit. Layers are picked by name pattern, by class, or all leaves (see
:mod:`engineflow.execute.forward_hooks`)::

    stats = ef.hooks.activation_stats(every=50)                      # every leaf layer
    probe = ef.hooks.forward("encoder.*", log_shapes, stage="finetune")

Example:
    >>> import engineflow as ef
    >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})
    >>> stats = ef.hooks.activation_stats(every=2, bins=4, range=(-1.0, 1.0))
    >>> _ = fit.train.attach(*stats.attach(fit))   # what a recipe's top-level declaration does
    >>> _ = fit.run(epochs=1)
    >>> sorted(stats.latest), len(stats.latest["1"]["histogram"])
    (['0', '1', '2', '3', '4'], 4)
    >>> len(fit.components["model"][0]._forward_hooks)    # gone once the fit ended
    0
"""

from __future__ import annotations

from engineflow.execute.activations import ActivationStats
from engineflow.execute.forward_hooks import ForwardHook, HookFn, LayerChoice

__all__ = ["ActivationStats", "ForwardHook", "activation_stats", "forward"]


def activation_stats(modules: LayerChoice = None, *, every: int = 50, window: int = 1, bins: int = 50,
                     range: tuple[float, float] = (-5.0, 5.0), near_zero: float = 1e-3, stage: str | None = None,
                     name: str = "activation_stats") -> ActivationStats:
    """Record, per layer, the mean, std, share of near-zero values and a histogram of its outputs in
    training, read back every ``every`` iterations into TensorBoard and the run's ``activations.jsonl``.

    Args:
        modules: the layers: None for every leaf, a name pattern or a list of them, a class or a tuple of
            classes.
        every: the read-back interval, in the stage's iterations (one host sync then).
        window: how many iterations before each read-back count, the read-back's own included (1 to
            ``every``); the hooks are off in the others, which cost nothing.
        bins: the histogram's equal bins over ``range``.
        range: ``(low, high)`` of the histogram; values outside it count in its first or last bin.
        near_zero: a value counts as near zero when ``abs(value) < near_zero``.
        stage: the one train stage to record, or None for every train stage.
        name: its name among the recipe's toolbox pieces.

    Example:
        >>> import engineflow as ef
        >>> from torch import nn
        >>> ef.hooks.activation_stats(nn.Conv2d, every=100).every
        100
    """
    return ActivationStats(modules, every=every, window=window, bins=bins, range=range, near_zero=near_zero,
                           stage=stage, name=name)


def forward(modules: LayerChoice, fn: HookFn, *, stage: str | None = None, name: str | None = None) -> ForwardHook:
    """Hook ``fn`` (torch's forward hook: ``fn(module, inputs, output)``, which may return a new output)
    on the layers ``modules`` picks, while each fit of a train stage runs: on every forward call,
    validation's too (``module.training`` tells them apart); removed when the fit ends or fails.

    Args:
        modules: the layers: None for every leaf, a name pattern or a list of them, a class or a tuple of
            classes.
        fn: the hook.
        stage: the one train stage to hook, or None for every train stage.
        name: its name among the recipe's toolbox pieces (default ``forward_hook.<fn's name>``).

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})
        >>> shapes = set()
        >>> probe = ef.hooks.forward("0", lambda module, inputs, output: shapes.add(tuple(output.shape)))
        >>> _ = fit.train.attach(*probe.attach(fit))
        >>> _ = fit.run(epochs=1)
        >>> sorted(shapes), len(fit.components["model"][0]._forward_hooks)
        ([(16, 64), (32, 64)], 0)
    """
    return ForwardHook(modules, fn, stage=stage, name=name)
