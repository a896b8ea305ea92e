"""``engineflow serve`` and ``ef.serve``: a run's infer step as an HTTP service (Starlette on uvicorn).

Needs the serve extra (``pip install 'engineflow[serve]'``); nothing here imports it before a server is
made, so the rest of engineflow runs without it. Routes::

    POST /predict   {"inputs": sample} or {"instances": [sample, ...]} (or raw bytes for load_sample)
                    200 {"predictions": ...}; 413 body too large; 422 bad input (or the infer step failed
                    on this input alone); 429 queue full (Retry-After); 503 not ready; 504 past the deadline
    GET /health     200 while the process is alive
    GET /ready      200 once the warm-up batch has run, else 503
    GET /metrics    Prometheus text: requests by path and status, latency, batch sizes, queue depth

Each request is one access-log line of JSON on stderr. SIGTERM (or Ctrl-C) stops taking connections,
answers every request already accepted, then stops the inference thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engineflow.app.batcher import Batcher, ItemError, QueueFullError
from engineflow.app.served import InputError, ServedModel, load_served, to_json
from engineflow.errors import RecipeError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

# The batchers of the apps this process serves: a stop signal drains them at once, so that the requests
# uvicorn waits for are not kept waiting --max-wait-ms for company that cannot come.
_BATCHERS: weakref.WeakSet[Batcher] = weakref.WeakSet()
ENV = "ENGINEFLOW_SERVE"  # what each of --workers' processes loads, as JSON
PATHS = ("/predict", "/health", "/ready", "/metrics")


@dataclass(frozen=True)
class ServeOptions:
    """How a server batches and guards its queue (the ``engineflow serve`` options)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_ms: float = 10_000.0
    max_body_bytes: int = 16 * 1024 * 1024
    access_log: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise RecipeError(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "timeout_ms"):
            if not getattr(self, name) >= 0:
                raise RecipeError(f"serve: {name} must be 0 or more milliseconds, got {getattr(self, name)}")


