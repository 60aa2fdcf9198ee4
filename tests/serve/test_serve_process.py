"""edgeopt serve as a user runs it: a real uvicorn subprocess on 127.0.0.1, a standard OIP client, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeopt.model import load_model
from edgeopt.runtimes.sessions import open_session, resolve_settings
from tests.conftest import Server, make_onnx_cnn, start_server, stop

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_onnx: Path) -> Iterator[Server]:
    tiny = make_onnx_cnn(tmp_path_factory.mktemp("serve") / "tiny.onnx")
    server = start_server(str(digits_onnx), f"small={tiny}", "--max-batch", "8", "--max-delay-ms", "5")
    yield server
    stop(server)


@pytest.mark.slow
def test_tritonclient_outputs_equal_a_direct_runtime_run(served: Server, digits_onnx: Path,
                                                         digits_test_npz: Path) -> None:
    client = httpclient.InferenceServerClient(url=served.url, concurrency=8)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits_cnn") and client.is_model_ready("small")
    meta = client.get_model_metadata("digits_cnn")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}
    assert client.get_server_metadata()["name"] == "edgeopt"

    model = load_model(digits_onnx)
    session = open_session(model, resolve_settings(model, threads=1))
    x = np.load(digits_test_npz)["x"][:40].astype(np.float32)
    want = session.run({"input": x})[0]

    # binary tensors (tritonclient's default) and plain JSON both give the runtime's own answer
    inp = httpclient.InferInput("input", [5, 1, 32, 32], "FP32")
    inp.set_data_from_numpy(x[:5])
    got = client.infer("digits_cnn", [inp]).as_numpy("logits")
    np.testing.assert_allclose(got, want[:5], rtol=1e-5, atol=1e-5)
    inp = httpclient.InferInput("input", [5, 1, 32, 32], "FP32")
    inp.set_data_from_numpy(x[5:10], binary_data=False)
    out = httpclient.InferRequestedOutput("logits", binary_data=False)
    got = client.infer("digits_cnn", [inp], outputs=[out]).as_numpy("logits")
    np.testing.assert_allclose(got, want[5:10], rtol=1e-5, atol=1e-5)

    # 40 concurrent single-sample requests: batched on the server, each answer still its own
    pending = []
    for i in range(40):
        one = httpclient.InferInput("input", [1, 1, 32, 32], "FP32")
        one.set_data_from_numpy(x[i:i + 1])
        pending.append(client.async_infer("digits_cnn", [one]))
    got = np.concatenate([p.get_result().as_numpy("logits") for p in pending])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()

    with pytest.raises(httpclient.InferenceServerException, match="unknown model 'nope'") as info:
        client.infer("nope", [inp])
    assert info.value.status() == "404"
    client.close()


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_http_errors_and_metrics_over_the_wire(served: Server) -> None:
    body = b"{" * 10
    head = (f"POST /v2/models/small/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    reply = _raw(served.port, head + body)
    assert reply.startswith(b"HTTP/1.1 400") and b"not valid JSON" in reply
    big = (b"POST /v2/models/small/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
           b"Connection: close\r\n\r\n")
    reply = _raw(served.port, big)
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-request-mb 16" in reply
    metrics = _raw(served.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").decode()
    assert 'edgeopt_requests_total{code="413",model="small"}' in metrics
    assert "edgeopt_batch_size_bucket" in metrics and "edgeopt_queue_depth" in metrics


@pytest.mark.slow
def test_sigterm_finishes_the_in_flight_request_then_exits_cleanly(tmp_path: Path) -> None:
    tiny = make_onnx_cnn(tmp_path / "tiny.onnx")
    server = start_server(str(tiny))
    x = np.ones((1, 1, 16, 16), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(head + body[:100])  # the request is in flight: half its body is still to come
        # Events, not sleeps: the server has read what we sent (its socket's receive queue is empty)...
        _wait_for(lambda: _unread_bytes(server.port, s.getsockname()[1]) == 0, "the server to read the request")
        server.proc.send_signal(signal.SIGTERM)
        # ...and has begun shutting down (it closed its listening socket) while our request is unfinished.
        _wait_for(lambda: not _accepts(server.port), "the server to stop accepting connections")
        # A server that did not wait for in-flight requests exits within these 2 s; this one must not.
        with pytest.raises(subprocess.TimeoutExpired):
            server.proc.wait(timeout=2)
        s.sendall(body[100:])
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    doc = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert doc["outputs"][0]["shape"] == [1, 10]
    code, err = stop(server)
    assert code == 0
    events = [json.loads(line).get("event") for line in err.splitlines() if line.startswith("{")]
    assert "infer" in events and events.index("infer") < events.index("stopped")


def _unread_bytes(server_port: int, client_port: int) -> int | None:
    """Bytes waiting in the server side's receive queue of our connection (Linux /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[1], 16)
    return None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_cli_busy_port_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    tiny = make_onnx_cnn(tmp_path / "tiny.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("serve", str(tiny), "--port", str(port), "--threads", "1")
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
