"""``engineflow eval``: a past run's model on files (``engineflow test`` is :mod:`engineflow.app.testing`).

Files are read by the recipe's ``load_sample(path)`` and written by its
``store_result(path, predictions, files)``, or by the defaults below for ``.pt``, ``.npy`` and
``.csv``. OUTPUT appears only when every input was read and predicted: it is written to a
temporary file and renamed at the end, so a failure leaves no partial OUTPUT.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engineflow.errors import RecipeError
from engineflow.execute.injection import describe

if TYPE_CHECKING:
    from engineflow.record.load import LoadedRun

SUFFIXES = (".pt", ".npy", ".csv")


def load_sample(path: Path) -> torch.Tensor:
    """Default reader: ``.pt`` (torch.load), ``.npy`` (numpy) or ``.csv`` (numbers) to a float tensor."""
    suffix = path.suffix.lower()
    if suffix == ".pt":
        value = torch.load(path, map_location="cpu", weights_only=True)
        return torch.as_tensor(value)
    if suffix == ".npy":
        return torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float32)
    if suffix == ".csv":
        return torch.as_tensor(np.loadtxt(path, delimiter=",", ndmin=1), dtype=torch.float32)
    raise RecipeError(f"cannot read {path}: no reader for {suffix or 'files without a suffix'}; "
                      f"use {', '.join(SUFFIXES)} or define load_sample(path) in the recipe")


def store_result(path: Path, predictions: Any, files: Sequence[str]) -> None:
    """Default writer by OUTPUT's suffix: ``.pt`` ({"files", "predictions"}), ``.npy`` or ``.csv``.

    CSV has one row per input file: its name, then the prediction's values flattened.
    """
    suffix = path.suffix.lower()
    if suffix == ".pt":
        torch.save({"files": list(files), "predictions": predictions}, path)
    elif suffix == ".npy":
        np.save(path, torch.as_tensor(predictions).cpu().numpy(), allow_pickle=False)
    elif suffix == ".csv":
        rows = torch.as_tensor(predictions).cpu().reshape(len(files), -1).tolist()
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["file", *(f"y{i}" for i in range(len(rows[0]) if rows else 0))])
            writer.writerows([name, *values] for name, values in zip(files, rows, strict=True))
    else:
        check_output_suffix(path)


def predict_files(recipe: str | Path, source: str | Path, output: str | Path, *, ref: str | None = None,
               ignore_changes: bool = False, runs_dir: str | Path | None = None, device: str = "cpu",
               batch_size: int = 64, trust_code: bool = False,
               announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a past run's infer step on a file or every file of a folder and write OUTPUT.

    ``trust_code``: with ``ref`` an id, import its code snapshot although nothing shows that this
    user recorded it (see :func:`engineflow.record.load.load_run`). ``announce``: told which run
    predicts, and why that one, before it is loaded.

    Returns:
        ``{"run": id, "inputs": n, "output": path}``.

    Example:
        >>> import io, tempfile
        >>> from pathlib import Path
        >>> import engineflow as ef
        >>> runs = Path(tempfile.mkdtemp())
        >>> _ = ef.run("recipes/sine.py", {"epochs": 1, "samples": 64}, device="cpu", runs_dir=runs,
        ...            stream=io.StringIO())
        >>> inputs = runs / "inputs"
        >>> inputs.mkdir()
        >>> for name, x in (("a.csv", -1.0), ("b.csv", 0.5)):
        ...     _ = (inputs / name).write_text(str(x))  # one sample a file, as the model takes it
        >>> done = ef.predict_files("recipes/sine.py", inputs, runs / "predictions.csv", runs_dir=runs)
        >>> done["inputs"], [line.split(",")[0] for line in Path(done["output"]).read_text().splitlines()]
        (2, ['file', 'a.csv', 'b.csv'])
    """
    from engineflow.record.load import select_run

    source, output = Path(source), Path(output)
    files = _input_files(source)
    say = None if announce is None else lambda record, why: announce(f"predicting with run {record['id']} ({why})")
    past = select_run(recipe, ref=ref, ignore_changes=ignore_changes, runs_dir=runs_dir, device=device,
                      trust_code=trust_code, announce=say)
    infer = past.recipe.steps.get("infer")
    if infer is None:
        raise RecipeError(f"{past.recipe.path}: no infer step; decorate one with @ef.infer_step")
    read = getattr(past.module, "load_sample", load_sample)
    write = getattr(past.module, "store_result", store_result)
    if write is store_result:
        check_output_suffix(output)  # before any work, not after the predictions
    samples = [_read(read, path) for path in files]
    predictions = _predict(infer, past, samples, files, batch_size, torch.device(device))
    names = [path.name for path in files]
    _write_atomically(write, output, predictions, names)
    return {"run": past.record["id"], "inputs": len(files), "output": str(output)}


def check_output_suffix(output: Path) -> None:
    """The default writer handles OUTPUT's suffix, or a RecipeError says what to do."""
    if output.suffix.lower() not in SUFFIXES:
        raise RecipeError(f"no writer for OUTPUT {output}; use {', '.join(SUFFIXES)} or define store_result")


def _input_files(source: Path) -> list[Path]:
    if not source.exists():
        raise RecipeError(f"input not found: {source}")
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise RecipeError(f"input folder {source} has no files")
    return files


def _read(read: Callable[[Path], Any], path: Path) -> torch.Tensor:
    try:
        sample = read(path)
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(f"cannot read input {path} with {describe(read)}: {type(err).__name__}: {err}") from None
    return torch.as_tensor(sample)


def _predict(infer: Any, past: LoadedRun, samples: list[torch.Tensor], files: list[Path], batch_size: int,
             device: torch.device) -> Any:
    from ignite.engine import Events

    from engineflow.execute.engine import make_engine

    shape = samples[0].shape
    for path, sample in zip(files, samples, strict=True):
        if sample.shape != shape:
            raise RecipeError(f"input {path} has shape {tuple(sample.shape)}, but {files[0].name} has "
                              f"{tuple(shape)}; every input of one eval must have the same shape")
    provided = {**past.fit.components, "cfg": past.config, "device": device}
    engine = make_engine(infer, provided)
    outputs: list[Any] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    batches = [torch.stack(samples[i:i + batch_size]).to(device) for i in range(0, len(samples), batch_size)]
    try:
        engine.run(batches, max_epochs=1)
    except RecipeError:
        raise
    except Exception as err:
        raise RecipeError(
            f"infer step {describe(infer.fn)} failed on inputs of shape {tuple(shape)} "
            f"(first file {files[0].name}): {type(err).__name__}: {err}. Check that the inputs have the shape "
            "the model expects, or define load_sample(path) in the recipe to reshape them."
        ) from None
    if all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat([o.detach().cpu() for o in outputs])
    return [item for o in outputs for item in o]


def _write_atomically(write: Callable[..., None], output: Path, predictions: Any, names: list[str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.partial{os.getpid()}{output.suffix}")
    try:
        write(tmp, predictions, names)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
