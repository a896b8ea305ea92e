"""Mirror a run to an MLflow tracking server, asynchronously and idempotently.

The run folder stays the source of truth. What MLflow should learn goes first to the run's outbox
(:mod:`engineflow.record.outbox`), a cheap append on the training thread; a daemon thread pushes it
with MLflow's own client (``MlflowClient``, ``log_batch``). A slow or stopped server therefore never
slows or fails training: the thread backs off and tries again, and when the run ends it gets
:data:`DRAIN_S` seconds to finish; what is left waits for ``engineflow runs sync``.

What a run mirrors (one MLflow run per engineflow run, in the MLflow experiment of the same name):

* **params**: the resolved config, flattened (``optim.momentum``), as strings;
* **metrics**: every epoch's metrics (``valid/accuracy``), with the epoch as the step;
* **tags**: ``engineflow.run_id``, ``engineflow.experiment``, ``engineflow.stage``,
  ``engineflow.code_fingerprint``, ``engineflow.git_commit`` and ``mlflow.source.git.commit``,
  ``engineflow.seed``, ``engineflow.run_dir``;
* **status**: RUNNING, then FINISHED (completed), FAILED (failed) or KILLED (interrupted, or found
  dead by ``runs list``/``runs sync``); a resume sets it RUNNING again, in the same MLflow run;
* **artifacts**: the code snapshot (``code/``) and the best weights (``checkpoints/best.pt``).

The pieces: :mod:`engineflow.record.outbox` (the outbox, its entries), :mod:`engineflow.record.push`
(sending them with MLflow's client), and here which server a run mirrors to, the run's
:class:`Mirror` (its pushing thread) and ``runs sync``. MLflow's client is imported when a mirrored run
begins or a push is due, never by ``import engineflow`` or a command that mirrors nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from engineflow.errors import RecipeError, WriteError
from engineflow.record.outbox import MLFLOW_STATUS, Outbox, first_entries, mirrored, now_ms, reconcile, stage_names
from engineflow.record.push import Pushed, mlflow_client, push

if TYPE_CHECKING:
    from engineflow.declare.recipe import Recipe

__all__ = ["DRAIN_S", "Mirror", "Synced", "mirror_for", "mirror_uri", "sync"]

DRAIN_S = 10.0  # how long a run that ends waits for its mirror to catch up
PUSH_EVERY_S = 3.0  # the shortest time between two pushes of a run in training
MAX_BACKOFF_S = 60.0  # the longest wait between two tries while the server does not answer
RECIPE_SETTING = "mlflow"  # the recipe-level setting: mlflow = "http://mlflow.example:5000"


# ------------------------------------------------------------------------------------------ which server
def mirror_uri(given: str | bool | None, setting: Any, recorded: str | None = None) -> str | None:
    """The MLflow tracking URI a run mirrors to, or None.

    Precedence: ``given`` (``--mlflow URI`` or ``ef.run(mlflow=URI)``; False turns the mirror off),
    then the recipe's ``setting`` (its top-level ``mlflow = "..."``), then ``recorded`` (the URI
    the run being resumed mirrored to). ``MLFLOW_TRACKING_URI`` is not read: a run sends its data
    to a server only when asked to.

    Example:
        >>> mirror_uri(None, "http://team:5000")
        'http://team:5000'
        >>> mirror_uri("http://127.0.0.1:5000", "http://team:5000")
        'http://127.0.0.1:5000'
        >>> mirror_uri(False, "http://team:5000") is None
        True
    """
    if given is False:
        return None
    if isinstance(given, str) and given.strip():
        return given.strip()
    if isinstance(setting, str) and setting.strip():
        return setting.strip()
    return recorded


# MLflow's stores that a tracking URI may name besides an HTTP server (its database and file stores)
_STORE_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql")


def check_uri(uri: str, *, where: str = "--mlflow") -> None:
    """Refuse what is not an MLflow tracking URI: an ``http(s)://`` server, a ``file:`` folder, a
    database store (``sqlite:///mlflow.db``, ``postgresql://...``) or ``databricks``.

    Example:
        >>> check_uri("http://127.0.0.1:5000")
        >>> check_uri("sqlite:///mlflow.db")
        >>> try:
        ...     check_uri("not a uri")
        ... except RecipeError as err:
        ...     print(err)
        --mlflow 'not a uri' is not an MLflow tracking URI: give a server's http://HOST:PORT (or https://), ...
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        parts = None
    scheme = parts.scheme.split("+")[0].lower() if parts is not None else ""
    fine = parts is not None and not any(c.isspace() for c in uri) and (
        (scheme in ("http", "https") and bool(parts.hostname))
        or (scheme in _STORE_SCHEMES and bool(parts.path or parts.netloc))
        or scheme in ("databricks", "databricks-uc") or uri in ("databricks", "databricks-uc"))
    if not fine:
        raise RecipeError(f"{where} {uri!r} is not an MLflow tracking URI: give a server's http://HOST:PORT (or "
                          "https://), a file:///path, a database such as sqlite:///mlflow.db, or databricks")


def mirror_for(given: str | bool | None, recipe: Recipe, record: Mapping[str, Any],
               notify: Callable[[str], None] | None = None) -> Mirror | None:
    """The :class:`Mirror` of a run about to start, or None when it mirrors nothing.

    Checked before anything is recorded, so a bad setting stops the run at once (exit 2).

    Raises:
        RecipeError: the recipe's ``mlflow`` is not a URI string, ``given`` is an empty string, or
            the mirror is asked for and the mlflow package is not installed.

    Example::

        mirror = mirror_for("http://127.0.0.1:5000", recipe, recorder.record, reporter.line)
    """
    if given is False:
        return None  # --no-mlflow: the recipe's setting is not even read
    setting = getattr(recipe.module, RECIPE_SETTING, None)
    if isinstance(setting, ModuleType):  # the recipe did `import mlflow`: not a setting
        setting = None
    if setting is not None and setting is not False and not (isinstance(setting, str) and setting.strip()):
        raise RecipeError(f"{recipe.path}: '{RECIPE_SETTING}' must be an MLflow tracking URI string "
                          f"(e.g. \"http://mlflow.example:5000\"), got {setting!r}")
    if isinstance(given, str) and not given.strip():
        raise RecipeError("--mlflow needs a tracking URI, e.g. --mlflow http://127.0.0.1:5000")
    recorded = (record.get("mlflow") or {}).get("uri") if isinstance(record.get("mlflow"), dict) else None
    uri = mirror_uri(given, setting, recorded)
    if uri is not None:
        check_uri(uri, where="--mlflow" if isinstance(given, str) else f"{recipe.path}: '{RECIPE_SETTING}'")
    if uri is None or os.environ.get("RANK", "0") not in ("0", ""):  # one process of a torchrun job mirrors
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise RecipeError(f"mirroring to MLflow ({uri}) needs the mlflow package: pip install 'engineflow[mlflow]' "
                          "(or run with --no-mlflow)")
    return Mirror(uri, Path(record["run_dir"]), notify)


# --------------------------------------------------------------------------------------- the run's mirror
class Mirror:
    """The MLflow mirror of one run in this process: queues on the training thread, pushes on its own.

    The recorder calls :meth:`begin` once the run is recorded, :meth:`epoch` after each epoch's
    metrics are written and :meth:`finish` once its end is; each only appends to the outbox.

    Args:
        uri: the MLflow tracking URI.
        run_dir: the run's folder.
        notify: prints a line for the user (where the mirror goes, what is left unpushed at the end).

    Example::

        mirror = Mirror("http://127.0.0.1:5000", Path("runs/digits/20261123-084512-3fa2"))
        mirror.begin(record, resumed=False)      # queues start, params, tags, code; starts the thread
        mirror.epoch(1, {"valid/accuracy": 0.9})
        mirror.finish("completed", record)       # queues weights and status; waits DRAIN_S at most
    """

    def __init__(self, uri: str, run_dir: Path, notify: Callable[[str], None] | None = None) -> None:
        self.uri = uri
        self.box = Outbox(run_dir)  # no file is touched before begin(): a run that cannot start leaves none
        self.result: Pushed | None = None
        self._notify = notify or (lambda line: None)
        self._run_id = run_dir.name
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._given_up = False
        self._thread: threading.Thread | None = None

    def begin(self, record: Mapping[str, Any], *, resumed: bool) -> dict[str, Any]:
        """Queue the run's start (or its resume: status RUNNING) and start pushing.

        Returns:
            ``{"uri": ...}``, what the run's record keeps under ``mlflow``.
        """
        self._run_id = str(record.get("id", self._run_id))
        fresh = not self.box.exists()
        moved = self.box.open(self.uri)
        if fresh:
            self.box.append(*first_entries(record, self.box.run_dir, backfill=resumed))
        else:
            self.box.append({"op": "status", "status": "RUNNING", "time": now_ms()},
                            {"op": "tags", "tags": {"engineflow.resumes": str(len(record.get("resumes") or []))}})
        # MLflow's client is imported here, on the training thread, before the fit starts: an import
        # in flight in another thread when a DataLoader forks its workers can leave them a module
        # lock that no thread of theirs will ever release. The pushing thread then only talks HTTP.
        try:
            mlflow_client(self.uri)
        except Exception as err:  # a broken MLflow install must not stop the run; the outbox keeps everything
            self._notify(f"MLflow: its client could not be loaded ({type(err).__name__}: {err}); "
                         f"`engineflow runs sync {self._run_id}` pushes the run once it can")
            return {"uri": self.uri}
        self._thread = threading.Thread(target=self._push_loop, name="engineflow-mlflow", daemon=True)
        self._thread.start()
        again = " (all of it: the run mirrored elsewhere before)" if moved and not fresh else ""
        self._notify(f"mirroring to MLflow at {self.uri}{again}")
        return {"uri": self.uri}

    def epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        """Queue one epoch's metrics, the epoch as their step."""
        self.box.append({"op": "metrics", "step": epoch, "time": now_ms(), "values": dict(values)})
        self._wake.set()

    def finish(self, status: str, record: Mapping[str, Any], *, drain_s: float = DRAIN_S) -> None:
        """Queue the end (best weights, stage tag, status), then give the thread ``drain_s`` seconds.

        Args:
            status: engineflow's status ("completed", "failed", "interrupted"), mapped by
                :data:`~engineflow.record.outbox.MLFLOW_STATUS`.
        """
        entries: list[dict[str, Any]] = []
        if (self.box.run_dir / "checkpoints" / "best.pt").is_file():
            entries.append({"op": "artifacts", "items": [["checkpoints/best.pt", "checkpoints"]]})
        entries.append({"op": "tags", "tags": {"engineflow.stage": stage_names(record)}})
        entries.append({"op": "status", "status": MLFLOW_STATUS.get(status, "FAILED"), "time": now_ms()})
        try:
            self.box.append(*entries)
        except WriteError as err:  # the run's own record is written; `runs sync` queues its end from it
            self._notify(f"MLflow: the run's end could not be queued ({err}); `engineflow runs sync {self._run_id}` "
                         "sends it")
        self.close(drain_s)

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Let the thread push what is queued for ``drain_s`` seconds at most, then say what is left."""
        thread = self._thread
        if thread is None:
            return
        self._closing.set()
        self._wake.set()
        thread.join(drain_s)
        if thread.is_alive():
            self._given_up = True  # it stops after the request in flight; the daemon thread never holds the exit
            self._notify(f"MLflow: still pushing after {drain_s:g} s; `engineflow runs sync {self._run_id}` "
                         "pushes the rest")
            return
        left = len(self.box.pending())
        result = self.result
        if left:
            why = result.error if result is not None and result.error else "not pushed yet"
            self._notify(f"MLflow: {left} entries pending ({why}); `engineflow runs sync {self._run_id}` "
                         "pushes them")
        elif result is not None and result.mlflow_run_id:
            self._notify(f"MLflow: mirrored to {run_link(self.uri, result.experiment_id, result.mlflow_run_id)}")

    def _push_loop(self) -> None:
        failures = 0
        while not self._given_up:
            closing = self._closing.is_set()  # read before the push: a push begun after close() sees every entry
            try:
                self.result = push(self.box, lock_s=DRAIN_S, give_up=lambda: self._given_up)
            except Exception as err:  # whatever goes wrong here must not reach training
                self.result = Pushed(self.uri, error=f"{type(err).__name__}: {err}")
            failures = failures + 1 if self.result.error else 0
            if closing:
                return
            # At least PUSH_EVERY_S between two pushes, so that short epochs share a request instead of
            # each taking the GIL from training for one; longer while the server does not answer.
            self._closing.wait(min(MAX_BACKOFF_S, PUSH_EVERY_S * 2 ** failures))  # the end cuts it short
            if not failures:
                self._wake.wait()  # then something new to push (the end sets it too)
            self._wake.clear()


def run_link(uri: str, experiment_id: str | None, run_id: str) -> str:
    """Where the MLflow UI shows the run (for an HTTP server), else the run id with its URI."""
    if uri.startswith(("http://", "https://")) and experiment_id is not None:
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} at {uri}"


# ------------------------------------------------------------------------------------------- runs sync
@dataclass
class Synced:
    """One line of ``engineflow runs sync``: a run and what its push did."""

    run_id: str
    result: Pushed

    def line(self) -> str:
        done = self.result
        where = f" (MLflow run {done.mlflow_run_id})" if done.mlflow_run_id else ""
        refused = (f"; MLflow refused {len(done.refused)}: {done.refused[-1]}" if done.refused else "")
        if done.error is not None:
            pushed = f"pushed {done.pushed}, " if done.pushed else ""
            return f"{self.run_id}: {done.error}; {pushed}{done.pending} entries pending{refused}"
        if done.pushed == 0:
            return f"{self.run_id}: up to date with {done.uri}{where}"
        return f"{self.run_id}: pushed {done.pushed} entries to {done.uri}{where}{refused}"


def sync(runs_dir: str | Path, ref: str | None = None) -> list[Synced]:
    """Push what is pending for run ``ref`` (an id, a unique prefix, "last"), or for every run that
    mirrors to MLflow; the Python twin of ``engineflow runs sync``.

    Runs found dead are settled first (KILLED is queued for them), and a run whose end never
    reached its outbox gets the status its record has.

    Raises:
        UnknownRunError: ``ref`` names no run.
        RecipeError: run ``ref`` does not mirror to MLflow.

    Example::

        for line in sync("runs"):
            print(line.line())   # 20261123-084512-3fa2: pushed 12 entries to http://... (MLflow run 9f...)
    """
    from engineflow.errors import UnknownRunError
    from engineflow.record.runs import no_runs_message, reading

    with reading(runs_dir) as store:  # dead runs settled first; nothing created where there is no index
        if store is None:
            if ref is not None:
                raise UnknownRunError(no_runs_message(Path(runs_dir)))
            return []
        records = [store.resolve(ref)] if ref is not None else list(reversed(store.list_runs()))
    found = []
    for record in records:
        box = mirrored(record)
        if box is None:
            if ref is not None:
                raise RecipeError(f"run {record['id']} does not mirror to MLflow (it ran without --mlflow and its "
                                  "recipe sets no mlflow URI)")
            continue
        found.append((record, box))
    cache: dict[str, str | None] = {}
    results = []
    for record, box in found:
        with contextlib.suppress(OSError, WriteError):
            reconcile(record, box)
        results.append(Synced(record["id"], push(box, reachable=cache)))
    return results
