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
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

HEALTH_PREFIX = b"/v2/health/"
IN_FLIGHT_KEY = "edgeopt.requests_in_flight"  # ASGI scope extension: () -> requests being handled
COALESCE_MAX_BYTES = 64 * 1024  # larger bodies are written as they come: joining them would copy them


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


def _plain_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_header_bytes: int,
                     max_connections: int, max_in_flight: int) -> type:
    """A uvicorn httptools protocol class with the limits above (pass it as ``uvicorn.Config(http=...)``).

    Example:
        >>> http = guarded_protocol(header_timeout=10, body_timeout=60, max_header_bytes=65536,
        ...                         max_connections=1024, max_in_flight=512)  # doctest: +SKIP
        >>> uvicorn.Config(app, http=http)  # doctest: +SKIP
    """
    from edgeopt.deps import require

    require("httptools", extra="serve")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
            if self.cycle is not None:
                self.cycle.transport = _OneWrite(self.transport)
            if not self.pipeline and self.cycle is not None:
                self._arm(body_timeout, self._body_timed_out)

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
