"""The OIP v2 HTTP app: health, metadata, readiness, inference and /metrics over FastAPI.

Each served model has its own runtime session (opened with the model's stored runtime and
settings, see :mod:`edgeopt.runtimes.sessions`) and its own :class:`Batcher`. Every failure a
request can cause becomes a JSON ``{"error": ...}`` with a 4xx/5xx status; the app keeps serving.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt._version import __version__
from edgeopt.deps import require
from edgeopt.errors import BadInput
from edgeopt.model import Model, TensorSpec
from edgeopt.serve.batching import Batcher, ModelRunError, QueueFull
from edgeopt.serve.connections import IN_FLIGHT_KEY, RESPOND_KEY
from edgeopt.serve.metrics import ServeMetrics
from edgeopt.serve.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_response,
    parse_infer_request,
    tensor_metadata,
)

if TYPE_CHECKING:
    from edgeopt.runtimes import Session
    from edgeopt.runtimes.sessions import RunSettings

log = logging.getLogger("edgeopt.serve")
VERSION = "1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ServeConfig:
    """Batching, limits and deadlines shared by every served model.

    Args:
        max_batch: most samples merged into one runtime call (1: no merging).
        max_delay_ms: longest a request waits for others to join its batch.
        max_request_mb: largest request body accepted (413 above).
        queue_size: most requests waiting per model (503 above).
        header_timeout_s: a request's head must arrive within this (408 after; idle sockets closed).
        body_timeout_s: a request's body must arrive within this after its head (408 after).
        max_connections: most open connections; above it the longest idle one is closed.
        max_header_kb: largest request line + headers (431 above).
        token: if set, every endpoint but /v2/health/* needs ``Authorization: Bearer <token>``.
    """

    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_request_mb: float = 16.0
    queue_size: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    max_header_kb: int = 64
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_int("--max-batch", self.max_batch, 1, 4096)
        _check_number("--max-delay-ms", self.max_delay_ms, 0.0, 10_000.0, low_open=False)
        _check_number("--max-request-mb", self.max_request_mb, 0.0, 4096.0, low_open=True)
        _check_int("--queue-size", self.queue_size, 1, 1_000_000)
        _check_number("--header-timeout", self.header_timeout_s, 0.0, 3600.0, low_open=True)
        _check_number("--body-timeout", self.body_timeout_s, 0.0, 3600.0, low_open=True)
        _check_int("--max-connections", self.max_connections, 2, 1_000_000)
        _check_int("--max-header-kb", self.max_header_kb, 1, 1024)
        if self.token is not None and (not self.token or not self.token.isascii() or not self.token.isprintable()
                                       or " " in self.token):
            raise BadInput("--token must be printable ASCII without spaces")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


def _check_int(flag: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f"{flag} must be an integer in {low}..{high}, got {value}")


def _check_number(flag: str, value: Any, low: float, high: float, *, low_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g} and <= {high:g}" if low_open else f"in {low:g}..{high:g}"
        raise BadInput(f"{flag} must be a finite number {bound}, got {value}")


@dataclass
class ServedModel:
    """One model behind the server: its session, run settings and batching limit."""

    name: str
    model: Model
    settings: RunSettings
    session: Session
    max_batch: int
    batcher: Batcher | None = field(default=None, repr=False)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.model.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.model.outputs

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name, "versions": [VERSION],
            "platform": f"{self.settings.runtime}_{self.model.format}",
            "inputs": [tensor_metadata(s) for s in self.inputs],
            "outputs": [tensor_metadata(s) for s in self.outputs],
            "parameters": {"max_batch_size": self.max_batch, "runtime": self.settings.runtime,
                           "threads": self.settings.threads, "sha256": self.model.sha256},
        }


def parse_model_arg(arg: str) -> tuple[str, str]:
    """``name=path`` or ``path`` (name = the file stem) -> (name, path).

    Raises:
        BadInput: the name has characters a URL path segment should not carry.
    """
    name, sep, path = arg.partition("=")
    if not sep or not name or "/" in name or Path(name).suffix in (".onnx", ".tflite", ".pte", ".py"):
        path, name = arg, Path(arg.split(":")[0]).stem
    if not _NAME_RE.match(name):
        raise BadInput(f"model name {name!r} must be letters, digits, '_', '.' or '-'; use NAME=PATH")
    return name, path


def load_served(args: list[str], *, runtime: str | None = None, threads: int | None = None,
                max_batch: int = 8) -> list[ServedModel]:
    """Load every ``[name=]path`` and open its session, before any port is bound.

    Args:
        args: model paths, each optionally prefixed with ``name=``.
        runtime: override every model's stored runtime.
        threads: intra-op threads per session (default: the model's stored setting, else the host's).
        max_batch: the server's batching limit; models with a fixed batch dimension get 1.

    Returns:
        One ServedModel per argument, in order.

    Raises:
        BadInput / ModelError: a missing or unreadable model, a duplicate name, a bad runtime.

    Example:
        >>> served = load_served(["digits=examples/digits/digits_cnn.onnx"], threads=1)  # doctest: +SKIP
    """
    from edgeopt.model import load_model
    from edgeopt.runtimes.sessions import open_session, resolve_settings

    if not args:
        raise BadInput("give at least one model to serve")
    served: list[ServedModel] = []
    for arg in args:
        name, path = parse_model_arg(arg)
        if any(s.name == name for s in served):
            raise BadInput(f"two models are named {name!r}; name them with NAME=PATH")
        model = load_model(path)
        if not model.inputs:
            raise BadInput(f"{path}: the model's input shapes are unknown, so requests cannot be validated")
        settings = resolve_settings(model, runtime=runtime, threads=threads)
        session = open_session(model, settings)
        served.append(ServedModel(name=name, model=model, settings=settings, session=session,
                                  max_batch=max_batch if _batchable(model) else 1))
    return served


_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


class _InferFastPath:
    """The served ASGI app: checks the bearer token, sends ``POST .../infer`` straight to its handler,
    and everything else to the FastAPI app inside.

    It wraps the FastAPI app rather than being one of its middlewares: the handler already turns
    every failure into a JSON error, and FastAPI's own layers (error, body-limit and telemetry
    middlewares, request objects) cost about 0.1 ms per request with the caches cold after a
    model run (benchmarks/serve_ab.py). The token guards every path but ``/v2/health/*`` (probes
    carry no credentials). Attributes such as ``state`` are the FastAPI app's.
    """

    def __init__(self, app: Any, handler: Any, token: str | None = None) -> None:
        self.app = app
        self.handler = handler
        self.expected = ("Bearer " + token).encode("latin-1") if token else None

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        import hmac

        assert self.expected is not None
        for key, value in headers:
            if key == b"authorization":
                scheme, _, credential = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + credential.strip(),
                                                                           self.expected)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if (self.expected is not None and not scope["path"].startswith("/v2/health/")
                    and not self._authorized(scope["headers"])):
                await _send(send, 401, b'{"error":"this server needs an Authorization: Bearer token"}',
                            {"content-type": "application/json", "www-authenticate": "Bearer"})
                return
            if scope["method"] == "POST":
                match = _INFER_PATH.match(scope["path"])
                if match:
                    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                    in_flight = scope.get(IN_FLIGHT_KEY)  # set by the server's protocol (not by test clients)
                    alone = in_flight is not None and in_flight() <= 1
                    direct = scope.get(RESPOND_KEY)  # set by the server's protocol: one write, no ASGI messages
                    await self.handler(match.group(1), match.group(2), headers, receive,
                                       lambda status, body, extra: _send(send, status, body, extra, direct), alone)
                    return
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


async def _send(send: Any, status: int, body: bytes, headers: dict[str, str], direct: Any = None) -> None:
    """Answer through the protocol's one-call writer (``direct``, when the server offers it and takes
    this response), else through the two ASGI messages."""
    if direct is not None and direct(status, headers, body):
        return
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _path(request: Any) -> tuple[str, str | None]:
    params = request.path_params
    return params["name"], params.get("version") or None


def _batchable(model: Model) -> bool:
    """Merging needs a dynamic first dimension on every input and output."""
    for spec in [*model.inputs, *model.outputs]:
        if not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            return False
    return True


def create_app(models: list[ServedModel], config: ServeConfig | None = None) -> Any:
    """The ASGI app serving ``models`` over OIP v2 (FastAPI inside); batchers start and drain with its lifespan.

    Example:
        >>> app = create_app(load_served(["examples/digits/digits_cnn.onnx"]))  # doctest: +SKIP
        >>> # uvicorn.run(app) or fastapi.testclient.TestClient(app)
    """
    fastapi = require("fastapi", extra="serve")
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    cfg = config or ServeConfig()
    metrics = ServeMetrics()
    by_name = {m.name: m for m in models}
    state = {"ready": False}

    for m in models:
        m.batcher = Batcher(
            m.name, m.session.run, output_names=list(m.session.output_names),
            max_batch=min(m.max_batch, cfg.max_batch), max_delay=cfg.max_delay_ms / 1000.0,
            queue_size=cfg.queue_size,
            on_batch=metrics.batch_size.labels(model=m.name).observe,
            on_depth=metrics.queue_depth.labels(model=m.name).set)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        for m in models:
            assert m.batcher is not None
            m.batcher.start()
        state["ready"] = True
        log.info("ready", extra={"event": "ready", "models": list(by_name)})
        try:
            yield
        finally:
            state["ready"] = False
            log.info("draining", extra={"event": "shutdown"})
            for m in models:
                assert m.batcher is not None
                await m.batcher.stop()
            log.info("stopped", extra={"event": "stopped"})

    app = fastapi.FastAPI(title="edgeopt serve", version=__version__, lifespan=lifespan,
                          docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    def lookup(name: str, version: str | None) -> ServedModel:
        served = by_name.get(name)
        if served is None:
            raise ProtocolError(404, f"unknown model {name[:100]!r}")  # the list of models is not for strangers
        if version is not None and version != VERSION:
            raise ProtocolError(404, f"model {name!r} has no version {version[:100]!r}; versions: {VERSION}")
        return served

    async def server_metadata(request: Request) -> JSONResponse:
        return JSONResponse({"name": "edgeopt", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def model_metadata(request: Request) -> JSONResponse:
        try:
            return JSONResponse(lookup(*_path(request)).metadata())
        except ProtocolError as exc:
            return error(exc.status, str(exc))

    async def model_ready(request: Request) -> JSONResponse:
        try:
            served = lookup(*_path(request))
        except ProtocolError as exc:
            return error(exc.status, str(exc))
        ok = state["ready"]
        return JSONResponse({"name": served.name, "ready": ok}, status_code=200 if ok else 503)

    async def read_body(headers: dict[str, str], receive: Any) -> bytes:
        limit = cfg.max_request_bytes
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise ProtocolError(400, f"Content-Length must be an integer, got {declared!r}")
            if int(declared) > limit:
                raise ProtocolError(413, f"request body of {int(declared)} bytes exceeds --max-request-mb "
                                         f"{cfg.max_request_mb:g}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProtocolError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"request body exceeds --max-request-mb {cfg.max_request_mb:g}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def error_body(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
        return status, json.dumps({"error": message}).encode(), {"content-type": "application/json"}

    async def infer_core(name: str, version: str | None, headers: dict[str, str], receive: Any,
                         respond: Any, alone: bool = False) -> None:
        """One inference request, answered with ``await respond(status, body, headers)``; every failure
        becomes a JSON error. Metrics and the log line come after the answer is written (off the
        client's wait).

        ``alone``: no other request is in flight, so this one need not wait in the batching queue."""
        start = time.perf_counter()
        label = name if name in by_name else "_unknown"
        samples = 0
        decode_seconds = None
        try:
            served = lookup(name, version)
            batcher = served.batcher
            assert batcher is not None
            batcher.arrival_started()
            try:
                body = await read_body(headers, receive)
                decode_start = time.perf_counter()
                req = parse_infer_request(body, header_length=headers.get(HEADER_LENGTH),
                                          inputs=served.inputs, outputs=served.outputs)
                decode_seconds = time.perf_counter() - decode_start
            finally:
                batcher.arrival_ended()
            samples = req.batch
            results = await batcher.submit(req, alone=alone)
            payload, out_headers = encode_response(model_name=served.name, version=VERSION, request=req,
                                                   results=results)
            answer = (200, payload, out_headers)
        except ProtocolError as exc:
            answer = error_body(exc.status, str(exc))
        except QueueFull as exc:
            answer = error_body(503, str(exc))
        except ModelRunError as exc:
            answer = error_body(exc.status, str(exc))
        except Exception:  # never let one request take the server down; details only in the log
            log.exception("unexpected error", extra={"model": label})
            answer = error_body(500, "internal error; the server log has the details")
        status = answer[0]
        seconds = time.perf_counter() - start
        await respond(*answer)
        metrics.observe_request(label, status, seconds, decode_seconds)
        level = logging.INFO if status < 500 else logging.ERROR
        if log.isEnabledFor(level):
            extra: dict[str, Any] = {"event": "infer", "model": label, "status": status,
                                     "latency_ms": round(seconds * 1000.0, 3), "samples": samples}
            if status != 200:
                extra["error"] = answer[1].decode(errors="replace")[:300]
            log.log(level, "infer", extra=extra)

    async def infer(request: Request) -> Response:
        name, version = _path(request)
        answer: list[Response] = []

        async def respond(status: int, body: bytes, headers: dict[str, str]) -> None:
            answer.append(Response(body, status_code=status, headers=headers))

        await infer_core(name, version, dict(request.headers), request.receive, respond)
        return answer[0]

    async def prometheus(request: Request) -> Response:
        for m in models:
            assert m.batcher is not None
            metrics.queue_depth.labels(model=m.name).set(m.batcher.depth())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Plain Starlette routes: the handlers read raw bodies, so FastAPI's per-call validation is pure overhead.
    routes = [("/v2", server_metadata, "GET"), ("/v2/health/live", live, "GET"),
              ("/v2/health/ready", ready, "GET"), ("/metrics", prometheus, "GET")]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [(prefix, model_metadata, "GET"), (prefix + "/ready", model_ready, "GET"),
                   (prefix + "/infer", infer, "POST")]
    for path, handler, method in routes:
        app.add_route(path, handler, methods=[method])
    app.state.metrics = metrics
    app.state.models = by_name
    return _InferFastPath(app, handler=infer_core, token=cfg.token)
