"""The passes of a pipeline's test and inference stages: an eval step's metrics over each loader, an
infer step's predictions over one (gathered back into the loader's order on several processes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from engineflow.declare.handlers import HandlerSpec
from engineflow.declare.stages import Stage
from engineflow.errors import RecipeError
from engineflow.execute.dispatch import attach_in_order
from engineflow.execute.engine import make_engine
from engineflow.execute.injection import describe
from engineflow.execute.parallel import World, gather_objects
from engineflow.execute.validation import eval_engine, evaluate_loader


def evaluation_pass(stage: Stage, provided: Mapping[str, Any], handlers: Sequence[HandlerSpec],
              loaders: Mapping[str, Iterable[Any]]) -> dict[str, Any]:
    """The eval step of a test stage over every loader: ``{"<loader>/<metric>": value}``. Its
    ``engine="eval"`` handlers attach; the metrics all-reduce themselves on several processes."""
    evaluator = eval_engine(stage.eval, provided, handlers)
    metrics: dict[str, Any] = {}
    for name in loaders:
        metrics.update(evaluate_loader(evaluator, loaders, name))
    return metrics


def inference_pass(stage: Stage, provided: Mapping[str, Any], handlers: Sequence[HandlerSpec], loader: Iterable[Any],
               world: World) -> Any:
    """The infer step of an inference stage over ``loader`` without gradients: the batches' outputs
    joined (one tensor when each is a tensor). On several processes each rank predicted its share
    (samples ``rank, rank + W, ...``) and every rank gets the rows back in the loader's order
    (a collective: tensors required)."""
    from ignite.engine import Events

    engine = make_engine(stage.infer, provided)
    attach_in_order(engine, [h for h in handlers if h.engine == "infer"], provided)
    outputs: list[Any] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    with torch.no_grad():
        engine.run(_Inputs(loader), max_epochs=1)
    found = _joined(outputs)
    if not world.distributed:
        return found
    if not isinstance(found, torch.Tensor):
        raise RecipeError(f"infer step {describe(stage.infer.fn)} of stage {stage.name!r} returned something other "
                          "than a tensor; on several processes the predictions are put back in the loader's order "
                          "row by row, so return one tensor per batch")
    return _interleaved(gather_objects(found), world.size)


class _Inputs:
    """A loader's batches as an infer step takes them: a batch, or the inputs of an (inputs, targets) pair."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def _joined(outputs: list[Any]) -> Any:
    if outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat([o.detach().cpu() for o in outputs])
    return outputs


def _interleaved(shares: list[Any], world_size: int) -> Any:
    """Every rank's prediction rows back in the loader's order: rank ``r``'s ``j``-th row is sample
    ``j * world_size + r`` (see :class:`engineflow.shards.Dealer`)."""
    out = shares[0].new_empty((sum(len(share) for share in shares), *shares[0].shape[1:]))
    for rank, share in enumerate(shares):
        out[rank::world_size] = share
    return out
