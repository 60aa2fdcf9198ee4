"""The infer path's own HTTP plumbing: one-call responses (_respond_now) and bodies without copies (_Body).

Over the wire against a real server (subprocess), plus the fallbacks on small fakes: what the
one-call writer refuses must go through uvicorn's ASGI ``send`` unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import RecordingTransport, make_onnx_cnn, start_server, stop

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_onnx_cnn(tmp_path_factory.mktemp("wire") / "tiny.onnx")


def _json_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def _read_response(s: socket.socket, pending: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, bytes after it) of one response with a content-length."""
    data = pending
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "server closed before a response head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "server closed inside a response body"
        rest += chunk
    return head, rest[:length], rest[length:]


def _runtime_logits(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_answers_keep_alive_in_pieces_with_expect_and_close(tiny_model: Path) -> None:
    """Keep-alive answers carry date + content-length and equal the runtime; a body sent in many
    small pieces (and a second request pipelined behind it) arrives whole; Expect: 100-continue gets
    its interim line; ``Connection: close`` is answered, then the socket closed."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 1, 16, 16)).astype(np.float32) for _ in range(4)]
    server = start_server(str(tiny_model))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            answers = []

            def request(x: np.ndarray) -> bytes:
                body = _json_body(x)
                return (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                        "Content-Type: application/json\r\n\r\n").encode() + body

            s.sendall(request(xs[0]))  # in one piece
            second = request(xs[1])
            for at in range(0, len(second) - 700, 700):  # in pieces of 700 bytes ...
                s.sendall(second[at:at + 700])
                time.sleep(0.002)
            s.sendall(second[at + 700:] + request(xs[2]))  # ... the last with a whole request behind it
            pending = b""
            for _ in range(3):
                head, payload, pending = _read_response(s, pending)
                answers.append((head, payload))
            assert pending == b""
            body = _json_body(xs[3])
            s.sendall((f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                       "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode())
            interim = s.recv(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(body)
            head, payload, rest = _read_response(s)
            answers.append((head, payload))
            while chunk := s.recv(65536):  # the server closes after this answer
                rest += chunk
            assert rest == b""
        for (head, payload), x in zip(answers, xs, strict=True):
            lines = head.split(b"\r\n")
            assert lines[0] == b"HTTP/1.1 200 OK"
            names = [line.split(b":")[0] for line in lines[1:]]
            assert names.count(b"date") == 1 and names.count(b"content-length") == 1
            assert b"content-type: application/json" in lines
            out = json.loads(payload)["outputs"][0]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_array_equal(got, _runtime_logits(tiny_model, x))
        assert b"connection: close" in answers[3][0].split(b"\r\n")
        assert all(b"connection: close" not in h.split(b"\r\n") for h, _ in answers[:3])
    finally:
        stop(server)


class _Flow:
    write_paused = False


class _Cycle:
    def __init__(self, *, keep_alive: bool = True, method: str = "POST") -> None:
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.waiting_for_100_continue = False
        self.access_log = False
        self.keep_alive = keep_alive
        self.flow = _Flow()
        self.default_headers = [(b"date", b"Wed, 02 Dec 2026 05:00:00 GMT")]
        self.scope = {"method": method}
        self.message_event = asyncio.Event()
        self.responses = 0

    def on_response(self) -> None:
        self.responses += 1


class _Protocol:
    def __init__(self, cycle: _Cycle) -> None:
        self.cycle = cycle
        self.transport = RecordingTransport()


def test_respond_now_writes_once_and_refuses_what_send_must_handle() -> None:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    from edgeopt.serve.connections import COALESCE_MAX_BYTES
    from edgeopt.serve.connections import _respond_now as respond_with

    assert STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"

    def _respond_now(*args: Any) -> bool:  # the protocol class passes uvicorn's status lines
        return respond_with(*args, STATUS_LINE)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        c = _Cycle()
        p = _Protocol(c)
        assert _respond_now(p, c, 200, {"Content-Type": "application/json"}, b'{"a":1}')
        seen["ok"] = (p.transport.writes, c.response_started, c.response_complete, c.message_event.is_set(),
                      c.responses, p.transport.closed)
        c2 = _Cycle(keep_alive=False)
        p2 = _Protocol(c2)
        big = b"x" * (COALESCE_MAX_BYTES + 1)
        assert _respond_now(p2, c2, 400, {}, big)
        seen["close"] = (len(p2.transport.writes), p2.transport.writes[0][-len(big):] == big,
                         p2.transport.writes[0][:-len(big)], p2.transport.closed, c2.responses)
        refused = []
        for change in ("started", "paused", "access_log", "head", "status", "header", "framing"):
            c3 = _Cycle(method="HEAD" if change == "head" else "POST")
            c3.response_started = change == "started"
            c3.flow.write_paused = change == "paused"
            c3.access_log = change == "access_log"
            p3 = _Protocol(c3)
            headers = ({"x-bad": "a\r\nset-cookie: b"} if change == "header"
                       else {"Connection": "close"} if change == "framing" else {})
            ok = _respond_now(p3, c3, 204 if change == "status" else 200, headers, b"")
            refused.append((change, ok, p3.transport.writes, c3.responses, c3.response_complete))
        seen["refused"] = refused
        gone = _Cycle()
        gone.disconnected = True
        pg = _Protocol(gone)
        seen["gone"] = (_respond_now(pg, gone, 200, {}, b"x"), pg.transport.writes)
        return seen

    seen = asyncio.run(main())
    assert seen["ok"] == ([b"HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 05:00:00 GMT\r\n"
                           b"content-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}"],
                          True, True, True, 1, False)
    assert seen["close"] == (1, True, b"HTTP/1.1 400 Bad Request\r\ndate: Wed, 02 Dec 2026 05:00:00 GMT\r\n"
                                      b"content-length: %d\r\nconnection: close\r\n\r\n" % (COALESCE_MAX_BYTES + 1),
                             True, 1)
    for change, ok, writes, responses, complete in seen["refused"]:
        assert (ok, writes, responses, complete) == (False, [], 0, False), change
    assert seen["gone"] == (True, [])


def test_body_pieces_reach_the_app_uncopied_or_joined_once() -> None:
    from edgeopt.serve.connections import _Body

    body = _Body()
    one = b"x" * 100_000
    body.chunks.append(one)
    body.size += len(one)
    assert body.take() is one  # the parser's own bytes object: no copy
    assert (body.chunks, body.size) == ([], 0)
    for piece in (b"ab", b"cd", b"e"):
        body.chunks.append(piece)
        body.size += len(piece)
    assert body.size == 5
    assert body.take() == b"abcde"
    assert body.take() == b""


def test_receive_gives_a_body_in_one_message_unless_it_outgrows_the_window() -> None:
    from edgeopt.serve.connections import _Body, _receiver

    class Flow:
        resumed = 0

        def resume_reading(self) -> None:
            self.resumed += 1

    async def main() -> list[Any]:
        cycle = _Cycle()
        cycle.flow = Flow()
        cycle.transport = RecordingTransport()
        cycle.more_body = True
        body = _Body()
        receive = _receiver(cycle, body, window=10)
        loop = asyncio.get_running_loop()

        def arrive(chunk: bytes, last: bool = False) -> None:  # what on_body / on_message_complete do
            body.chunks.append(chunk)
            body.size += len(chunk)
            cycle.more_body = not last
            cycle.message_event.set()

        got = []
        for at, (chunk, last) in enumerate([(b"abc", False), (b"def", False), (b"g", True)]):
            loop.call_later(0.01 * (at + 1), arrive, chunk, last)
        got.append(await receive())  # three reads, one message
        cycle.more_body = True
        for at, chunk in enumerate([b"0123456", b"789ab"]):
            loop.call_later(0.01 * (at + 1), arrive, chunk)
        got.append(await receive())  # 12 bytes held > window 10: handed over before the end
        loop.call_later(0.01, arrive, b"!", True)
        got.append(await receive())
        cycle.disconnected = True
        cycle.message_event.set()
        got.append(await receive())
        got.append(cycle.flow.resumed >= 3)
        return got

    got = asyncio.run(main())
    assert got[0] == {"type": "http.request", "body": b"abcdefg", "more_body": False}
    assert got[1] == {"type": "http.request", "body": b"0123456789ab", "more_body": True}
    assert got[2] == {"type": "http.request", "body": b"!", "more_body": False}
    assert got[3] == {"type": "http.disconnect"}
    assert got[4] is True


def test_bodies_beyond_64k_are_read_whole_and_beyond_the_limit_refused_while_streaming(tiny_model: Path) -> None:
    """A 300 KB body (JSON padded with whitespace) is answered correctly; a chunked body that grows past
    --max-request-mb (no Content-Length to refuse it by) gets 413 while it streams."""
    x = np.random.default_rng(2).standard_normal((1, 1, 16, 16)).astype(np.float32)
    server = start_server(str(tiny_model), "--max-request-mb", "0.5")
    try:
        body = _json_body(x) + b" " * 300_000
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall((f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                      + body)
            head, payload, _ = _read_response(s)
        assert head.startswith(b"HTTP/1.1 200")
        out = json.loads(payload)["outputs"][0]
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                      _runtime_logits(tiny_model, x))
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
            reply = b""
            try:
                for _ in range(32):  # 2 MB offered, 0.5 MB allowed
                    s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(10)
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"--max-request-mb 0.5" in reply
    finally:
        stop(server)
