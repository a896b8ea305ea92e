"""Import Ignite without the FSDP import of its checkpoint module.

``ignite/handlers/checkpoint.py`` runs ``from torch.distributed.optim import ZeroRedundancyOptimizer``
when Ignite is imported, only to test ``isinstance(obj, ZeroRedundancyOptimizer)`` when a ``Checkpoint``
saves. That import loads FSDP, DTensor and sympy, which takes about as long as ``import torch`` itself
(pytorch/ignite#2642), paid by every ``engineflow run`` however short.

:func:`install` (called by the ``engineflow`` command, never by ``import engineflow``: a library changes
nothing global in its user's process) puts a one-shot finder on ``sys.meta_path``. When Ignite
is first imported, and only while its package runs, ``torch.distributed.optim`` resolves to a stand-in
whose ``ZeroRedundancyOptimizer`` is a class that answers ``isinstance`` through the real class once the
real module is loaded; a program holding a ``ZeroRedundancyOptimizer`` has loaded it, so Ignite's check
gives the same answer as before. The stand-in leaves ``sys.modules`` as soon as Ignite's import ends, so a
later ``import torch.distributed.optim`` loads the real module; if Ignite's import fails with the
stand-in (a future Ignite or torch needing more of the module), Ignite is imported again the plain way.

Nothing changes when Ignite or ``torch.distributed.optim`` is already imported, or when the environment
sets ``ENGINEFLOW_PLAIN_IGNITE_IMPORT=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

OPT_OUT = "ENGINEFLOW_PLAIN_IGNITE_IMPORT"
_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


class _DeferredInstanceCheck(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        real = sys.modules.get(_ZERO_MODULE)
        return real is not None and isinstance(obj, real.ZeroRedundancyOptimizer)


class ZeroRedundancyOptimizer(metaclass=_DeferredInstanceCheck):
    """Stands in for ``torch.distributed.optim.ZeroRedundancyOptimizer`` in Ignite's isinstance checks."""


def stand_in_module() -> ModuleType:
    """The module ``torch.distributed.optim`` resolves to while Ignite's package runs."""
    module = ModuleType("torch.distributed.optim", "engineflow's stand-in while Ignite is imported")
    module.ZeroRedundancyOptimizer = ZeroRedundancyOptimizer  # type: ignore[attr-defined]
    return module


@contextmanager
def _stand_in() -> Iterator[None]:
    if "torch.distributed.optim" in sys.modules:
        yield
        return
    sys.modules["torch.distributed.optim"] = stand_in_module()
    try:
        yield
    finally:
        del sys.modules["torch.distributed.optim"]


class _IgniteLoader:
    """Runs Ignite's own loader with the stand-in in place, then without it if that fails."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Ignite and tools reading __loader__ see its real loader, not this wrapper.
        module.__loader__ = module.__spec__.loader = self.loader  # type: ignore[union-attr]
        try:
            with _stand_in():
                self.loader.exec_module(module)
        except ImportError:
            for name in [name for name in sys.modules if name.startswith("ignite.")]:
                del sys.modules[name]
            self.loader.exec_module(module)


class _IgniteFinder:
    """Finds ``ignite`` once, with :class:`_IgniteLoader` around its loader, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "ignite":
            return None
        uninstall()
        import importlib.util

        spec = importlib.util.find_spec("ignite")
        if spec is not None and spec.loader is not None:
            spec.loader = _IgniteLoader(spec.loader)  # type: ignore[assignment]
        return spec


def install() -> None:
    """Make the first ``import ignite`` of this process skip ``torch.distributed.optim`` (see the module).

    Nothing is installed where ``torch.distributed`` is already in use: a process that trains on
    several processes needs the real module, and pays its import anyway.
    """
    if "ignite" in sys.modules or os.environ.get(OPT_OUT) == "1" or is_installed() or _distributed_in_use():
        return
    sys.meta_path.insert(0, _IgniteFinder())


def is_installed() -> bool:
    return any(isinstance(finder, _IgniteFinder) for finder in sys.meta_path)


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _IgniteFinder)]


def _distributed_in_use() -> bool:
    # started by torchrun, or by engineflow's launcher (--nproc), which sets what torchrun sets
    if any(name in os.environ for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "ENGINEFLOW_LAUNCH_DIR")):
        return True
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
