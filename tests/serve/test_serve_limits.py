"""edgeopt serve under hostile clients: deadlines, header and connection caps, flag validation, token.

The socket tests run a real server (uvicorn subprocess on 127.0.0.1, or uvicorn in a thread
when the test needs to hold requests in the runtime) and talk raw TCP to it, as an attacker would.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.errors import BadInput
from edgeopt.serve import ServeConfig, create_app, load_served
from edgeopt.serve.protocol import parse_infer_request
from tests.conftest import RecordingTransport, make_onnx_cnn, start_server, stop

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def infer_http(name: str = "tiny", token: str | None = None) -> bytes:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                   "data": [0.5] * 256}]}).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{auth}"
            "Connection: close\r\n\r\n").encode() + body


def exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """(True, what it sent) if the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------ flags

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_request_mb": float("nan")}, "--max-request-mb must be a finite number > 0 and <= 4096, got nan"),
    ({"max_request_mb": float("inf")}, "--max-request-mb must be a finite number"),
    ({"max_request_mb": 0}, "--max-request-mb must be a finite number > 0"),
    ({"max_delay_ms": float("nan")}, "--max-delay-ms must be a finite number in 0..10000, got nan"),
    ({"max_delay_ms": float("inf")}, "--max-delay-ms must be a finite number"),
    ({"max_delay_ms": -1.0}, "--max-delay-ms must be a finite number in 0..10000"),
    ({"header_timeout_s": 0}, "--header-timeout must be a finite number > 0"),
    ({"body_timeout_s": float("nan")}, "--body-timeout must be a finite number > 0"),
    ({"max_connections": 1}, "--max-connections must be an integer in 2..1000000"),
    ({"max_batch": 10**9}, "--max-batch must be an integer in 1..4096"),
    ({"token": "two words"}, "--token must be printable ASCII without spaces"),
])
def test_serve_config_refuses_non_finite_and_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(".", r"\.")):
        ServeConfig(**kwargs)


@pytest.mark.parametrize("flags", [["--max-request-mb", "nan"], ["--max-request-mb", "inf"],
                                   ["--max-delay-ms", "nan"], ["--max-delay-ms", "inf"],
                                   ["--header-timeout", "-1"], ["--max-connections", "1000001"]])
def test_cli_bad_serve_numbers_are_one_line_exit_2_before_loading(cli, tmp_path: Path, flags: list[str]) -> None:
    tiny = make_onnx_cnn(tmp_path / "tiny.onnx")
    result = cli("serve", str(tiny), "--port", "0", *flags)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flags[0] in lines[0] and "Traceback" not in result.stderr


def test_max_connections_must_fit_the_file_descriptor_limit() -> None:
    import resource

    from edgeopt.serve.server import check_fd_limit

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1_000_000:
        pytest.skip("no finite file descriptor limit below the flag's maximum")
    check_fd_limit(max(2, soft - 64))
    with pytest.raises(BadInput, match=f"needs {soft + 1} file descriptors; this process may open {soft}"):
        check_fd_limit(soft - 63)


def test_cli_warns_when_listening_beyond_loopback_without_a_token(cli, tmp_path: Path) -> None:
    from edgeopt.serve.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")
    tiny = make_onnx_cnn(tmp_path / "tiny.onnx")
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes, then the bind fails (exit 2)
    result = cli("serve", str(tiny), "--host", "192.0.2.1", "--port", "0", "--threads", "1")
    assert result.exit_code == 2
    assert "listening on 192.0.2.1 without a token" in result.stderr
    assert "cannot listen on 192.0.2.1" in result.stderr


# ------------------------------------------------------------------ sockets (subprocess server)

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_onnx_cnn(tmp_path_factory.mktemp("limits") / "tiny.onnx")


@pytest.mark.slow
def test_520_idle_sockets_do_not_lock_out_a_real_client(tiny_model: Path) -> None:
    """The issue's case: 520 sockets that never send a byte made every request 503 (queue-size 8)."""
    server = start_server(str(tiny_model), "--queue-size", "8", "--header-timeout", "2")
    idle: list[socket.socket] = []
    try:
        for _ in range(520):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(0.3)  # all accepted by the server
        t0 = time.monotonic()
        assert exchange(server.port, READY).startswith(b"HTTP/1.1 200")
        reply = exchange(server.port, infer_http())
        elapsed = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert elapsed < 10.0
        # and the idle sockets are closed by the header deadline (2 s), with no reply
        closed, sent = closed_by_server(idle[0], within=6.0)
        assert closed and sent == b""
        assert sum(closed_by_server(s, within=2.0)[0] for s in idle[1:50]) == 49
    finally:
        for s in idle:
            s.close()
        stop(server)


