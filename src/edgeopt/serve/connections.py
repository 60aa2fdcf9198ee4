"""Connection guards uvicorn lacks: header and body deadlines, a header size cap, a connection cap.

uvicorn (0.54) arms its keep-alive timer only after a response, so a socket that never sends a
byte, or sends a request head one byte a minute, stays open for ever (uvicorn issues #157 and
#160: ``--timeout-request-start`` / ``--timeout-request-complete`` were never built). Its
httptools parser also gathers a header of any length in memory, and its ``limit_concurrency``
counts open connections, so a few hundred idle sockets made every request, health checks
included, answer 503. ASGI middleware cannot fix any of this: it runs after the head is parsed.

:func:`guarded_protocol` returns a subclass of uvicorn's httptools protocol that adds, per connection:

- a header deadline: the request head must be complete ``header_timeout`` seconds after the
  connection opens (or after the first byte of a keep-alive request); else 408 and close
  (a connection that sent nothing is closed without a reply);
- a body deadline: the body must be complete ``body_timeout`` seconds after the head; else 408;
- a head size cap: more than ``max_header_bytes`` of request line and headers is 431 and close,
  so memory per connection stays bounded whatever a client streams;
- a connection cap: above ``max_connections`` open sockets, the least recently active one with
  no request in progress is closed to make room (an idle socket can never lock a client out);
- a request cap: above ``max_in_flight`` requests being handled, new requests get 503, except
  ``/v2/health/*``, which is always answered (a readiness probe keeps its slot).

It also sends a small response in one write: uvicorn writes the head and the body separately,
which costs a second send() and wakes the client twice for one answer (measured with
benchmarks/serve_ab.py: part of the c=1 latency over the runtime alone).

A request body reaches the app uncopied and in one ``http.request`` message when it fits in
``max_body_bytes`` (the largest body the app accepts): uvicorn stops reading at 64 KiB of unread
body and gives one message per read, so a 3 MB body took 13 trips through the app's ``receive()``
and was joined twice (see :class:`_Body` and :func:`_receiver`).

And it offers the app a way to answer in one call (``scope[RESPOND_KEY](status, headers, body)``,
see :func:`_respond_now`): the whole response is built and written at once, with the
bookkeeping uvicorn's ASGI ``send`` does, but without its two messages, its header validation
by regular expressions (the app's own headers need none) and the held head's extra loop step.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

HEALTH_PREFIX = b"/v2/health/"
IN_FLIGHT_KEY = "edgeopt.requests_in_flight"  # ASGI scope extension: () -> requests being handled
RESPOND_KEY = "edgeopt.respond"  # ASGI scope extension: (status, headers, body) -> bool, see _respond_now
COALESCE_MAX_BYTES = 64 * 1024  # larger bodies are written as they come: joining them would copy them
_FRAMING = (b"content-length:", b"transfer-encoding:", b"connection:")  # headers _respond_now leaves to send


class _OneWrite:
    """One request's transport: holds the response head until the body's first write, then writes both at once.

    A held head is written on its own by the end of the loop step (or at close), so an app that
    sends a head and no body in the same step still answers. The 100-continue interim line is
    never held. Everything else goes to the real transport.
    """

    __slots__ = ("_transport", "_held", "_done")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._done = False  # the head has been seen: pass every later write through

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= COALESCE_MAX_BYTES:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif not self._done and data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._done = True
            self._held = data
            asyncio.get_running_loop().call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _respond_now(protocol: Any, cycle: Any, status: int, headers: dict[str, str], body: bytes,
                 status_lines: dict[int, bytes]) -> bool:
    """Write a whole response for ``cycle`` in one transport write, as uvicorn's ``send`` would for a
    ``http.response.start`` + one ``http.response.body`` with a content-length; True if written.

    False, with nothing written, where the ASGI path must do it instead: the response has begun, the
    client stopped reading (write paused: ``send`` waits for it to drain), access logging is on, a
    status or method whose response has no body (1xx, 204, 304, HEAD), or a header holds a character that would need uvicorn's checks (CR, LF, NUL; the app's own headers
    never do), or a framing header (content-length, transfer-encoding, connection: ``send`` acts on
    those). A client that has gone away needs no answer (True, as ``send`` drops it too).
    """
    if cycle.disconnected:
        return True
    if (cycle.response_started or cycle.flow.write_paused or cycle.access_log or not 200 <= status < 600
            or status in (204, 304) or cycle.scope["method"] == "HEAD"):
        return False
    parts = [status_lines[status]]
    for name, value in cycle.default_headers:  # date (and any --header), as uvicorn sends them
        parts += (name, b": ", value, b"\r\n")
    for name, value in headers.items():
        raw = f"{name.lower()}: {value}\r\n".encode("latin-1")
        if b"\r" in raw[:-2] or b"\n" in raw[:-2] or b"\0" in raw or raw.startswith(_FRAMING):
            return False
        parts.append(raw)
    parts.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    transport = protocol.transport
    if len(body) <= COALESCE_MAX_BYTES:
        parts.append(body)
        transport.write(b"".join(parts))
    else:
        transport.writelines([b"".join(parts), body])  # a large body is not copied to be joined
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True


class _Body:
    """A request's body chunks as they came from the parser, handed to the app without copying.

    uvicorn gathers a body into a bytearray (one copy) and gives it to the app as ``bytes(...)``
    (a second): two copies of every body, 0.5 MB of copying for a 253 KB JSON request. Here a body
    that arrived in one piece reaches the app as the parser's own ``bytes`` object, and one in
    several pieces is joined once.
    """

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def take(self) -> bytes:
        chunks, self.chunks, self.size = self.chunks, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _receiver(cycle: Any, body: _Body, window: int) -> Any:
    """``cycle``'s ASGI receive, as uvicorn's (100-continue, resume reading, wait, disconnect) but
    taking the body from ``body`` instead of its bytearray, and waiting for the whole body unless
    more than ``window`` bytes of it are held: one message (and one wake-up of the app) per body
    where uvicorn gives one per read, which the app then joins again."""

    async def receive() -> dict[str, Any]:
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while True:
            if not cycle.disconnected and not cycle.response_complete:
                cycle.flow.resume_reading()
                await cycle.message_event.wait()
                cycle.message_event.clear()
            if cycle.disconnected or cycle.response_complete:
                return {"type": "http.disconnect"}
            if not cycle.more_body or body.size > window:
                return {"type": "http.request", "body": body.take(), "more_body": cycle.more_body}

    return receive


def _plain_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_header_bytes: int,
                     max_connections: int, max_in_flight: int, max_body_bytes: int = 0) -> type:
    """A uvicorn httptools protocol class with the limits above (pass it as ``uvicorn.Config(http=...)``).

    Example:
        >>> http = guarded_protocol(header_timeout=10, body_timeout=60, max_header_bytes=65536,
        ...                         max_connections=1024, max_in_flight=512)  # doctest: +SKIP
        >>> uvicorn.Config(app, http=http)  # doctest: +SKIP
    """
    from edgeopt.deps import require

    require("httptools", extra="serve")
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    # Unread body a connection may hold before it stops reading. uvicorn stops at 64 KiB, so a 3 MB
    # body came in 13 reads, each waiting for a trip through the app's receive(); the app reads every
    # body whole up to --max-request-mb anyway, so holding that much bounds memory as before.
    body_window = max(HIGH_WATER_LIMIT, max_body_bytes + 1)

    async def busy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.dumps({"error": f"the server is handling {max_in_flight} requests; retry later"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with deadlines and caps; see the module docstring."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._real_app = self.app
            self._timer: Any = None
            self._in_head = False  # a request head has begun and is not complete
            self._head_bytes = 0
            self._began_in_chunk = False
            self._last_active = 0.0
            self._body = _Body()  # the body of the request being read (replaced per request)

        # -- timers
        def _arm(self, seconds: float, callback: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, status: int, reason: str, message: str, *, in_body: bool) -> None:
            """Answer ``status`` and close; if an earlier response is still being made, close after it."""
            self._disarm()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if not in_body or cycle.response_started:
                    # a pipelined head stalls behind a request still being handled: read no more,
                    # let that response finish, then close
                    cycle.keep_alive = False
                    self.flow.pause_reading()
                    return
                cycle.disconnected = True  # the app's receive() now returns http.disconnect
                cycle.message_event.set()
            self.logger.warning(message)
            self.transport.write(_plain_reply(status, reason, message))
            self.transport.close()

        def _head_timed_out(self) -> None:
            self._timer = None
            if self._in_head:
                self._refuse(408, "Request Timeout", f"request headers not received within {header_timeout:g} s",
                             in_body=False)
            elif (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request begun: nothing to answer

        def _body_timed_out(self) -> None:
            self._timer = None
            if self.cycle is None or self.cycle.response_complete:  # answered early (e.g. 413): just hang up
                if not self.transport.is_closing():
                    self.transport.close()
                return
            self._refuse(408, "Request Timeout", f"request body not received within {body_timeout:g} s",
                         in_body=True)

        # -- uvicorn / asyncio hooks
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._last_active = self.loop.time()
            self._arm(header_timeout, self._head_timed_out)
            if len(self.connections) > max_connections:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._last_active = self.loop.time()
            self._began_in_chunk = False
            super().data_received(data)
            if self._in_head and not self._began_in_chunk:
                # a chunk that began a request also holds the end of the previous one: only later
                # chunks count, so memory per head stays below the cap plus one read (<= 256 KiB)
                self._head_bytes += len(data)
            if self._in_head and self._head_bytes > max_header_bytes and not self.transport.is_closing():
                self._refuse(431, "Request Header Fields Too Large",
                             f"request line and headers exceed {max_header_bytes // 1024} KiB", in_body=False)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0
            self._began_in_chunk = True
            if self._timer is None:  # a keep-alive request: its deadline starts with its first byte
                self._arm(header_timeout, self._head_timed_out)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            path = self.url.split(b"?", 1)[0]
            busy_now = len(self.tasks) >= max_in_flight and not path.startswith(HEALTH_PREFIX)
            # requests being handled server-wide (this one included once it starts): the app skips
            # its batching queue for a request that is alone
            self.scope[IN_FLIGHT_KEY] = self.tasks.__len__  # type: ignore[literal-required]
            self.app = busy if busy_now else self._real_app
            try:
                super().on_headers_complete()
            finally:
                self.app = self._real_app
            cycle = self.cycle
            if cycle is not None:
                cycle.transport = _OneWrite(self.transport)
                self._body = _Body()
                # the app's task has not started yet: it will call this receive, not uvicorn's
                cycle.receive = _receiver(cycle, self._body, body_window)
                self.scope[RESPOND_KEY] = (  # type: ignore[literal-required]
                    lambda status, headers, body: _respond_now(self, cycle, status, headers, body,
                                                                STATUS_LINE))
            if not self.pipeline and self.cycle is not None:
                self._arm(body_timeout, self._body_timed_out)

        def on_body(self, body: bytes) -> None:
            """As uvicorn's, but the chunk is kept as it is (see _Body) rather than appended to a bytearray,
            and reading stops only beyond ``max_body_bytes`` (the largest body the app takes), not 64 KiB."""
            cycle = self.cycle
            if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
                return
            held = self._body
            held.chunks.append(body)
            held.size += len(body)
            if held.size > body_window:
                self.flow.pause_reading()
            cycle.message_event.set()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _make_room(self) -> None:
            """Close the least recently active connection that has no request in progress."""
            victim = None
            for conn in self.connections:
                if conn is self or not isinstance(conn, GuardedHttpToolsProtocol):
                    continue
                cycle = conn.cycle
                if cycle is not None and not cycle.response_complete:
                    continue  # a request is being handled: never dropped
                if conn.transport is None or conn.transport.is_closing():
                    continue
                if victim is None or conn._last_active < victim._last_active:
                    victim = conn
            target = victim if victim is not None else self
            target._disarm()
            target.transport.close()
            if victim is not None:
                self.logger.info("connection limit %d reached: closed the longest idle connection",
                                 max_connections)
            else:
                self.logger.warning("connection limit %d reached with every connection busy: refused one",
                                    max_connections)

    return GuardedHttpToolsProtocol
