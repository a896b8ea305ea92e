"""What ``engineflow serve`` serves: a past run's infer step, its input schema, and how requests become samples.

The run is loaded as :func:`engineflow.load_run` loads it (its code snapshot for ``--run ID``, its best
weights; its ``setup()`` runs, since that is what builds the model, and no engine trains). The step is
the recipe's infer step, or in a recipe with stages its (last) inference stage's, or the stage
``stage`` names. Every sample is checked against the schema before it joins a batch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engineflow.app.evaluation import load_sample
from engineflow.declare.steps import StepSpec
from engineflow.errors import RecipeError
from engineflow.execute.engine import StepEngine, make_engine
from engineflow.execute.injection import describe
from engineflow.naming import option

# the suffix a raw body is saved under for load_sample(path), by its content type
SUFFIXES = {"application/x-npy": ".npy", "application/octet-stream": ".npy", "text/csv": ".csv",
            "image/png": ".png", "image/jpeg": ".jpg", "application/x-pt": ".pt"}


class InputError(Exception):
    """A request's input does not fit the schema or cannot be read: answer 422 with this message."""


@dataclass(frozen=True)
class Schema:
    """One sample's dtype and shape (``None`` for a dimension of any size).

    Example:
        >>> schema = Schema((2,), torch.float32)
        >>> schema.tensor([1, 2.5], "inputs")
        tensor([1.0000, 2.5000])
        >>> schema.tensor([1, 2, 3], "inputs")
        Traceback (most recent call last):
        ...
        engineflow.app.served.InputError: inputs has shape [3]; this model takes [2] (float32) per sample
    """

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        """``[784] (float32)``."""
        dims = ", ".join("any" if d is None else str(d) for d in self.shape)
        return f"[{dims}] ({str(self.dtype).removeprefix('torch.')})"

    def tensor(self, value: Any, where: str) -> torch.Tensor:
        """``value`` (nested lists of numbers, or an array) as one sample, or :class:`InputError` naming ``where``."""
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            raise InputError(f"{where} is not an array: its nested lists have different lengths") from None
        if array.dtype.kind not in "biuf":
            raise InputError(f"{where} holds something other than numbers; send {self.describe()} per sample")
        if self.dtype.is_floating_point is False and array.dtype.kind == "f":
            raise InputError(f"{where} holds fractions; this model takes integers, {self.describe()} per sample")
        return self.checked(torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype), where)

    def checked(self, sample: torch.Tensor, where: str) -> torch.Tensor:
        """``sample`` if its shape fits, else :class:`InputError`."""
        if len(sample.shape) != len(self.shape) or any(
                want is not None and got != want for got, want in zip(sample.shape, self.shape, strict=True)):
            raise InputError(f"{where} has shape {list(sample.shape)}; this model takes {self.describe()} per sample")
        return sample if sample.dtype == self.dtype else sample.to(self.dtype)


@dataclass
class ServedModel:
    """A loaded run's infer step, ready for batches (see the module docstring).

    Attributes:
        run_id: the run served.
        step: the step's name, with its stage's in a recipe with stages (``predict of stage predict``).
        schema: one sample's shape and dtype.
        example: one sample of the run's data (zeros of a declared schema), for the warm-up batch.
        read_file: the recipe's ``load_sample(path)``, or ``engineflow eval``'s default reader.
        device: where the batches run.
    """

    run_id: str
    step: str
    schema: Schema
    example: torch.Tensor
    read_file: Callable[[Path], Any]
    device: torch.device
    engine: StepEngine

    def predict(self, samples: list[torch.Tensor]) -> list[Any]:
        """One batch through the infer step under ``torch.inference_mode``; one output per sample."""
        with torch.inference_mode():
            out = self.engine.process_batch(torch.stack(samples).to(self.device))
            return split_output(out, len(samples), self.step)

    def from_json(self, body: Any) -> tuple[list[torch.Tensor], bool]:
        """The samples of ``{"inputs": sample}`` or ``{"instances": [sample, ...]}``, and whether it was
        several (the answer takes the same form)."""
        if not isinstance(body, Mapping) or len(body.keys() & {"inputs", "instances"}) != 1:
            raise InputError('send a JSON object with "inputs" (one sample) or "instances" (a list of samples)')
        if "inputs" in body:
            return [self.schema.tensor(body["inputs"], "inputs")], False
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError('"instances" must be a non-empty list of samples')
        return [self.schema.tensor(value, f"instances[{i}]") for i, value in enumerate(instances)], True

    def from_bytes(self, body: bytes, content_type: str) -> torch.Tensor:
        """One sample from a raw body (``.npy`` bytes, an image...), read by ``load_sample(path)``."""
        suffix = SUFFIXES.get(content_type.split(";")[0].strip().lower())
        if suffix is None:
            raise InputError(f"content type {content_type or '(none)'!r} cannot be read; send JSON, or one of "
                             f"{', '.join(SUFFIXES)} for load_sample(path)")
        with tempfile.TemporaryDirectory(prefix="engineflow-serve-") as folder:
            path = Path(folder) / f"input{suffix}"
            path.write_bytes(body)
            try:
                sample = torch.as_tensor(self.read_file(path))
            except Exception as err:
                raise InputError(f"the body could not be read as {suffix} by {describe(self.read_file)}: "
                                 f"{type(err).__name__}: {err}") from None
        return self.schema.checked(sample, "the body")


