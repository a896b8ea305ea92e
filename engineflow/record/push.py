"""Pushing a run's outbox to its MLflow server, with MLflow's own client (``MlflowClient``, ``log_batch``).

Each push takes the run's push lock, checks that the server answers (its ``/health``), then sends
the pending entries in order and moves ``pushed`` in the state past each group once MLflow has it.
Sending an entry again changes nothing in MLflow, so a push cut off anywhere is simply done again.
Names MLflow would refuse are made acceptable here (other characters become "_"), and values cut to
MLflow's lengths; the outbox keeps them as the run recorded them.

MLflow is imported by :func:`mlflow_client`, once per process, never at import.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engineflow.record.folders import read_record
from engineflow.record.outbox import Outbox, first_entries, mirrored, now_ms

__all__ = ["BRIEF_PUSH_S", "PROBE_TIMEOUT_S", "SYNC_LOCK_S", "Pushed", "mlflow_client", "push", "push_briefly",
           "push_settled", "unreachable"]

BRIEF_PUSH_S = 5.0  # what `runs list` spends pushing the status of the runs it found dead
PROBE_TIMEOUT_S = 3.0  # a server that does not answer its health check within this is unreachable
SYNC_LOCK_S = 30.0  # how long `runs sync` waits for another process pushing the same run
# MLflow's limits: a log_batch call takes 1000 metrics, 100 params and 100 tags; a param value has
# at most 6000 characters, a tag value 8000; keys hold letters, digits and _ - . / space colon.
_METRICS_PER_CALL, _PARAMS_PER_CALL, _TAGS_PER_CALL = 1000, 100, 100
_PARAM_LENGTH, _TAG_LENGTH = 6000, 8000
_KEY_CHARS = re.compile(r"[^\w\-./ :]")
# errors that sending again will not fix: the entry is set aside (counted, reported) instead of blocking the rest
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}


@dataclass
class Pushed:
    """What one push of a run's outbox did.

    Attributes:
        uri: the tracking URI pushed to.
        pushed: entries MLflow took (or refused) in this push.
        pending: entries still waiting.
        error: why the push stopped early (server unreachable, lock held), else None.
        refused: entries MLflow refused for good (a bad key, a run deleted there), set aside.
        mlflow_run_id, experiment_id: the MLflow run mirrored to, once known.
    """

    uri: str | None
    pushed: int = 0
    pending: int = 0
    error: str | None = None
    refused: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    experiment_id: str | None = None


def push(box: Outbox, *, lock_s: float = SYNC_LOCK_S, give_up: Callable[[], bool] | None = None,
         reachable: dict[str, str | None] | None = None) -> Pushed:
    """Push the pending entries of ``box`` to its MLflow server, in order; idempotent.

    ``pushed`` in the state moves past each group of entries once MLflow has it; a push cut off
    in between sends that group again, which changes nothing in MLflow.

    Args:
        lock_s: how long to wait for another pusher of the same run.
        give_up: polled between requests; True stops the push (the rest stays pending).
        reachable: a cache of health checks by URI, shared by the pushes of one ``runs sync``.

    Returns:
        what was done, as a :class:`Pushed`; a push never raises for MLflow's sake.

    Example::

        done = push(Outbox(Path("runs/digits/20261123-084512-3fa2")))
        done.pushed, done.pending, done.error   # (12, 0, None), or (0, 12, "could not reach ...")
    """
    with box.locked(lock_s) as held:
        state = box.state()
        if not state.get("uri"):  # a lost state.json: run.json keeps the URI, and pushing starts over
            recorded = (read_record(box.run_dir) or {}).get("mlflow")
            state = {"uri": recorded.get("uri") if isinstance(recorded, dict) else None, "pushed": 0}
        uri = state.get("uri")
        entries = box.pending(int(state.get("pushed") or 0))
        done = Pushed(uri, pending=len(entries), mlflow_run_id=state.get("run_id"),
                      experiment_id=state.get("experiment_id"))
        if not held:
            done.error = "another process is pushing this run"
            return done
        if not entries:
            return done
        if not uri:
            done.error = f"neither {box.state_path} nor run.json names a tracking URI"
            return done
        cache = reachable if reachable is not None else {}
        if uri not in cache:
            cache[uri] = unreachable(uri)
        if cache[uri] is not None:
            done.error = f"could not reach {uri}: {cache[uri]}"
            return done
        try:
            mlflow = mlflow_client(uri)
        except ImportError as err:
            done.error = f"MLflow's client cannot be imported ({err}): pip install 'engineflow[mlflow]'"
            return done
        for group, end in _groups(entries):
            if give_up is not None and give_up():
                break
            try:
                _apply(mlflow, box, state, group)
            except Exception as err:
                code = getattr(err, "error_code", None)
                if code not in _REFUSED:
                    done.error = f"{uri}: {_one_line(err)}"
                    break
                done.refused.append(f"{group[0]['op']}: {_one_line(err)}")
                state["refused"] = int(state.get("refused") or 0) + len(group)
            state["pushed"] = end
            box.save_state(state)
            done.pushed += len(group)
            done.pending -= len(group)
        done.mlflow_run_id, done.experiment_id = state.get("run_id"), state.get("experiment_id")
        return done


def push_briefly(boxes: Iterable[Outbox], budget_s: float = BRIEF_PUSH_S) -> None:
    """Push each outbox for at most ``budget_s`` seconds in all; what is left stays pending, and
    nothing is raised (used by ``runs list`` for the status of the runs it settles)."""
    deadline = time.monotonic() + budget_s
    cache: dict[str, str | None] = {}
    for box in boxes:
        if time.monotonic() >= deadline:
            return
        with contextlib.suppress(Exception):
            push(box, lock_s=1.0, give_up=lambda: time.monotonic() >= deadline, reachable=cache)


def push_settled(records: list[dict[str, Any]]) -> None:
    """Push, briefly, the status just queued for each settled run that mirrors to MLflow (see
    :func:`push_briefly`); a run not mirrored costs nothing."""
    boxes = [box for box in map(mirrored, records) if box is not None]
    if boxes:
        push_briefly(boxes)


def unreachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an HTTP tracking server cannot be reached now (None when it answers, or is not HTTP).

    One plain request to its ``/health``: MLflow's client would retry a refused connection for
    minutes, which a push that will simply be tried again later has no use for.

    Example:
        >>> unreachable("http://127.0.0.1:1") is not None   # nothing listens on port 1
        True
        >>> unreachable("sqlite:///mlflow.db") is None      # not a server: MLflow's client decides
        True
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (behind a proxy, with auth): MLflow's client takes it from here
    except urllib.error.URLError as err:
        reason = err.reason
        if "ssl" in type(reason).__name__.lower() or "certificate" in str(reason).lower():
            return None  # TLS settings are MLflow's (MLFLOW_TRACKING_INSECURE_TLS, ...), not the probe's
        return str(reason)
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


# ------------------------------------------------------------------------------------ MLflow, lazily here
_clients: dict[str, Any] = {}


def mlflow_client(uri: str) -> Any:
    """MLflow's client for ``uri`` (made once per process), with every module a push uses imported."""
    client = _clients.get(uri)
    if client is None:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.entities", "mlflow.exceptions", "urllib.request"):  # so the pushing thread imports none
            importlib.import_module(name)

        client = _clients[uri] = MlflowClient(tracking_uri=uri)
    return client