@pytest.mark.slow
def test_slow_head_and_slow_body_get_408_and_headers_are_capped(tiny_model: Path) -> None:
    server = start_server(str(tiny_model), "--header-timeout", "1", "--body-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            closed, reply = closed_by_server(s, within=5.0)
        assert closed and reply.startswith(b"HTTP/1.1 408") and b"headers not received within 1 s" in reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"in")
            closed, reply = closed_by_server(s, within=5.0)
        assert closed and reply.startswith(b"HTTP/1.1 408") and b"body not received within 1 s" in reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # answered 413 at once:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{")
            closed, reply = closed_by_server(s, within=5.0)  # the deadline then hangs up, no second reply
        assert closed and reply.startswith(b"HTTP/1.1 413") and b"408" not in reply

        # no false alarm: a 60 KiB header passes, and a 300 KB body pipelined with the next request's
        # head in the same reads is not counted as header bytes
        big_header = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60_000 + b"\r\nConnection: close\r\n\r\n"
        assert exchange(server.port, big_header).startswith(b"HTTP/1.1 200")
        x = np.ones((300, 1, 16, 16), np.float32)
        header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        first = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {len(header)}"
                 f"\r\nContent-Length: {len(header) + x.nbytes}\r\n\r\n").encode() + header + x.tobytes()
        replies = exchange(server.port, first + READY)
        assert replies.count(b"HTTP/1.1 200") == 2 and b"431" not in replies

        # four connections stream an unterminated header (the review's 4 x 420 MB): each is cut off
        # after 64 KiB (+ one read), and the server's memory stays flat
        before = rss_mb(server.proc.pid)
        results: list[tuple[int, bytes]] = []

        def stream() -> None:
            sent = 0
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: ")
                try:
                    while sent < 64 * 1024 * 1024:
                        s.sendall(b"a" * 65536)
                        sent += 65536
                except (BrokenPipeError, ConnectionResetError):
                    pass
                closed, reply = closed_by_server(s, within=5.0)
            results.append((sent, reply))

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = rss_mb(server.proc.pid)
        assert len(results) == 4
        for sent, reply in results:
            assert sent < 8 * 1024 * 1024, sent  # cut off long before 64 MB
            assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:100]
        assert any(reply.startswith(b"HTTP/1.1 431") for _, reply in results)
        assert after - before < 30, (before, after)
        assert exchange(server.port, infer_http()).startswith(b"HTTP/1.1 200")
    finally:
        stop(server)


@pytest.mark.slow
def test_connection_cap_closes_the_longest_idle_socket_not_the_new_client(tiny_model: Path) -> None:
    server = start_server(str(tiny_model), "--max-connections", "32")
    idle: list[socket.socket] = []
    try:
        for _ in range(60):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(0.3)
        assert exchange(server.port, infer_http()).startswith(b"HTTP/1.1 200")
        # the oldest idle sockets made room; the newest 31 or so are still open
        assert closed_by_server(idle[0], within=2.0)[0]
        assert not closed_by_server(idle[-1], within=0.3)[0]
    finally:
        for s in idle:
            s.close()
        stop(server)