def split_output(out: Any, n: int, step: str) -> list[Any]:
    """A batch's output as one output per sample: rows of a tensor, of each tensor of a dict, or a list's items."""
    if isinstance(out, torch.Tensor) and out.dim() > 0 and len(out) == n:
        return list(out.detach().cpu())
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == n
                                        for v in out.values()):
        parts = {key: value.detach().cpu() for key, value in out.items()}
        return [{key: value[i] for key, value in parts.items()} for i in range(n)]
    if isinstance(out, (list, tuple)) and len(out) == n:
        return list(out)
    raise RecipeError(f"infer step {step} returned {type(out).__name__} for a batch of {n}; return a tensor "
                      "(or a dict of tensors, or a list) with one row per sample")


def to_json(value: Any) -> Any:
    """An output as JSON values: tensors and arrays as nested lists."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def load_served(recipe: str | Path, *, ref: str | None = None, stage: str | None = None, device: str = "auto",
                runs_dir: str | Path | None = None, ignore_changes: bool = False, trust_code: bool = False,
                announce: Callable[[str], None] | None = None) -> ServedModel:
    """Load the run that ``engineflow eval`` would use (or ``ref``) and its infer step, ready to serve."""
    from engineflow.record.load import select_run
    from engineflow.runtime import resolve_device

    where = resolve_device(device)
    say = None if announce is None else lambda record, why: announce(f"serving run {record['id']} ({why})")
    past = select_run(recipe, ref=ref, ignore_changes=ignore_changes, runs_dir=runs_dir, device=str(where),
                      trust_code=trust_code, announce=say)
    spec, loader_names, name = _served_step(past.recipe, stage)
    declared = getattr(past.module, "input_schema", None)
    if declared is not None:
        schema = _declared(declared, past.recipe.path)
        example = torch.zeros([d or 1 for d in schema.shape], dtype=schema.dtype)
    else:
        example = _first_sample(past.components.get("loaders"), loader_names, past.recipe.path)
        schema = Schema(tuple(example.shape), example.dtype)
    provided = {**past.fit.components, "cfg": past.config, "device": where}
    return ServedModel(past.record["id"], name, schema, example, getattr(past.module, "load_sample", load_sample),
                       where, make_engine(spec, provided))


def _served_step(recipe: Any, stage: str | None) -> tuple[StepSpec, list[str], str]:
    """The step to serve, the loaders its sample may come from (by setup()'s names), and its name."""
    defaults = ["infer", "test", "valid", "train"]
    if stage is not None or recipe.stages:
        stages = list(recipe.stages)
        if stage is not None:
            chosen = next((s for s in stages if s.name == stage), None)
            if chosen is None:
                names = ", ".join(s.name for s in stages) or "none: the recipe has no stages"
                raise RecipeError(f"{option('stage', stage)}: {recipe.path.name} has no such stage "
                                  f"(its stages: {names})")
        else:
            chosen = next((s for s in reversed(stages) if s.kind == "infer"), None)
        if chosen is not None:
            if chosen.infer is None:
                raise RecipeError(f"stage {chosen.name!r} of {recipe.path.name} has no infer step; serve an inference "
                                  f"stage ({', '.join(s.name for s in stages if s.infer) or 'none'}) or add "
                                  "ef.stage(..., infer=step)")
            sources = list(chosen.loaders.values()) if chosen.loaders else defaults
            return chosen.infer, sources, f"{_name(chosen.infer)} of stage {chosen.name}"
    spec = recipe.steps.get("infer")
    if spec is None:
        raise RecipeError(f"{recipe.path}: no infer step to serve; decorate one with @ef.infer_step")
    return spec, defaults, _name(spec)


def _name(spec: StepSpec) -> str:
    return getattr(spec.fn, "__qualname__", None) or repr(spec.fn)


def _declared(declared: Any, path: Path) -> Schema:
    try:
        shape = tuple(None if d is None else int(d) for d in declared["shape"])
        dtype = getattr(torch, str(declared.get("dtype", "float32")).removeprefix("torch."))
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{declared.get('dtype')!r} is not a torch dtype")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RecipeError(f"{path}: input_schema must look like {{'shape': [784], 'dtype': 'float32'}} "
                          f"({type(err).__name__}: {err})") from None
    return Schema(shape, dtype)


def _first_sample(loaders: Any, names: Sequence[str], path: Path) -> torch.Tensor:
    """One sample of the first of ``names`` among setup()'s loaders: the inputs of an (inputs, targets) batch."""
    found = [name for name in names if isinstance(loaders, Mapping) and name in loaders]
    if not found:
        raise RecipeError(f"{path}: no loader ({', '.join(names)}) to take the input schema from; declare it: "
                          "input_schema = {'shape': [784], 'dtype': 'float32'}")
    batch = next(iter(loaders[found[0]]))
    inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise RecipeError(f"{path}: the {found[0]!r} loader's batches are not tensors of samples; declare the "
                          "input: input_schema = {'shape': [784], 'dtype': 'float32'}")
    return inputs[0].detach().cpu().clone()