def _groups(entries: list[tuple[dict[str, Any], int]]) -> list[tuple[list[dict[str, Any]], int]]:
    """Consecutive metrics entries go in one group (one log_batch per 1000 metrics); others alone."""
    groups: list[tuple[list[dict[str, Any]], int]] = []
    for entry, end in entries:
        if groups and entry["op"] == "metrics" and groups[-1][0][0]["op"] == "metrics" and len(groups[-1][0]) < 50:
            groups[-1] = (groups[-1][0] + [entry], end)
        else:
            groups.append(([entry], end))
    return groups


def _apply(client: Any, box: Outbox, state: dict[str, Any], group: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    op = group[0]["op"]
    run_id = _ensure_run(client, box, state, group[0] if op == "start" else None)
    if op == "start":
        return
    if op == "metrics":
        metrics = [Metric(_key(name), float(value), int(entry["time"]), int(entry["step"]))
                   for entry in group for name, value in entry["values"].items()
                   if isinstance(value, (int, float))]
        for i in range(0, len(metrics), _METRICS_PER_CALL):
            client.log_batch(run_id, metrics=metrics[i:i + _METRICS_PER_CALL])
    elif op == "params":
        params = [Param(_key(k), str(v)[:_PARAM_LENGTH]) for k, v in group[0]["params"].items()]
        for i in range(0, len(params), _PARAMS_PER_CALL):
            client.log_batch(run_id, params=params[i:i + _PARAMS_PER_CALL])
    elif op == "tags":
        tags = [RunTag(_key(k), str(v)[:_TAG_LENGTH]) for k, v in group[0]["tags"].items()]
        for i in range(0, len(tags), _TAGS_PER_CALL):
            client.log_batch(run_id, tags=tags[i:i + _TAGS_PER_CALL])
    elif op == "status":
        _set_status(client, run_id, group[0]["status"], group[0].get("time"))
    elif op == "artifacts":
        for local, destination in group[0]["items"]:
            path = box.run_dir / local
            if path.is_dir():
                client.log_artifacts(run_id, str(path), destination)
            elif path.is_file():
                client.log_artifact(run_id, str(path), destination)


def _ensure_run(client: Any, box: Outbox, state: dict[str, Any], start: dict[str, Any] | None) -> str:
    """The MLflow run of this engineflow run: from the state, else found by its ``engineflow.run_id``
    tag (a push that created it but died before saving the state), else created."""
    if state.get("run_id") and start is None:
        return str(state["run_id"])
    if start is None:  # the start entry was lost (a torn first line): rebuild it from run.json
        record = read_record(box.run_dir) or {"id": box.run_dir.name, "experiment": box.run_dir.parent.name}
        start = first_entries(record, box.run_dir, backfill=False)[0]
    tags = {_key(k): str(v)[:_TAG_LENGTH] for k, v in (start.get("tags") or {}).items()}
    if state.get("run_id"):  # the start again (a push cut off after it): its tags are all there is to add
        client.log_batch(state["run_id"], tags=[_tag(k, v) for k, v in tags.items()])
        return str(state["run_id"])
    experiment_id = _experiment_id(client, str(start.get("experiment") or box.run_dir.parent.name))
    engineflow_id = str(tags.get("engineflow.run_id") or start.get("run_name") or box.run_dir.name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`engineflow.run_id` = '{engineflow_id}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(experiment_id, start_time=start.get("time"), tags=tags,
                                run_name=start.get("run_name"))
        run_id = run.info.run_id
    state.update(run_id=run_id, experiment_id=experiment_id)
    box.save_state(state)  # at once: a push that dies now must not create a second MLflow run
    return run_id


def sweep_parent(uri: str, experiment: str, study: str) -> str:
    """The MLflow run under which a sweep's trials are nested (tag ``mlflow.parentRunId``): the one
    tagged ``engineflow.sweep`` = ``study`` in ``experiment``, else a new one (named ``sweep STUDY``)."""
    client = mlflow_client(uri)
    experiment_id = _experiment_id(client, experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`engineflow.sweep_parent` = '{study}'",
                               max_results=1)
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(experiment_id, run_name=f"sweep {study}", tags={"engineflow.sweep_parent": study})
    return str(run.info.run_id)


def end_sweep_parent(uri: str, run_id: str) -> None:
    """Mark a sweep's MLflow run FINISHED (a worker found no trial left)."""
    _set_status(mlflow_client(uri), run_id, "FINISHED", None)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException as err:
            if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":  # another run created it meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(f"the MLflow experiment {name!r} is deleted on the server; restore it there "
                           "(mlflow experiments restore) and run `engineflow runs sync` again")
    return str(experiment.experiment_id)


def _set_status(client: Any, run_id: str, status: str, at_ms: int | None) -> None:
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
        return
    # MlflowClient.set_terminated would also write a link to the run on stdout, from this thread,
    # into the middle of the training's output; its store's update_run_info is the same request.
    # That store is MLflow's private API, used here only, in the 3.x releases it was checked in.
    from mlflow.version import VERSION

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not VERSION.startswith("3.") or store is None or not hasattr(store, "update_run_info"):
        client.set_terminated(run_id, status, end_time=at_ms)
        return
    from mlflow.entities import RunStatus

    store.update_run_info(run_id, RunStatus.from_string(status), at_ms or now_ms(), None)


def _tag(key: str, value: Any) -> Any:
    from mlflow.entities import RunTag

    return RunTag(_key(key), str(value)[:_TAG_LENGTH])


def _key(name: str) -> str:
    """A metric, param or tag name MLflow accepts: other characters become "_"."""
    return _KEY_CHARS.sub("_", str(name))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__
