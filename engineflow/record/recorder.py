"""Record one run: its folder (the source of truth), the store's index row, TensorBoard, weights.

Folder ``<runs_dir>/<experiment>/<run_id>/``::

    run.json        the run record (status, config, code, env, metrics, best, artifacts)
    metrics.jsonl   one line per (epoch, metric): {"epoch": 3, "name": "valid/accuracy", "value": 0.97}
    config.json     the resolved config
    code/           the code snapshot (files/, git.json, diff.patch)
    tb/             TensorBoard event files
    checkpoints/    best.pt and last.pt weights
    log.txt         what the run printed
    mlflow/         the MLflow mirror's outbox and state, when the run mirrors (engineflow.record.mirror)

Every write to the folder comes before the matching write to the store, so ``runs reindex``
can always rebuild the store from the folders. Record changes are field-level
(:func:`engineflow.record.runs.update_record`): ``run.json`` and the index row each get only the
fields this process changes, so another process's changes to the run are kept. When the index
cannot be written the folder still is, and the run stops with a :class:`StoreError` (exit 1).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engineflow.declare import orders
from engineflow.declare.handlers import HandlerSpec
from engineflow.errors import (
    DiskFullError,
    EngineflowError,
    RecipeError,
    StoreError,
    StoreFullError,
    TrainingError,
    WriteError,
)
from engineflow.files import append_text, write_json, writing
from engineflow.record.runs import update_record
from engineflow.record.schema import Row
from engineflow.record.setups import release
from engineflow.record.snapshot import CodeState, save
from engineflow.record.staleness import HEARTBEAT_INTERVAL_S, is_stale
from engineflow.record.store import RunStore
from engineflow.record.tblog import TensorBoardLog
from engineflow.record.trust import seal

if TYPE_CHECKING:
    from engineflow.execute.fit import Fit
    from engineflow.execute.pipeline import Pipeline
    from engineflow.record.mirror import Mirror
    from engineflow.state.resume import ResumeRecord, StageInfo

TB_EVERY_ITERATIONS = 50  # the loss per iteration for TensorBoard; epochs log every metric


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def environment(device: str) -> dict[str, Any]:
    """Versions and machine of a run."""
    import ignite
    import torch

    import engineflow

    return {"python": platform.python_version(), "torch": torch.__version__, "ignite": ignite.__version__,
            "engineflow": engineflow.__version__, "device": device, "hostname": socket.gethostname(),
            "platform": platform.platform()}


class RunRecorder:
    """Writes a run's folder and its row in the store as the run goes.

    Args:
        store: the run store (the index).
        run_dir: the run's folder (created by :meth:`start`).
        record: the run record; :meth:`start` writes it first.
    """

    def __init__(self, store: RunStore, run_dir: Path, record: dict[str, Any]) -> None:
        self.store = store
        self.run_dir = run_dir
        self.record = record
        self.tb = TensorBoardLog(run_dir / "tb")
        # When the checkpointer keeps the best epoch's full state (keep_best >= 1), best.pt is
        # exported from it at the end instead of written at every improvement.
        self.best_in_checkpoints = False
        self._stop_beating = threading.Event()
        self._beater: threading.Thread | None = None
        self.mirror: Mirror | None = None  # the MLflow mirror (engineflow.record.mirror), see use()

    def use(self, *, mirror: Mirror | None, best_in_checkpoints: bool) -> None:
        """How this run is recorded, once its options are known (before :meth:`begin_new` or
        :meth:`begin_resumed`): ``mirror``, the MLflow mirror or None; ``best_in_checkpoints``, whether
        the checkpointer keeps the best epoch's full state (then best.pt is exported from it at the
        end instead of written at every improvement)."""
        self.mirror, self.best_in_checkpoints = mirror, best_in_checkpoints

    def begin_new(self, code: CodeState) -> None:
        """Create the folder with its snapshot and record, then index it (status "running")."""
        with writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)  # the runner may have made it for setup()
            save(code, self.run_dir / "code")
            (self.run_dir / "metrics.jsonl").touch()
        write_json(self.run_dir / "config.json", self.record["config"])
        self.update(status="running", pid=os.getpid(), hostname=socket.gethostname(), heartbeat_at=now_iso(),
                    code={**self.record["code"], **seal(self.record["id"], self.run_dir / "code")})
        release(self.run_dir)  # a run now: settled as one if its process dies
        self._start_heartbeat()
        self.tb.open()
        if self.mirror is not None:
            self.update(mlflow=self.mirror.begin(self.record, resumed=False))

    def begin_resumed(self, *, changed: list[str], world_size: int = 1) -> None:
        """Continue recording this earlier run in its folder; the resume is logged in ``resumes``
        (when, by which process, what changed, on how many processes).

        Raises:
            RecipeError: another process resumed the run (or it finished) since its record was read.
        """
        run_id = self.record["id"]
        earlier = list(self.record.get("resumes") or [])
        resumes = [*earlier, {"at": now_iso(), "pid": os.getpid(), "changes": changed, "world_size": world_size}]
        seen: dict[str, Any] = {}

        def still_free(current: dict[str, Any] | None) -> bool:
            # under the index's write lock: two resumes of one run must not both start
            seen.update(current or {})
            return current is None or ((current.get("resumes") or []) == earlier
                                       and (current.get("status") != "running" or is_stale(current)))

        written = update_record(self.store, self.record, {
            "status": "running", "ended_at": None, "error": None, "pid": os.getpid(),
            "hostname": socket.gethostname(), "heartbeat_at": now_iso(), "resumes": resumes}, check=still_free)
        if written is None:
            raise RecipeError(f"run {run_id} changed while this process was about to resume it: it is now "
                              f"{seen.get('status')} (pid {seen.get('pid')} on {seen.get('hostname')}), "
                              f"resumed {len(seen.get('resumes') or [])} time(s). See `engineflow runs show "
                              f"{run_id}`; resume it again once no other process is running it.")
        self.record.update(written)
        self._start_heartbeat()
        if self.mirror is not None:
            self.update(mlflow=self.mirror.begin(self.record, resumed=True))

    def resumed_from(self, checkpoint: Path, iteration: int, epochs_completed: int) -> None:
        """Note which checkpoint the latest resume continued from; epochs after it will be recorded
        again, so their earlier lines (and unreadable ones) leave ``metrics.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        _keep_lines(path, [line for line, epoch in _metric_lines(path) if epoch <= epochs_completed])
        try:
            with self.store.transaction() as tx:
                tx.delete_metrics(self.record["id"], after_epoch=epochs_completed)
        except StoreError as err:
            raise StoreError(f"{err} The run's metrics.jsonl is up to date; `engineflow runs reindex` brings the "
                             "index up to date.") from err
        resumes = list(self.record.get("resumes", []))
        if resumes:
            resumes[-1] = {**resumes[-1], "checkpoint": checkpoint.name, "iteration": iteration}
        self.update(resumes=resumes)

    def _start_heartbeat(self) -> None:
        # A thread, not a handler: one long iteration or validation must not look like a dead run.
        def beat() -> None:
            while not self._stop_beating.wait(HEARTBEAT_INTERVAL_S):
                try:
                    self.store.heartbeat(self.record["id"])
                except Exception:  # a busy or vanished store must not kill training; the next beat retries
                    continue

        self._beater = threading.Thread(target=beat, name="engineflow-heartbeat", daemon=True)
        self._beater.start()

    def update(self, **fields: Any) -> None:
        """Set ``fields`` of the run: in ``run.json``, then in its index row (only these fields).

        Raises:
            StoreError: the index could not be written (exit 1); run.json has the change.
        """
        self._save(fields)

    def _save(self, fields: dict[str, Any], rows: list[Row] | None = None) -> None:
        try:
            written = update_record(self.store, self.record, fields, rows=rows or ())
        except StoreError as err:
            self.record.update(fields)
            kind = StoreFullError if isinstance(err, DiskFullError) else StoreError
            raise kind(f"{err} The run's own record is safe in {self.run_dir / 'run.json'} (and its metrics "
                       "in metrics.jsonl); `engineflow runs reindex` brings the index up to date.") from err
        except WriteError:
            self.record.update(fields)  # the index has them
            raise
        if written is not None:
            self.record.update(written)

    def handlers(self, fit: Fit) -> list[HandlerSpec]:
        """Handlers on the train engine: per-iteration TensorBoard and heartbeat, per-epoch records."""
        from ignite.engine import Events

        stage = fit.stage

        def iteration(engine: Any) -> None:
            self.tb.iteration(stage.iterations_before + engine.state.iteration, fit.loss.last, stage.prefix)

        def board(engine: Any) -> None:
            entries = fit.board.drain()
            if entries:
                self.tb.board(entries, stage.iterations_before, stage.prefix)

        def epoch(engine: Any) -> None:
            board(engine)
            self.epoch_completed(fit)

        fit.board.open = True
        every = TB_EVERY_ITERATIONS
        return [HandlerSpec(iteration, Events.ITERATION_COMPLETED(every=every), "train", orders.RECORDS, -1, raw=True),
                HandlerSpec(board, Events.ITERATION_COMPLETED, "train", orders.RECORDS, -1, raw=True),
                HandlerSpec(epoch, Events.EPOCH_COMPLETED, "train", orders.RECORDS, -1, raw=True)]

    def epoch_completed(self, fit: Fit) -> None:
        from engineflow.state.checkpoint_files import save_weights
        from engineflow.state.components import modules_of

        stage = fit.stage
        row = stage.row(fit.history[-1])  # the pipeline's epoch, the stage's prefix
        epoch = row["epoch"]
        values = {k: v for k, v in row.items() if k != "epoch"}
        self._append_metrics(epoch, values)
        self.tb.epoch(epoch, values)
        if self.mirror is not None:
            self.mirror.epoch(epoch, values)
        artifacts = dict(self.record.get("artifacts") or {})
        # The weights files are written when the run ends (finish); until then the full-state
        # checkpoints hold them (what ef.load_run reads), unless no checkpoint keeps the best epoch.
        modules = modules_of(fit.components)
        if modules and fit.best.epoch == fit.history[-1]["epoch"] and not self.best_in_checkpoints:
            save_weights(self.run_dir / "checkpoints" / "best.pt", modules, {"epoch": epoch, "metrics": values},
                         parts=fit.parts, best=True)
            artifacts["weights_best"] = "checkpoints/best.pt"
        best = run_best(fit)
        if best["value"] is None and stage.index > 0:
            best = self.record.get("best") or best  # an earlier stage's best stays the run's until this one has one
        fields = {"metrics": {**(self.record.get("metrics") or {}), **values}, "best": best, "epochs": epoch,
                  "artifacts": artifacts, "heartbeat_at": now_iso()}
        if stage.prefix:  # a recipe without stages is one stage, which `runs show` derives from the record
            fields["stages"] = self._stages_with(stage, public_stage(fit.summary("running")))
        elif fit.stopped.by is not None:  # early stopping ended the fit: its stage in `runs show` says so
            fields["stopped"] = fit.stopped.as_dict()
        # the epoch's metric rows go to the index in the same transaction as its record fields
        self._save(fields, [(epoch, k, v) for k, v in values.items()])

    # stage boundaries (the pipeline's listeners) --------------------------------------------------
    def _stages_with(self, stage: StageInfo, entry: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The run's stages: those before ``stage`` as its pipeline recorded them, then ``entry``."""
        return [*(public_stage(done) for done in stage.done), dict(entry)]

    def stage_started(self, pipeline: Pipeline) -> None:
        if pipeline.staged:
            self.update(stages=self._stages_with(pipeline.info, public_stage(pipeline.summary())))

    def stage_completed(self, pipeline: Pipeline, summary: Mapping[str, Any]) -> None:
        """A stage ended: its entry in ``stages``; a test pass's metrics join the run's."""
        if not pipeline.staged:
            return
        fields: dict[str, Any] = {"stages": self._stages_with(pipeline.info, public_stage(summary))}
        rows: list[Row] = []
        if summary["kind"] == "test":  # its metrics count at the pipeline's latest epoch, as in MLflow
            epoch, values = pipeline.epochs_completed(), summary["metrics"]
            fields["metrics"] = {**(self.record.get("metrics") or {}), **values}
            self._append_metrics(epoch, values, replace=True)
            rows = [(epoch, k, v) for k, v in values.items()]
            self.tb.epoch(epoch, values)
            if self.mirror is not None:
                self.mirror.epoch(epoch, values)
        self._save(fields, rows)

    def _append_metrics(self, epoch: int, values: Mapping[str, Any], *, replace: bool = False) -> None:
        """One ``metrics.jsonl`` line per value; ``replace``: earlier lines of the same epoch and names
        go first (a test pass run again after a resume from the end of the stage before it)."""
        path = self.run_dir / "metrics.jsonl"
        if replace:
            _keep_lines(path, [line for line, seen in _metric_lines(path, names=True)
                               if seen not in {(epoch, name) for name in values}])
        append_text(path, "".join(json.dumps({"epoch": epoch, "name": k, "value": v}) + "\n"
                                  for k, v in values.items()))

    def predictions(self, pipeline: Pipeline, loader: str, outputs: Any) -> None:
        """An infer pass's predictions on one loader: ``predictions/<stage>/<loader>.pt``."""
        from engineflow.state.checkpoint_files import atomic_save

        rel = f"predictions/{pipeline.info.name}/{loader}.pt"
        (self.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(outputs, self.run_dir / rel)
        artifacts = dict(self.record.get("artifacts") or {})
        artifacts["predictions"] = {**artifacts.get("predictions", {}), f"{pipeline.info.name}/{loader}": rel}
        self.update(artifacts=artifacts)

    def finish(self, status: str, *, error: str | None = None, final: Mapping[str, float] | None = None,
               fit: Fit | None = None, best_checkpoint: Path | None = None,
               best: Mapping[str, Any] | None = None) -> str:
        """Write the weights files, close TensorBoard and mark the run ``status`` with its end time.

        ``last.pt``: the weights as training left them, unless it failed (they may be NaN), with the
        fit's EMA beside them. ``best.pt``: exported from ``best_checkpoint`` (the best epoch's full
        state), when the checkpointer keeps one (then :meth:`epoch_completed` did not write it); an
        EMA validation evaluated is its module's weights there.

        The weights and TensorBoard's last writes are part of completing: when one of them fails, a
        run that would have completed is recorded failed with that error (a completed run always
        has its weights files). The MLflow mirror is told the status recorded, last.

        Returns:
            the status recorded.

        Raises:
            EngineflowError: the first error of finishing (a :class:`~engineflow.errors.WriteError`
                naming the file, a :class:`~engineflow.errors.StoreError`, or a
                :class:`~engineflow.errors.TrainingError` that says what failed). The run's record
                says how it ended all the same, in run.json at least. For a run that had failed or
                was interrupted, its own error is the one to report.
        """
        self._stop_beating.set()
        artifacts = dict(self.record.get("artifacts") or {})
        problem: BaseException | None = None
        try:
            self._write_weights(status, artifacts, final, fit, best_checkpoint)
        except Exception as err:
            problem = _finishing_error(err, "writing the weights files")
        try:
            self.tb.close(self.record["config"], final or {}, best)
        except Exception as err:
            problem = problem or _finishing_error(err, "closing TensorBoard's files")
        if problem is not None and status == "completed":
            status, error = "failed", f"{type(problem).__name__}: {problem}"
        stages = [dict(s) for s in self.record.get("stages") or []]
        for entry in stages:
            if entry.get("status") == "running":
                entry["status"] = status
        try:
            self.update(status=status, ended_at=now_iso(), error=error, pid=None, artifacts=artifacts,
                        **({"stages": stages} if stages else {}), **({"best": dict(best)} if best else {}))
        except Exception as err:
            problem = problem or err
        if self.mirror is not None:  # after the record: what MLflow is told never waits for it
            self.mirror.finish(status, self.record)
        if problem is not None:
            raise problem
        return status

    def _write_weights(self, status: str, artifacts: dict[str, Any], final: Mapping[str, float] | None, fit: Fit | None,
                       best_checkpoint: Path | None) -> None:
        """``last.pt`` (not for a failed run) and ``best.pt`` from the best checkpoint; each file
        enters ``artifacts`` once written, and one that fails does not keep the other from it."""
        from engineflow.state.checkpoint_files import export_weights, load_record, save_weights
        from engineflow.state.components import modules_of

        modules = modules_of(fit.components) if fit is not None else {}
        first: Exception | None = None
        if modules and status != "failed":
            meta = {"epoch": fit.history[-1]["epoch"] if fit.history else 0, "status": status,
                    "iteration": fit.train.state.iteration, "metrics": dict(final or {})}
            try:
                save_weights(self.run_dir / "checkpoints" / "last.pt", modules, meta, parts=fit.parts)
                artifacts["weights_last"] = "checkpoints/last.pt"
            except Exception as err:
                first = err
        if modules and best_checkpoint is not None:
            try:
                # the best epoch may be an earlier stage's, from before a prepare added a module
                record = load_record(best_checkpoint)
                names = [name for name in modules if name in record.components]
                export_weights(record, self.run_dir / "checkpoints" / "best.pt", names, _best_meta(record),
                               source=best_checkpoint)
                artifacts["weights_best"] = "checkpoints/best.pt"
            except Exception as err:
                first = first or err
        if first is not None:
            raise first


def _finishing_error(err: Exception, what: str) -> EngineflowError:
    """An error of a run's finishing as engineflow reports it: as it is when it is engineflow's own
    (a write error names its file), else a :class:`TrainingError` that says what failed."""
    if isinstance(err, EngineflowError):
        return err
    failed = TrainingError(f"the run could not be completed: {what} failed with {type(err).__name__}: {err}")
    failed.__cause__ = err
    return failed


def run_best(fit: Fit) -> dict[str, Any]:
    """A fit's best epoch as the run records it: the stage's prefix, the pipeline's epoch."""
    best, stage = fit.best.as_dict(), fit.stage
    if best["metric"]:
        best["metric"] = stage.metric(best["metric"])
    if best["epoch"] is not None:
        best["epoch"] += stage.epochs_before
    return best


def public_stage(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A stage as ``run.json`` and ``runs show --json`` give it: ``name``, ``kind``, ``status``,
    ``epochs`` (completed in the stage), ``best`` (its epoch counted within the stage) and
    ``metrics`` (its last values); ``from`` (the run whose state it is), ``predictions`` and
    ``stopped`` (what ended its training early) when they apply."""
    keep = ("name", "kind", "status", "epochs", "best", "metrics", "from", "predictions", "stopped")
    return {k: summary[k] for k in keep if k in summary}


def _best_meta(record: ResumeRecord) -> dict[str, Any]:
    """The best epoch of a checkpoint's stage, as the run records it (pipeline epoch, prefixed names)."""
    epoch = record.best["epoch"]
    row = next((row for row in record.history if row["epoch"] == epoch), {"epoch": epoch})
    recorded = record.stage.row(row)
    return {"epoch": recorded.pop("epoch"), "metrics": recorded}


def _keep_lines(path: Path, lines: list[bytes]) -> None:
    """Rewrite ``path`` (atomically) with ``lines`` only; no temporary file is left, however it ends."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path):
            tmp.write_bytes(b"".join(lines))
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _metric_lines(path: Path, *, names: bool = False) -> list[tuple[bytes, Any]]:
    """The readable lines of a metrics.jsonl with their epochs (``names``: ``(epoch, name)``); a
    damaged line is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    found: list[tuple[bytes, Any]] = []
    for line in data.splitlines(keepends=True):
        try:
            entry = json.loads(line.decode("utf-8"))
            epoch = entry["epoch"]
        except (ValueError, TypeError, KeyError, IndexError):  # UnicodeDecodeError is a ValueError
            continue
        if isinstance(epoch, int):
            found.append((line if line.endswith(b"\n") else line + b"\n",
                          (epoch, entry.get("name")) if names else epoch))
    return found
