"""Step options: how a train step's backward pass and optimizer steps run (precision, gradient
accumulation, clipping, ``torch.compile``, channels-last).

A train step declares them (``@ef.train_step(precision="bf16", accumulate=4)``), a stage may
override them (``ef.stage(..., accumulate=8)``) and ``--precision`` overrides every train stage's
precision. A numeric option or the precision may name a config key instead of a value
(``accumulate="accumulate"``), so that ``--set accumulate=8`` changes it; :meth:`StepOptions.resolve`
reads it when the fit is built. Nothing here imports the engines: the run-time side is
:mod:`engineflow.execute.backprop`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from engineflow.errors import RecipeError

PRECISIONS = ("32", "bf16", "fp16")


def precision_value(value: Any) -> str | None:
    """``value`` as one of :data:`PRECISIONS` (``32`` may be an int), or None when it is none of them.

    Example:
        >>> precision_value(32), precision_value("bf16"), precision_value("fp8")
        ('32', 'bf16', None)
    """
    if isinstance(value, bool):
        return None
    text = str(value) if isinstance(value, int) else value
    return text if text in PRECISIONS else None


@dataclass(frozen=True)
class StepOptions:
    """A train step's options; None: not set here (a stage's options fall back on its step's, then
    on the defaults).

    Attributes:
        precision: "32" (default), "bf16" or "fp16" (mixed precision: the step runs under autocast;
            fp16 scales the loss with a ``GradScaler``), or the name of a config key holding one.
        accumulate: add up the gradients of this many batches before each optimizer step (default 1).
        clip_norm: clip the gradients' total norm to this before each optimizer step.
        clip_value: clip each gradient element to ``[-clip_value, clip_value]`` instead.
        compile: ``torch.compile`` the modules the train step gets: True, or a dict of ``torch.compile``'s
            keyword arguments (``{"mode": "max-autotune"}``, ``{"backend": "eager"}``).
        channels_last: the modules (and the default step's 4-D inputs) in ``torch.channels_last``.

    Example:
        >>> options = StepOptions(precision="bf16", accumulate="accumulate")
        >>> options.resolve({"accumulate": 4}, "train step 'train'")
        StepOptions(precision='bf16', accumulate=4, clip_norm=None, clip_value=None, compile=False, channels_last=False)
    """

    precision: str | None = None
    accumulate: int | str | None = None
    clip_norm: float | str | None = None
    clip_value: float | str | None = None
    compile: bool | Mapping[str, Any] | None = None
    channels_last: bool | None = None

    @classmethod
    def declared(cls, where: str, **given: Any) -> StepOptions:
        """The options a decorator or ``ef.stage`` was given, checked (RecipeError naming ``where``)."""
        options = cls(**given)
        options.check(where)
        return options

    def check(self, where: str) -> None:
        """Refuse a value that is neither valid nor the name of a config key."""
        if self.precision is not None and precision_value(self.precision) is None and not _key(self.precision):
            raise RecipeError(f"{where}: precision= expects one of {', '.join(map(repr, PRECISIONS))} or the name "
                              f"of a config key, got {self.precision!r}")
        if self.accumulate is not None and not _key(self.accumulate):
            _accumulate(self.accumulate, where)
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and not _key(value):
                _positive(value, name, where)
        if self.clip_norm is not None and self.clip_value is not None:
            raise RecipeError(f"{where}: give clip_norm= or clip_value=, not both (one clipping per step)")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise RecipeError(f"{where}: channels_last= expects True or False, got {self.channels_last!r}")
        compiling = self.compile
        if compiling is not None and not isinstance(compiling, bool) and not (
                isinstance(compiling, Mapping) and all(isinstance(k, str) for k in compiling)):
            raise RecipeError(f"{where}: compile= expects True, False or a dict of torch.compile's keyword "
                              f"arguments, got {compiling!r}")

    def over(self, base: StepOptions) -> StepOptions:
        """These options where set, else ``base``'s (a stage's over its step's)."""
        return replace(base, **{f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None})

    def resolve(self, cfg: Mapping[str, Any], where: str, *, precision: str | None = None) -> StepOptions:
        """Every option as a value: config keys read from ``cfg``, defaults filled in, checked;
        ``precision`` (``--precision``) replaces the declared precision."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            if _key(value) and not (name == "precision" and precision_value(value) is not None):
                if value not in cfg:
                    expected = f"one of {', '.join(map(repr, PRECISIONS))} or " if name == "precision" else ""
                    raise RecipeError(f"{where}: {name}= expects {expected}the name of a config key; {value!r} is "
                                      "not a key of the config (add it to ef.config(...) or give a value)")
                values[name] = cfg[value]
        if precision is not None:
            values["precision"] = precision
        chosen = precision_value(values["precision"] if values["precision"] is not None else "32")
        if chosen is None:
            raise RecipeError(f"{where}: precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                              f"got {values['precision']!r}")
        resolved = StepOptions(chosen, 1 if values["accumulate"] is None else values["accumulate"],
                               values["clip_norm"], values["clip_value"], _compiling(values["compile"]),
                               bool(values["channels_last"]))
        _accumulate(resolved.accumulate, where)
        for name in ("clip_norm", "clip_value"):
            if getattr(resolved, name) is not None:
                _positive(getattr(resolved, name), name, where)
        resolved.check(where)
        return resolved

    @property
    def needs_backprop(self) -> bool:
        """Whether a step must call ``backprop(loss, optimizer)`` to honour these (resolved) options."""
        return self.precision == "fp16" or (self.accumulate or 1) > 1 or self.clip_norm is not None \
            or self.clip_value is not None

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values (``run.json``'s ``step_options``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _key(value: Any) -> bool:
    """Whether ``value`` names a config key (a string that is not a precision)."""
    return isinstance(value, str) and precision_value(value) is None


def _accumulate(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{where}: accumulate= expects a whole number of batches >= 1 (or the name of a config "
                          f"key), got {value!r}")


def _positive(value: Any, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RecipeError(f"{where}: {name}= expects a number > 0 (or the name of a config key), got {value!r}")


def _compiling(value: Any) -> bool | dict[str, Any]:
    """``compile`` resolved: a dict of ``torch.compile``'s keyword arguments (its own copy), or a flag."""
    return dict(value) if isinstance(value, Mapping) else bool(value)
