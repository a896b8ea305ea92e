"""Forward hooks for the length of a fit: the layers a declaration picks, and hooks on them that are
removed when the fit ends, also when it fails.

A layer's name is its name in ``named_modules()``, prefixed by its component's name when the fit has
several module components (``encoder.0``, ``head``); a component that is itself a layer is named after
the component (``model``). A module held by two components is named once, by the first.

A declaration picks layers with ``modules=``:

- None: every leaf (a module without children);
- a glob pattern, or a list of them (``"encoder.*"``, ``["0", "2"]``), matched against every layer name;
- a module class, or a tuple of classes (``nn.Conv2d``, ``(nn.Linear, nn.ReLU)``).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)))
    >>> list(select_layers({"model": model}, None, "here"))
    ['0', '1', '2.0']
    >>> list(select_layers({"model": model}, "2*", "here")), list(select_layers({"model": model}, nn.ReLU, "here"))
    (['2', '2.0'], ['1'])
    >>> list(select_layers({"encoder": model, "head": nn.Linear(2, 1)}, nn.Linear, "here"))
    ['encoder.0', 'encoder.2.0', 'head']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ignite.engine import Events
from torch import nn

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import RecipeError
from engineflow.state.components import modules_of

if TYPE_CHECKING:
    from engineflow.execute.fit import Fit

LayerChoice: TypeAlias = "str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...] | None"
HookFn: TypeAlias = "Callable[[nn.Module, tuple[Any, ...], Any], Any]"


def layer_names(components: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Every module of the components' modules, by layer name (see the module's docstring)."""
    roots = modules_of(components)
    several = len(roots) > 1
    layers: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for component, root in roots.items():
        for name, module in root.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            layers[(f"{component}.{name}" if several else name) if name else component] = module
    return layers


def check_choice(modules: Any, where: str) -> None:
    """Refuse a ``modules=`` that is none of the documented kinds, when it is declared."""
    if modules is None or isinstance(modules, str) or _is_class(modules):
        return
    if isinstance(modules, Sequence) and modules and (all(isinstance(m, str) for m in modules)
                                                      or all(_is_class(m) for m in modules)):
        return
    raise RecipeError(f"{where}: modules= takes a layer name pattern (e.g. 'encoder.*'), a list of them, a module "
                      f"class or a tuple of classes, or None for every leaf; got {modules!r}")


def select_layers(components: Mapping[str, Any], modules: Any, where: str) -> dict[str, nn.Module]:
    """The layers of ``components`` that ``modules`` picks, by name, in ``named_modules()`` order."""
    layers = layer_names(components)
    if modules is None:
        chosen = {name: m for name, m in layers.items() if next(m.children(), None) is None}
    elif isinstance(modules, str) or (isinstance(modules, Sequence) and all(isinstance(p, str) for p in modules)):
        patterns = [modules] if isinstance(modules, str) else list(modules)
        chosen = {name: m for name, m in layers.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    else:
        classes = tuple(modules) if isinstance(modules, Sequence) else modules
        chosen = {name: m for name, m in layers.items() if isinstance(m, classes)}
    if not chosen:
        listed = ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
        raise RecipeError(f"{where}: no layer of the fit matches modules={modules!r}; its layers: "
                          f"{listed or 'none'} (named_modules() names, after the component's when there are several)")
    return chosen


class HookSet:
    """Forward hooks on some layers, attached and removed together; both idempotent.

    ``make(name)`` gives the hook of the layer named ``name``: torch's ``hook(module, inputs, output)``.
    """

    def __init__(self, layers: Mapping[str, nn.Module], make: Callable[[str], HookFn]) -> None:
        self.layers = dict(layers)
        self._make = make
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are on their layers now."""
        return bool(self._handles)

    def attach(self, *_: Any) -> None:
        """Put the hooks on their layers (once, however often it is called)."""
        if not self._handles:
            self._handles = [module.register_forward_hook(self._make(name)) for name, module in self.layers.items()]

    def remove(self, *_: Any) -> None:
        """Take the hooks off their layers."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


def lifetime(hooks: HookSet, *, attach_at_start: bool = True) -> list[HandlerSpec]:
    """Handlers of the train engine that attach ``hooks`` as the fit starts (unless ``attach_at_start`` is
    False: the caller attaches them) and remove them when it completes or fails (any error, Ctrl-C too).
    Ignite gives ``EXCEPTION_RAISED`` handlers the error; engineflow's re-raise it afterwards."""
    specs = [HandlerSpec(hooks.remove, Events.COMPLETED, "train", orders.HOOKS, -1, raw=True),
             HandlerSpec(hooks.remove, Events.EXCEPTION_RAISED, "train", orders.HOOKS, -1, raw=True)]
    if attach_at_start:
        specs.insert(0, HandlerSpec(hooks.attach, Events.STARTED, "train", orders.HOOKS, -1, raw=True))
    return specs


class ForwardHook:
    """A recipe's own forward hook on some layers, attached while each fit of a train stage runs
    (validation included: ``module.training`` tells training from evaluation) and removed when the fit
    ends, also when it fails. Made by :func:`engineflow.hooks.forward`."""

    __engineflow_tool__ = True

    def __init__(self, modules: LayerChoice, fn: HookFn, *, stage: str | None = None, name: str | None = None) -> None:
        where = f"ef.hooks.forward({modules!r}, {getattr(fn, '__name__', fn)!r})"
        if not callable(fn):
            raise RecipeError(f"{where}: fn must be a function hook(module, inputs, output), got {type(fn).__name__}")
        check_choice(modules, where)
        self.modules, self.fn, self.stage = modules, fn, stage
        self.name = name or f"forward_hook.{getattr(fn, '__name__', type(fn).__name__)}"
        self.where = where
        self.hooks: list[HookSet] = []  # one set per fit it was attached to

    def attach(self, fit: Fit) -> list[HandlerSpec]:
        """The handlers that hook ``fn`` on the chosen layers of ``fit`` for the length of its runs."""
        hooks = HookSet(select_layers(fit.components, self.modules, self.where), lambda name: self.fn)
        self.hooks.append(hooks)
        return lifetime(hooks)


def _is_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)