@pytest.mark.slow
def test_token_guards_everything_but_health_and_tritonclient_sends_it(tiny_model: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    server = start_server(str(tiny_model), "--token", "s3cret-t0ken")
    try:
        assert exchange(server.port, READY).startswith(b"HTTP/1.1 200")
        reply = exchange(server.port, infer_http())
        assert reply.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in reply
        assert exchange(server.port, infer_http(token="wrong")).startswith(b"HTTP/1.1 401")
        assert exchange(server.port, infer_http(token="s3cret-t0ken")).startswith(b"HTTP/1.1 200")
        metrics = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert exchange(server.port, metrics).startswith(b"HTTP/1.1 401")

        client = httpclient.InferenceServerClient(url=server.url)
        x = np.ones((2, 1, 16, 16), np.float32)
        inp = httpclient.InferInput("input", [2, 1, 16, 16], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer("tiny", [inp], headers={"Authorization": "Bearer s3cret-t0ken"}).as_numpy("logits")
        assert out.shape == (2, 10)
        with pytest.raises(httpclient.InferenceServerException) as info:
            client.infer("tiny", [inp])
        assert info.value.status() == "401"
        client.close()
    finally:
        stop(server)


# ------------------------------------------------------------------ the in-flight cap keeps health answering

class BlockingSession:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.release = threading.Event()

    def run(self, feeds):
        self.release.wait(20)
        return self.inner.run(feeds)


@pytest.mark.slow
def test_busy_server_answers_503_to_infer_but_200_to_health(tiny_model: Path) -> None:
    import uvicorn

    from edgeopt.serve.connections import guarded_protocol
    from edgeopt.serve.server import bind

    served = load_served([str(tiny_model)], threads=1)
    gate = BlockingSession(served[0].session)
    served[0].session = gate
    app = create_app(served, ServeConfig(max_batch=1))
    http = guarded_protocol(header_timeout=5, body_timeout=5, max_header_bytes=65536, max_connections=64,
                            max_in_flight=3)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=http, ws="none", log_config=None, lifespan="on",
                                           access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    replies: list[bytes] = []
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        held = [threading.Thread(target=lambda: replies.append(exchange(port, infer_http(), timeout=30)))
                for _ in range(3)]
        for t in held:
            t.start()
        time.sleep(0.5)  # three requests in flight, blocked in the runtime
        busy = exchange(port, infer_http())
        assert busy.startswith(b"HTTP/1.1 503") and b"handling 3 requests" in busy
        assert exchange(port, READY).startswith(b"HTTP/1.1 200")
        gate.release.set()
        for t in held:
            t.join(30)
        assert [r[:12] for r in replies] == [b"HTTP/1.1 200"] * 3
    finally:
        gate.release.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


# ------------------------------------------------------------------ bodies: error text, zero copy, token

def make_embedding(path: Path) -> Path:
    """out = table[ids]: ids INT64 [batch, 3] into a 10 x 4 table (a word-embedding lookup)."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["out"], name="/embeddings/word_embeddings/Gather")],
        "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 4])], initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_error_bodies_name_no_node_path_version_or_other_models(tmp_path: Path, tiny_model: Path) -> None:
    embed = make_embedding(tmp_path / "embed.onnx")
    served = load_served([str(embed), f"secret_model={tiny_model}"], threads=1)
    with TestClient(create_app(served, ServeConfig(max_batch=4))) as c:
        good = {"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 1, 9]}]}
        r = c.post("/v2/models/embed/infer", json=good)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"][:4] == [0.0, 1.0, 2.0, 3.0]
        bad = {"inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 1, 30000]}]}
        r = c.post("/v2/models/embed/infer", json=bad)
        assert r.status_code == 400  # the runtime called the input invalid: the client's fault, not a 500
        assert r.json()["error"].startswith("model 'embed' rejected the input values")
        for leak in ("Gather", "word_embeddings", "onnxruntime", "ONNXRuntimeError", str(tmp_path), ".py"):
            assert leak not in r.text
        r = c.post("/v2/models/nope/infer", json=good)
        assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'"}
        assert "secret_model" not in c.get("/v2/models/nope").text
        assert c.post("/v2/models/embed/infer", json=good).status_code == 200


def test_binary_inputs_are_views_of_the_request_body_not_copies(tiny_model: Path) -> None:
    from edgeopt.model import load_model

    model = load_model(tiny_model)
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [3, 1, 16, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = header + x.tobytes()
    req = parse_infer_request(body, header_length=str(len(header)), inputs=model.inputs, outputs=model.outputs)
    arr = req.feeds["input"]
    assert np.array_equal(arr, x)
    assert np.shares_memory(arr, np.frombuffer(body, dtype=np.uint8))  # no copy of the tensor bytes


def test_json_responses_round_trip_float32_exactly_and_non_finite_as_null(tiny_model: Path) -> None:
    from edgeopt.serve.protocol import InferRequest, encode_response

    out = np.array([[0.1, -3.4028235e38, 1e-45, np.nan, np.inf]], dtype=np.float32)
    req = InferRequest(feeds={}, batch=1, outputs=("y",), binary_outputs=frozenset())
    body, headers = encode_response(model_name="m", version="1", request=req, results={"y": out})
    doc = json.loads(body)
    assert headers == {"content-type": "application/json"}
    values = doc["outputs"][0]["data"]
    assert values[3] is None and values[4] is None
    assert np.array_equal(np.array(values[:3], dtype=np.float32), out[0, :3])


def test_token_in_process_and_env_var(tiny_model: Path, monkeypatch) -> None:
    served = load_served([str(tiny_model)], threads=1)
    with TestClient(create_app(served, ServeConfig(token="abc"))) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2").status_code == 401
        assert c.get("/v2/models/tiny", headers={"Authorization": "Bearer abd"}).status_code == 401
        assert c.get("/v2/models/tiny", headers={"Authorization": "Basic abc"}).status_code == 401
        assert c.get("/v2/models/tiny", headers={"Authorization": "bearer abc"}).status_code == 200
    # the CLI reads EDGEOPT_SERVE_TOKEN (so the secret does not show in ps)
    from typer.testing import CliRunner

    from edgeopt.cli import app

    monkeypatch.setenv("EDGEOPT_SERVE_TOKEN", "has space")
    result = CliRunner().invoke(app, ["serve", str(tiny_model), "--port", "0"])
    assert result.exit_code == 2 and "--token must be printable ASCII without spaces" in result.stderr
    assert os.environ["EDGEOPT_SERVE_TOKEN"] == "has space"


def test_a_small_response_leaves_in_one_write_and_nothing_is_held_or_reordered() -> None:
    from edgeopt.serve.connections import COALESCE_MAX_BYTES, _OneWrite

    head = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"

    async def main() -> dict[str, object]:
        seen: dict[str, object] = {}
        t = RecordingTransport()
        w = _OneWrite(t)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # an interim line is never held
        w.write(head)
        seen["held"] = list(t.writes)
        w.write(b"abcd")
        w.write(b"more")  # later writes pass straight through
        seen["small"] = t.writes
        t2 = RecordingTransport()
        w2 = _OneWrite(t2)
        w2.write(head)  # a head whose body never comes in this step ...
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen["flushed"] = t2.writes  # ... is written by the end of the step
        t3 = RecordingTransport()
        w3 = _OneWrite(t3)
        big = b"x" * (COALESCE_MAX_BYTES + 1)
        w3.write(head)
        w3.write(big)  # a large body is not copied to be joined
        seen["big"] = [len(x) for x in t3.writes]
        t4 = RecordingTransport()
        w4 = _OneWrite(t4)
        w4.write(head)
        w4.close()  # closing sends what is held first
        seen["closed"] = (t4.writes, t4.closed, w4.get_extra_info("peername"))
        await asyncio.sleep(0)
        seen["no_double"] = (len(t2.writes), len(t4.writes))
        return seen

    seen = asyncio.run(main())
    assert seen["held"] == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert seen["small"] == [b"HTTP/1.1 100 Continue\r\n\r\n", head + b"abcd", b"more"]
    assert seen["flushed"] == [head]
    assert seen["big"] == [len(head), COALESCE_MAX_BYTES + 1]
    assert seen["closed"] == ([head], True, "info:peername")
    assert seen["no_double"] == (1, 1)


def test_the_server_answers_a_binary_request_in_one_segment(tiny_model: Path) -> None:
    """Head and body of a small response arrive together: the client is woken once per answer."""
    server = start_server(str(tiny_model))
    try:
        x = np.full((1, 1, 16, 16), 0.5, np.float32)
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        body = header + x.tobytes()
        request = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                   f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            firsts = []
            for _ in range(5):
                s.sendall(request)
                data = s.recv(1 << 20)  # the first segment the server's answer arrives in
                firsts.append(data)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += s.recv(1 << 20)
        assert all(d.startswith(b"HTTP/1.1 200") for d in firsts)
        # every answer's first segment already holds the whole body (40 bytes of logits after the JSON header)
        assert all(len(d.partition(b"\r\n\r\n")[2]) == length for d in firsts)
    finally:
        stop(server)