@dataclass
class _Status:
    ready: bool = False
    problem: str | None = None


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (nothing global is touched)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("engineflow_serve_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("engineflow_serve_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["path"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("engineflow_serve_batch_size", "Items per batch of the infer step",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_seconds = Histogram("engineflow_serve_batch_seconds", "Seconds the infer step took per batch",
                                       registry=self.registry,
                                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.queue_depth = Gauge("engineflow_serve_queue_depth", "Items waiting for a batch", registry=self.registry)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BodyTooLargeError(Exception):
    pass


def make_app(model: ServedModel, options: ServeOptions, *, log: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app serving ``model`` (see the module docstring); ``log`` takes each access-log line
    (default: stderr). Its batcher starts and the warm-up batch is queued when the app starts up."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response
    from starlette.routing import Route

    metrics = _Metrics()
    batcher = Batcher(model.predict, max_batch_size=options.max_batch_size, max_wait_ms=options.max_wait_ms,
                      max_queue=options.max_queue, on_batch=metrics.batch)
    metrics.queue_depth.set_function(batcher.depth)
    status = _Status()
    write = log or (lambda line: print(line, file=sys.stderr, flush=True))

    async def predict(request: Request) -> Response:
        if not status.ready:
            return _error(503, status.problem or "not ready: the warm-up batch has not run yet", retry=True)
        try:
            timeout = _timeout(request.headers.get("x-timeout-ms"), options.timeout_ms)
            body = await _read_body(request, options.max_body_bytes)
            content_type = request.headers.get("content-type", "application/json")
            if content_type.split(";")[0].strip().lower() in ("application/json", ""):
                samples, several = model.from_json(_parsed(body))
            else:
                samples, several = [await run_in_threadpool(model.from_bytes, body, content_type)], False
        except _BodyTooLargeError:
            return _error(413, f"the body is larger than {options.max_body_bytes} bytes (--max-body-bytes)")
        except InputError as err:
            return _error(422, str(err))
        request.scope["engineflow.items"] = len(samples)
        try:
            items = batcher.submit(samples, deadline=time.monotonic() + timeout)
        except QueueFullError as err:
            return _error(429, f"busy: {err}; retry later", retry=True)
        outcome = await _wait(request, [item.future for item in items], timeout)
        if outcome != "done":
            batcher.cancel(items)
            if outcome == "disconnected":  # nobody reads it; the access log and metrics say 499
                return Response(status_code=499)
            return _error(504, f"no answer within {timeout * 1000:g} ms (X-Timeout-Ms, or --timeout-ms)")
        for index, item in enumerate(items):
            error = item.future.exception()
            where = f"instances[{index}]" if several else "inputs"
            if isinstance(error, ItemError):
                return _error(422, f"the infer step failed on {where}: {error}")
            if isinstance(error, TimeoutError):
                return _error(504, f"no answer within {timeout * 1000:g} ms (X-Timeout-Ms, or --timeout-ms)")
            if error is not None:
                return _error(500, f"{type(error).__name__}: {error}")
        predictions = [to_json(item.future.result()) for item in items]
        return _json(200, {"predictions": predictions if several else predictions[0]})

    async def health(request: Request) -> Response:
        return _json(200, {"status": "alive", "run": model.run_id})

    async def ready(request: Request) -> Response:
        if status.ready:
            return _json(200, {"status": "ready", "run": model.run_id})
        return _error(503, status.problem or "warming up", retry=True)

    async def metrics_text(request: Request) -> Response:
        text, media_type = metrics.text()
        return Response(text, media_type=media_type)

    async def warm_up() -> None:
        count = min(options.max_batch_size, options.max_queue)
        try:
            items = batcher.submit([model.example] * count, deadline=time.monotonic() + 3600)
            await asyncio.gather(*(item.future for item in items))
            status.ready = True
        except Exception as err:  # the server stays up, unready, and says why
            status.problem = f"the warm-up batch failed: {type(err).__name__}: {err}"
            write(json.dumps({"time": _now(), "event": "warm-up failed", "error": status.problem}))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        batcher.start()
        _BATCHERS.add(batcher)
        warming = asyncio.create_task(warm_up())
        yield
        warming.cancel()
        await asyncio.to_thread(batcher.close)
        _BATCHERS.discard(batcher)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/ready", ready),
              Route("/metrics", metrics_text)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_AccessLog, metrics=metrics, write=write if options.access_log else None)
    app.state.status = status
    app.state.batcher = batcher
    return app


class _AccessLog:
    """Pure ASGI middleware: one JSON line per request, and the request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, metrics: _Metrics,
                 write: Callable[[str], None] | None) -> None:
        self.app, self.metrics, self.write = app, metrics, write

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, code = time.perf_counter(), [500]

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(code[0])).inc()
            self.metrics.latency.labels(path).observe(seconds)
            if self.write is not None:
                client = scope.get("client")
                self.write(json.dumps({"time": _now(), "client": f"{client[0]}:{client[1]}" if client else None,
                                       "method": scope["method"], "path": scope["path"], "status": code[0],
                                       "ms": round(seconds * 1000, 3), "items": scope.get("engineflow.items", 0),
                                       "pid": os.getpid()}))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json(code: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import Response

    return Response(json.dumps(value), status_code=code, media_type="application/json", headers=headers)


def _error(code: int, message: str, *, retry: bool = False) -> Response:
    return _json(code, {"error": message}, {"Retry-After": "1"} if retry else None)


def _timeout(header: str | None, default_ms: float) -> float:
    if header is None:
        return default_ms / 1000
    try:
        value = float(header)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise InputError(f"X-Timeout-Ms must be a positive number of milliseconds, got {header!r}")
    return value / 1000


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as err:
        raise InputError(f"the body is not JSON ({err}); send {{\"inputs\": [...]}}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLargeError
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(request: Request, futures: list[asyncio.Future[Any]], timeout: float) -> str:
    """"done" when every future is, "timeout" past ``timeout`` seconds, "disconnected" if the client left first."""
    gathered = asyncio.gather(*futures, return_exceptions=True)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({gathered, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if gathered in done:
        return "done"
    gathered.cancel()
    return "disconnected" if gone in done else "timeout"


async def _disconnected(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    # once the body is read, the server's next message is the disconnect (or the end of the response)
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class Serving:
    """A server :func:`serve` started: where it listens, which run it serves.

    With ``block=False`` it runs in a background thread of this process: :meth:`wait_ready`, then
    :meth:`stop` (which answers the requests already accepted first).
    """

    url: str
    run_id: str
    step: str
    _server: Any = field(repr=False, default=None)
    _thread: threading.Thread | None = field(repr=False, default=None)
    _status: _Status | None = field(repr=False, default=None)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once ``/ready`` would answer 200; RecipeError if the warm-up failed or took too long."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._status is not None and self._status.ready:
                return
            if self._status is not None and self._status.problem:
                raise RecipeError(f"serve: {self._status.problem}")
            if self._thread is not None and not self._thread.is_alive():
                raise RecipeError(f"serve: the server at {self.url} stopped before it was ready")
            time.sleep(0.01)
        raise RecipeError(f"serve: {self.url} was not ready within {timeout:g} s")

    def stop(self) -> None:
        """Stop taking connections, answer what was accepted, and wait for the server to end."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()


def serve(recipe: str | Path, *, run: str | None = None, stage: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, max_batch_size: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
          timeout_ms: float = 10_000.0, max_body_bytes: int = 16 * 1024 * 1024, workers: int = 1,
          device: str = "auto", runs_dir: str | Path | None = None, ignore_changes: bool = False,
          trust_code: bool = False, access_log: bool = True, block: bool = True,
          announce: Callable[[str], None] | None = None) -> Serving:
    """Serve a run's infer step over HTTP with micro-batching: what ``engineflow serve`` does.

    The run is the one ``engineflow eval`` would use (``run``: an id or "last"), loaded as
    :func:`engineflow.load_run` loads it (its ``setup()`` runs to build the model; no engine trains).
    ``port=0`` picks a free port. ``block=True`` returns when the server has stopped (SIGTERM, Ctrl-C);
    ``block=False`` returns at once, the server running in a background thread (one worker only).

    Example:
        >>> import io, json, tempfile, urllib.request
        >>> import engineflow as ef
        >>> runs = tempfile.mkdtemp()
        >>> _ = ef.run("recipes/sine.py", {"epochs": 1, "samples": 64}, device="cpu", runs_dir=runs,
        ...            stream=io.StringIO())
        >>> server = ef.serve("recipes/sine.py", runs_dir=runs, port=0, block=False, access_log=False)
        >>> server.wait_ready()
        >>> ask = urllib.request.Request(f"{server.url}/predict", json.dumps({"instances": [[0.5], [-1.0]]}).encode(),
        ...                              {"Content-Type": "application/json"})
        >>> answer = json.load(urllib.request.urlopen(ask))
        >>> len(answer["predictions"]), len(answer["predictions"][0])  # one prediction of one value per instance
        (2, 1)
        >>> server.stop()
    """
    options = ServeOptions(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           timeout_ms=timeout_ms, max_body_bytes=max_body_bytes, access_log=access_log)
    uvicorn = _require_extra()
    if workers < 1:
        raise RecipeError(f"serve: workers must be at least 1, got {workers}")
    if workers > 1 and not block:
        raise RecipeError("serve: block=False runs one worker in this process; give workers=1")
    model = load_served(recipe, ref=run, stage=stage, device=device, runs_dir=runs_dir,
                        ignore_changes=ignore_changes, trust_code=trust_code, announce=announce)
    sock = _bound(host, port)
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    if announce is not None:
        announce(f"listening on {url}: infer step {model.step}, input {model.schema.describe()} per sample; "
                 f"batches of up to {max_batch_size} or {max_wait_ms:g} ms; "
                 f"{workers} worker{'s' if workers > 1 else ''}")
    if workers > 1:
        return _serve_workers(uvicorn, sock, url, model, workers, options, locals())
    app = make_app(model, options)
    server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=None))
    serving = Serving(url, model.run_id, model.step, server, None, app.state.status)
    if block:
        server.run(sockets=[sock])
        return serving
    serving._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="engineflow-serve",
                                       daemon=True)
    serving._thread.start()
    return serving


def _serve_workers(uvicorn: Any, sock: socket.socket, url: str, model: ServedModel, workers: int,
                   options: ServeOptions, given: dict[str, Any]) -> Serving:
    """``workers`` processes (uvicorn's supervisor) accept on one socket; each loads its own copy of the run."""
    from uvicorn.supervisors import Multiprocess

    load = {key: given[key] for key in ("stage", "device", "ignore_changes", "trust_code")}
    load.update(recipe=str(given["recipe"]), ref=given["run"],
                runs_dir=None if given["runs_dir"] is None else str(given["runs_dir"]))
    os.environ[ENV] = json.dumps({"load": load, "options": asdict(options)})
    config = uvicorn.Config("engineflow.app.serving:app_from_env", factory=True, workers=workers, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=None)
    run_id, step = model.run_id, model.step
    del model  # each worker loads its own copy
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        os.environ.pop(ENV, None)
    return Serving(url, run_id, step)


def app_from_env() -> Starlette:
    """What each ``--workers`` process serves: the run and options the parent put in ``$ENGINEFLOW_SERVE``."""
    given = json.loads(os.environ[ENV])
    return make_app(load_served(**given["load"]), ServeOptions(**given["options"]))


def _server_class(uvicorn: Any) -> Any:
    """uvicorn's Server, draining the batchers on SIGTERM/SIGINT and then ending normally (exit 0): its own
    ``handle_exit`` would raise the signal again once the server has stopped."""

    class Server(uvicorn.Server):  # type: ignore[misc, name-defined]
        def handle_exit(self, sig: int, frame: Any) -> None:
            for batcher in list(_BATCHERS):
                batcher.drain()
            if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop without waiting
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


def _require_extra() -> Any:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise RecipeError(f"serve needs the serve extra ({err.name} is missing): "
                          "pip install 'engineflow[serve]'") from None
    return uvicorn


def _bound(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it a response
    # written in two parts waits for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RecipeError(f"serve: cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
