"""Run the app under uvicorn: bind first (a busy port is a one-line error), JSON logs, graceful stop.

On SIGTERM or SIGINT uvicorn stops accepting connections, lets in-flight requests finish (up to
``graceful_seconds``), then the app's lifespan drains every batcher queue before the process exits.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from typing import Any

from edgeopt.deps import require
from edgeopt.errors import BadInput
from edgeopt.serve.app import ServeConfig, ServedModel, create_app
from edgeopt.serve.connections import guarded_protocol

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "color_message" and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for edgeopt and uvicorn loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise BadInput(f"--log-level must be debug, info, warning or error, got {level!r}")
    for name in ("edgeopt.serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(numeric)
        logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or BadInput naming why it cannot be had."""
    if not 0 <= port <= 65535:
        raise BadInput(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadInput(f"--host {host!r} cannot be resolved: {exc.strerror}") from None
    family, socktype, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets that say so,
    # and without it Nagle + delayed ACKs add ~40 ms to every response written in two parts.
    sock = socket.socket(family, socktype, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def check_fd_limit(max_connections: int) -> None:
    """BadInput unless the process may open ``max_connections`` sockets plus room for models and logs."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + 64 > soft:
        raise BadInput(f"--max-connections {max_connections} needs {max_connections + 64} file descriptors; "
                       f"this process may open {soft} (raise it with ulimit -n, or lower --max-connections)")


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_server(models: list[ServedModel], *, config: ServeConfig | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", graceful_seconds: float = 30.0,
          on_listening: Any = None) -> None:
    """Serve ``models`` until SIGTERM/SIGINT; returns after in-flight requests have finished.

    Args:
        models: from :func:`edgeopt.serve.app.load_served`.
        config: batching and limits.
        host, port: where to listen (port 0 picks a free one).
        log_level: debug, info, warning or error.
        graceful_seconds: longest wait for in-flight requests on shutdown.
        on_listening: called with (host, port) once the socket is bound, before serving.

    Raises:
        BadInput: the address cannot be bound.

    Example:
        >>> run_server(load_served(["examples/digits/digits_cnn.onnx"]), port=8000)  # doctest: +SKIP
    """
    uvicorn = require("uvicorn", extra="serve")
    cfg = config or ServeConfig()
    configure_logging(log_level)
    check_fd_limit(cfg.max_connections)
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    app = create_app(models, cfg)
    # Bodies in flight are bounded: at most this many requests are handled at once (503 above,
    # except /v2/health/*), so memory stays below about max_in_flight x --max-request-mb.
    max_in_flight = max(64, 2 * cfg.queue_size * max(1, len(models)))
    http = guarded_protocol(header_timeout=cfg.header_timeout_s, body_timeout=cfg.body_timeout_s,
                            max_header_bytes=cfg.max_header_kb * 1024, max_connections=cfg.max_connections,
                            max_in_flight=max_in_flight, max_body_bytes=cfg.max_request_bytes)
    # proxy_headers off: no X-Forwarded-For rewriting layer on every request (nothing here uses the client
    # address); no "server: uvicorn" header: one header less to write and validate, and nothing told about the stack
    server = uvicorn.Server(uvicorn.Config(
        app, http=http, ws="none", log_config=None, access_log=False, proxy_headers=False, server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_seconds, timeout_keep_alive=30, log_level=log_level))
    if on_listening is not None:
        on_listening(host, bound_port)
    if not is_loopback(host) and cfg.token is None:
        logging.getLogger("edgeopt.serve").warning("no token", extra={
            "event": "no_token", "host": host,
            "hint": "anyone who can reach this address can run the models; set EDGEOPT_SERVE_TOKEN"})
    logging.getLogger("edgeopt.serve").info("listening", extra={
        "event": "listening", "host": host, "port": bound_port, "models": [m.name for m in models],
        "max_batch": cfg.max_batch, "max_delay_ms": cfg.max_delay_ms, "queue_size": cfg.queue_size})
    # uvicorn re-raises the signal it stopped on once shutdown is complete; a graceful stop is a
    # normal exit here (code 0), so that re-raise lands in a handler that ignores it.
    stop_signals = [s for s in (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread()]
    previous = {s: signal.signal(s, lambda *_: None) for s in stop_signals}
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
