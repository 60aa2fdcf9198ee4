"""A lone request's answer written by the runtime thread (connections.ThreadAnswer), over the wire.

The server runs in this process (uvicorn in a thread, on uvloop and on asyncio's own loop), so the
tests can count which path answered, slow the model down, and break the socket write on purpose.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_onnx_cnn

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_onnx_cnn(tmp_path_factory.mktemp("thread_answer") / "tiny.onnx")


class _Slow:
    """A session whose runs take ``delay`` seconds longer (room for a client to act mid-run)."""

    def __init__(self, session: Any, delay: float) -> None:
        self._session, self.delay = session, delay

    def run(self, feeds: Any) -> Any:
        time.sleep(self.delay)
        return self._session.run(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _InProcess:
    def __init__(self, model: Path, loop: str, delay: float) -> None:
        import uvicorn

        from edgeopt.serve.app import ServeConfig, create_app, load_served
        from edgeopt.serve.connections import guarded_protocol
        from edgeopt.serve.server import bind

        served = load_served([str(model)], threads=1, max_batch=8)
        if delay:
            served[0].session = _Slow(served[0].session, delay)
        cfg = ServeConfig(max_batch=8, max_delay_ms=2)
        base = guarded_protocol(header_timeout=10, body_timeout=10, max_header_bytes=65536, max_connections=64,
                                max_in_flight=64, max_body_bytes=cfg.max_request_bytes)

        class http(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.access_log = False  # as `edgeopt serve` runs (pytest's log capture turns it on)
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(served, cfg), http=http, loop=loop, ws="none",
                                                    log_config=None, access_log=False, lifespan="on",
                                                    timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "in-process server did not start"
            time.sleep(0.01)

    def wait_idle(self) -> None:
        """Until no request is being handled."""
        deadline = time.monotonic() + 10
        while self.server.server_state.tasks:
            assert time.monotonic() < deadline, "the server stayed busy"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


@pytest.fixture
def sends(monkeypatch) -> list[bool]:
    """What every ThreadAnswer.send returned (True: the runtime thread answered)."""
    from edgeopt.serve import connections

    seen: list[bool] = []
    real = connections.ThreadAnswer.send

    def counted(self: Any, results: Any) -> bool:
        ok = False
        try:
            ok = real(self, results)
        finally:
            seen.append(ok)
        return ok

    monkeypatch.setattr(connections.ThreadAnswer, "send", counted)
    return seen


@pytest.fixture
def server(tiny_model: Path, loop_name: str, request) -> Iterator[_InProcess]:
    srv = _InProcess(tiny_model, loop_name, getattr(request, "param", 0.0))
    try:
        yield srv
    finally:
        srv.close()


def _request(x: np.ndarray, *, binary: bool = False, close: bool = False) -> bytes:
    if binary:
        header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        body = header + x.tobytes()
        extra = f"Inference-Header-Content-Length: {len(header)}\r\n"
    else:
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        extra = "Content-Type: application/json\r\n"
    return (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def _read(s: socket.socket, pending: bytes = b"") -> tuple[bytes, bytes, bytes]:
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


def _logits(head: bytes, body: bytes) -> np.ndarray:
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK", head
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    names = [line.split(b":")[0] for line in lines[1:]]
    assert len(names) == len(set(names)) and b"date" in headers
    if headers[b"content-type"] == b"application/octet-stream":
        n = int(headers[b"inference-header-content-length"])
        meta = json.loads(body[:n])["outputs"][0]
        return np.frombuffer(body[n:], np.float32).reshape(meta["shape"])
    assert headers[b"content-type"] == b"application/json"
    out = json.loads(body)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _runtime(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 1, 16, 16)).astype(np.float32) for _ in range(n)]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lone_requests_are_answered_by_the_runtime_thread(server: _InProcess, sends: list[bool],
                                                          tiny_model: Path) -> None:
    """JSON and binary answers from the runtime thread equal the runtime's outputs, with date,
    content-type and content-length once each; keep-alive holds, ``Connection: close`` is answered
    with that header and then the socket closes; no duplicated descriptor is left open."""
    xs = _inputs(4)
    fds = _open_fds()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        for i, x in enumerate(xs[:3]):
            s.sendall(_request(x, binary=i == 1))
            head, body, rest = _read(s)
            assert rest == b"" and b"connection: close" not in head
            np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, x))
        s.sendall(_request(xs[3], close=True))
        head, body, rest = _read(s)
        np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, xs[3]))
        assert b"\r\nconnection: close" in head
        while chunk := s.recv(65536):
            rest += chunk
        assert rest == b""
    server.wait_idle()  # the runtime thread has recorded its send
    assert sends == [True] * 4
    time.sleep(0.2)
    assert _open_fds() == fds


@pytest.mark.parametrize("server", [0.15], indirect=True)
def test_pipelined_request_is_answered_after_the_threads_answer(server: _InProcess, sends: list[bool],
                                                                 tiny_model: Path) -> None:
    """A second request sent while the first one's model runs waits for the first answer (the runtime
    thread's) and comes after it, both correct; a malformed one sent mid-run gets its 400 after the
    answer too, then the connection closes."""
    xs = _inputs(3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(_request(xs[0]))
        time.sleep(0.05)  # the first run is under way
        s.sendall(_request(xs[1], binary=True))
        head, body, pending = _read(s)
        np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, xs[0]))
        head, body, pending = _read(s, pending)
        np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, xs[1]))
        assert pending == b""
        s.sendall(_request(xs[2]))
        time.sleep(0.05)
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        head, body, pending = _read(s)
        np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, xs[2]))
        head, body, pending = _read(s, pending)
        assert head.startswith(b"HTTP/1.1 400 ") and b"Invalid HTTP request" in body
        while chunk := s.recv(65536):
            pending += chunk
        assert pending == b""
    server.wait_idle()  # the runtime thread has recorded its send
    assert sends == [True, True, True], sends


@pytest.mark.parametrize("server", [0.15], indirect=True)
def test_client_gone_before_the_answer(server: _InProcess, sends: list[bool], tiny_model: Path) -> None:
    """A client that hangs up (plain close, and a reset) while its model runs costs the server
    nothing: no error, no descriptor left open, and the next client is answered."""
    fds = _open_fds()
    x = _inputs(1)[0]
    for reset in (False, True):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(_request(x))
        time.sleep(0.05)
        s.close()
        time.sleep(0.3)  # the run ends, the thread answers nobody
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(_request(x))
        head, body, _ = _read(s)
        np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, x))
    time.sleep(0.2)
    assert _open_fds() == fds
    server.wait_idle()  # the runtime thread has recorded its send
    assert server.thread.is_alive() and len(sends) == 3


def test_encode_error_is_a_500_from_the_loop(server: _InProcess, sends: list[bool], monkeypatch) -> None:
    """When encoding fails, the runtime thread writes nothing and the loop answers the usual 500,
    without library text; the connection and server go on."""
    from edgeopt.serve import app

    real = app.encode_response
    calls = []

    def broken(**kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) <= 2:
            raise ValueError("encoder exploded at /secret/path")
        return real(**kwargs)

    monkeypatch.setattr(app, "encode_response", broken)
    x = _inputs(1)[0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(_request(x))
        head, body, _ = _read(s)
        assert head.startswith(b"HTTP/1.1 500 ")
        assert json.loads(body) == {"error": "internal error; the server log has the details"}
        server.wait_idle()  # the error's log line is written after the answer: the next request is then alone
        s.sendall(_request(x))
        head, body, _ = _read(s)
        assert head.startswith(b"HTTP/1.1 200 ")
    server.wait_idle()  # the runtime thread has recorded its send
    assert sends == [False, True]
    assert calls[0].startswith("edgeopt-") and not calls[1].startswith("edgeopt-")  # thread, then the loop


@pytest.mark.parametrize("mode", ["partial", "would_block", "broken_pipe"])
def test_what_the_thread_cannot_send_the_loop_does(server: _InProcess, sends: list[bool], tiny_model: Path,
                                                   monkeypatch, mode: str) -> None:
    """A partial send, EAGAIN or an error in the thread's write: the loop's transport writes the
    rest (an error then meets the loop's own write), and the client gets the same whole answer."""
    from edgeopt.serve import connections

    real = os.writev

    def flaky(fd: int, buffers: list[Any]) -> int:
        if mode == "partial":
            return real(fd, [bytes(buffers[0])[:25]])
        raise BlockingIOError if mode == "would_block" else BrokenPipeError

    monkeypatch.setattr(connections.os, "writev", flaky)
    xs = _inputs(2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        for i, x in enumerate(xs):
            s.sendall(_request(x, binary=i == 1))
            head, body, rest = _read(s)
            assert rest == b""
            np.testing.assert_array_equal(_logits(head, body), _runtime(tiny_model, x))
    server.wait_idle()  # the runtime thread has recorded its send
    assert sends == [True, True]
