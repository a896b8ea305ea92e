"""A fit's step options at run time: autocast, the backward pass, accumulation, clipping, the grad scaler.

One :class:`Backprop` per fit, registered as the fit's part "backprop" and given to the train step
(and its handlers) as ``backprop``. Each batch runs as::

    stepping = the accumulation group ends here (its k-th batch), or it is the epoch's last batch
    with autocast (bf16, fp16), and unless stepping every DDP module's no_sync():
        output = step(...)            # calls backprop(loss, optimizer), once per optimizer
    backprop(loss, optimizer):
        first batch of a group: optimizer.zero_grad(set_to_none=True)
        (loss / k).backward()         # scaled by the GradScaler for fp16
        stepping: unscale_ (fp16), clip, scaler.step(optimizer) or optimizer.step()
    after the step: scaler.update() once, if anything stepped; ``stepped`` says whether it did

Gradients are zeroed at the start of the next group, not after the step, so that the
``ITERATION_COMPLETED`` handlers of a stepping batch see the gradients applied, unscaled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from engineflow.declare.step_options import StepOptions
from engineflow.errors import RecipeError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Backprop:
    """Backward passes and optimizer steps under one fit's step options (see the module).

    Args:
        options: the resolved options (:meth:`StepOptions.resolve`).
        device: the run's device: autocast and the GradScaler use its type.
        step: how errors name the train step.
        synced: the DDP-wrapped modules whose ``no_sync()`` a batch that does not step runs inside.

    Attributes:
        stepped: whether the optimizers stepped in the iteration that just ended (False on the
            batches of an accumulation that do not step; True for a step that does not call it).
        position: batches added up since the last optimizer step.
        scaler: fp16's ``torch.amp.GradScaler``, else None.

    Example:
        >>> import engineflow as ef
        >>> fit, cfg, ctx = ef.build("recipes/sine.py", {"samples": 64})
        >>> backprop = fit.parts["backprop"]          # what a train step asking for backprop gets
        >>> backprop.options.precision, backprop.options.accumulate, backprop.scaler
        ('32', 1, None)
    """

    def __init__(self, options: StepOptions, device: torch.device | str = "cpu", *, step: str = "the train step",
                 synced: Iterable[Any] = ()) -> None:
        self.options = options
        self.device = torch.device(device)
        self.step = step
        self.scaler = torch.amp.GradScaler(self.device.type) if options.precision == "fp16" else None
        self.position = 0
        self.stepped = True
        self._synced = list(synced)
        self._open = False
        self._stepping = False
        self._called = False
        self._zeroed: set[int] = set()
        self._stepped_now: set[int] = set()
        self._checked = False

    @property
    def accumulate(self) -> int:
        return int(self.options.accumulate or 1)

    @contextmanager
    def iteration(self, last: bool = False) -> Iterator[None]:
        """One batch's step call: autocast for bf16/fp16, and on a batch that does not step, inside
        every DDP module's ``no_sync()``. ``last``: the epoch's last batch (it steps, whatever the group)."""
        self._stepping = last or self.position + 1 >= self.accumulate
        self._called, self._open = False, True
        self._zeroed, self._stepped_now = set(), set()
        ended = False
        try:
            with ExitStack() as stack:
                dtype = _DTYPES.get(self.options.precision or "32")
                if dtype is not None:
                    stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
                if not self._stepping:
                    for module in self._synced:
                        stack.enter_context(module.no_sync())
                yield
            ended = True
        finally:
            self._open = False
            self._end(ended)

    def _end(self, ended: bool) -> None:
        if not self._called:
            if ended and not self._checked and self.options.needs_backprop:
                raise RecipeError(
                    f"train step {self.step} never called backprop(loss, optimizer), which its options need "
                    f"({self._needs()}); ask for backprop and call it in place of zero_grad(), backward() and "
                    "step()")
            self._checked = self._checked or ended
            self.stepped = True  # the step updates the weights itself
            return
        self._checked = True
        if self._stepping:
            if self.scaler is not None and self._stepped_now:
                self.scaler.update()
            self.position, self.stepped = 0, True
        else:
            self.position, self.stepped = self.position + 1, False

    def _needs(self) -> str:
        o = self.options
        wanted = [f"precision={o.precision!r}" if o.precision == "fp16" else "",
                  f"accumulate={o.accumulate}" if (o.accumulate or 1) > 1 else "",
                  f"clip_norm={o.clip_norm}" if o.clip_norm is not None else "",
                  f"clip_value={o.clip_value}" if o.clip_value is not None else ""]
        return ", ".join(w for w in wanted if w)

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward ``loss`` for ``optimizer``'s parameters, and step it when the accumulation group
        ends here (see the module). Outside a fit, each call is one batch of its own."""
        if not self._open:
            with self.iteration():
                self(loss, optimizer)
            return
        key = id(optimizer)
        if key in self._stepped_now:
            raise RecipeError(f"train step {self.step} called backprop twice for one optimizer in one batch; add "
                              "the losses and call it once per optimizer")
        self._called = True
        if self.position == 0 and key not in self._zeroed:
            optimizer.zero_grad(set_to_none=True)
            self._zeroed.add(key)
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        if not self._stepping:
            return
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.options.clip_norm is not None or self.options.clip_value is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if self.options.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.options.clip_norm)
            else:
                torch.nn.utils.clip_grad_value_(params, self.options.clip_value)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        self._stepped_now.add(key)

    def state_dict(self) -> dict[str, Any]:
        """The position in the accumulation and the GradScaler's state (the same on every process)."""
        return {"position": self.position, "stepped": self.stepped,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position, self.stepped = int(state["position"]), bool(state.get("stepped", True))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class AccumulatedGradients:
    """The gradients a fit has added up so far in an accumulation group: per process (under DDP's
    ``no_sync`` each holds its own), saved only mid-accumulation (registered ``per_rank``)."""

    def __init__(self, backprop: Backprop, modules: Mapping[str, torch.nn.Module]) -> None:
        self.backprop = backprop
        self.modules = modules

    def _parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, module in self.modules.items():
            for key, param in module.named_parameters():
                yield f"{name}.{key}", param

    def state_dict(self) -> dict[str, Any]:
        if self.backprop.position == 0:
            return {}
        return {name: param.grad.detach().clone() for name, param in self._parameters() if param.grad is not None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        for name, param in self._parameters():
            saved = state.get(name)
            param.grad = None if saved is None else saved.to(device=param.device, dtype=param.dtype).clone()


def backprop(
    *,
    precision: str = "32",
    accumulate: int = 1,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    device: torch.device | str = "cpu",
) -> Backprop:
    """A :class:`Backprop` of your own, to call a train step that asks for ``backprop`` outside a fit
    (a test, a notebook). Each call outside ``with bp.iteration():`` is one batch: the optimizer steps
    every ``accumulate`` calls. Autocast for bf16/fp16 applies inside ``bp.iteration()``.

    Example:
        >>> import torch
        >>> import engineflow as ef
        >>> @ef.train_step(accumulate=2, clip_norm=1.0)
        ... def train(batch, model, optimizer, backprop):
        ...     loss = model(batch).pow(2).mean()
        ...     backprop(loss, optimizer)
        ...     return loss
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> bp = ef.backprop(accumulate=2, clip_norm=1.0)
        >>> before = model.weight.clone()
        >>> _ = train(torch.ones(4, 3), model, optimizer, bp)
        >>> bp.stepped, torch.equal(model.weight, before)     # 1 of 2 batches: no step yet
        (False, True)
        >>> _ = train(torch.ones(4, 3), model, optimizer, bp)
        >>> bp.stepped, torch.equal(model.weight, before)
        (True, False)
    """
    options = StepOptions(precision, accumulate, clip_norm, clip_value).resolve({}, "ef.backprop(...)")
    return Backprop(options, device, step="(called directly)")


def to_channels_last(modules: Iterable[torch.nn.Module]) -> None:
    """``channels_last``: convert the modules in place (their parameters stay the ones the optimizers hold)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compiled(given: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``compile``: each module (alone or in a dict of modules) of ``given`` through ``torch.compile``
    (with ``options``, its keyword arguments), for the train step only; the components, and so the
    checkpoints, keep the modules themselves."""
    out: dict[str, Any] = {}
    options = dict(options or {})
    for name, value in given.items():
        if isinstance(value, torch.nn.Module):
            out[name] = torch.compile(value, **options)
        elif isinstance(value, Mapping) and value and all(isinstance(v, torch.nn.Module) for v in value.values()):
            out[name] = {k: torch.compile(v, **options) for k, v in value.items()}
    return out
