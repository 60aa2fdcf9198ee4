"""edgeopt serve in-process: OIP v2 protocol, validation, batching, back-pressure, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeopt.errors import BadInput
from edgeopt.serve import ServeConfig, create_app, load_served
from edgeopt.serve.batching import Batcher, ModelRunError, QueueFull
from edgeopt.serve.protocol import InferRequest
from tests.conftest import make_onnx_cnn

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def make_two_input(path: Path) -> Path:
    """out = float(ids) * mask + 1, with ids INT64 [batch, 4] and mask FP32 [batch, 4]."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "mask"], ["m"]),
             helper.make_node("Add", ["m", "one"], ["out"])]
    graph = helper.make_graph(
        nodes, "two_input",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    make_onnx_cnn(tmp_path / "tiny.onnx")
    make_onnx_cnn(tmp_path / "fixed.onnx", batch=1, seed=3)
    make_two_input(tmp_path / "pair.onnx")
    return tmp_path


@pytest.fixture
def client(models_dir: Path):
    served = load_served([str(models_dir / "tiny.onnx"), f"one={models_dir / 'fixed.onnx'}",
                          str(models_dir / "pair.onnx")], threads=1, max_batch=8)
    with TestClient(create_app(served, ServeConfig(max_batch=8, max_delay_ms=2, max_request_mb=0.05))) as c:
        c.served = {m.name: m for m in served}
        yield c


def direct(client, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return client.served[name].session.run(feeds)


def test_health_server_and_model_metadata(client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "edgeopt" and "binary_tensor_data" in meta["extensions"]
    tiny = client.get("/v2/models/tiny").json()
    assert tiny["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert tiny["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert tiny["platform"] == "onnxruntime_onnx" and tiny["versions"] == ["1"]
    assert tiny["parameters"]["max_batch_size"] == 8
    assert client.get("/v2/models/one").json()["parameters"]["max_batch_size"] == 1  # fixed batch dim
    assert client.get("/v2/models/tiny/versions/1").json() == tiny
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    assert client.get("/v2/models/pair/versions/1/ready").status_code == 200


def test_infer_json_matches_direct_run(client) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    r = client.post("/v2/models/tiny/infer", json={"id": "req-7", "inputs": [tensor(x)]})
    assert r.status_code == 200
    doc = r.json()
    assert doc["id"] == "req-7" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    out = doc["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(3, 10),
                               direct(client, "tiny", {"input": x})[0], rtol=0, atol=0)
    # nested (row-major) data and the version path give the same answer
    nested = {"name": "input", "shape": [3, 1, 16, 16], "datatype": "FP32", "data": x.tolist()}
    r2 = client.post("/v2/models/tiny/versions/1/infer", json={"inputs": [nested]})
    assert r2.json()["outputs"][0]["data"] == out["data"]


def test_infer_two_inputs_int64_and_output_selection(client) -> None:
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    mask = np.array([[1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    r = client.post("/v2/models/pair/infer", json={
        "inputs": [tensor(mask, "mask"), tensor(ids, "ids", "INT64")], "outputs": [{"name": "out"}]})
    assert r.status_code == 200
    assert r.json()["outputs"][0]["data"] == [2.0, 1.0, 4.0, 1.0, 3.5, 4.0, 4.5, 5.0]


def test_binary_tensor_extension_both_ways(client) -> None:
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 16, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/tiny/infer", content=header + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    got = np.frombuffer(r.content[n:], dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, direct(client, "tiny", {"input": x})[0])


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"inputs": []}', 400, "non-empty list"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP99", "data": [0]}]}', 400,
     "unknown datatype 'FP99'"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "INT64", "data": [0]}]}', 400,
     "expected datatype FP32, got INT64"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0]}]}', 400,
     "expected shape [-1, 1, 16, 16], got [1, 1, 8, 8]"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16, 16], "datatype": "FP32", "data": [0]}]}', 400,
     "expected 4 dimensions"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0, 1]}]}', 400,
     "needs 256 values, got 2"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": ["a"]}]}', 400,
     "needs 256 values"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}', 400, "unknown input 'x'"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0] * 256}],
                 "outputs": [{"name": "nope"}]}).encode(), 400, "unknown output 'nope'"),
])
def test_bad_requests_get_400_with_a_message(client, body: bytes, status: int, fragment: str) -> None:
    r = client.post("/v2/models/tiny/infer", content=body)
    assert r.status_code == status
    assert fragment in r.json()["error"]


def test_value_kind_tensor_count_and_range_checks(client) -> None:
    ids = {"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}
    mask = {"name": "mask", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}
    r = client.post("/v2/models/pair/infer", json={"inputs": [ids]})
    assert r.status_code == 400 and "takes 2 input(s)" in r.json()["error"]
    r = client.post("/v2/models/pair/infer", json={"inputs": [{**ids, "data": [1.5, 2, 3, 4]}, mask]})
    assert r.status_code == 400 and "non-integer" in r.json()["error"]
    r = client.post("/v2/models/pair/infer", json={"inputs": [{**ids, "data": [2**70, 0, 0, 0]}, mask]})
    assert r.status_code == 400
    r = client.post("/v2/models/pair/infer", json={"inputs": [{**ids, "shape": [2, 4], "data": [0] * 8}, mask]})
    assert r.status_code == 400 and "disagree on the batch size" in r.json()["error"]
    r = client.post("/v2/models/one/infer", json={"inputs": [tensor(np.zeros((2, 1, 16, 16), np.float32))]})
    assert r.status_code == 400 and "expected shape [1, 1, 16, 16]" in r.json()["error"]
    r = client.post("/v2/models/tiny/infer", content=b'{"inputs": [{"name": "input", "shape": [1, 1, 16, 16], '
                    b'"datatype": "FP32", "parameters": {"binary_data_size": 1024}}]}',
                    headers={"Inference-Header-Content-Length": "999999"})
    assert r.status_code == 400 and "outside the body" in r.json()["error"]


def test_unknown_model_version_and_route_are_404(client) -> None:
    r = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/tiny/versions/2").status_code == 404
    assert client.post("/v2/models/tiny/versions/2/infer", json={}).status_code == 404
    assert client.get("/v2/nothing/here").json() == {"error": "Not Found"}
    assert client.get("/v2/models/tiny/infer").status_code == 405


def test_body_over_limit_is_413_by_header_and_by_stream(client) -> None:
    big = b'{"inputs": [' + b" " * 60_000 + b"]}"  # limit is 0.05 MB = 52428 bytes
    r = client.post("/v2/models/tiny/infer", content=big)
    assert r.status_code == 413 and "--max-request-mb 0.05" in r.json()["error"]

    def chunks():  # no Content-Length: chunked transfer, so only the streamed size can catch it
        for _ in range(8):
            yield b" " * 10_000

    r = client.post("/v2/models/tiny/infer", content=chunks())
    assert r.status_code == 413
    x = np.zeros((1, 1, 16, 16), np.float32)
    assert client.post("/v2/models/tiny/infer", json={"inputs": [tensor(x)]}).status_code == 200


def test_metrics_count_requests_by_status_and_batch_sizes(client) -> None:
    x = np.zeros((2, 1, 16, 16), np.float32)
    for _ in range(3):
        assert client.post("/v2/models/tiny/infer", json={"inputs": [tensor(x)]}).status_code == 200
    client.post("/v2/models/tiny/infer", content=b"{")
    client.post("/v2/models/ghost/infer", content=b"{}")
    text = client.get("/metrics").text
    assert 'edgeopt_requests_total{code="200",model="tiny"} 3.0' in text
    assert 'edgeopt_requests_total{code="400",model="tiny"} 1.0' in text
    assert 'edgeopt_requests_total{code="404",model="_unknown"} 1.0' in text
    assert 'edgeopt_batch_size_sum{model="tiny"} 6.0' in text
    assert 'edgeopt_request_latency_seconds_count{model="tiny"} 3.0' in text
    assert 'edgeopt_queue_depth{model="tiny"} 0.0' in text
    # decode time of the three answered requests: counted, positive, and a part of their latency
    assert 'edgeopt_request_decode_seconds_count{model="tiny"} 3.0' in text
    decode = float(re.search(r'edgeopt_request_decode_seconds_sum\{model="tiny"\} (\S+)', text).group(1))
    latency = float(re.search(r'edgeopt_request_latency_seconds_sum\{model="tiny"\} (\S+)', text).group(1))
    assert 0.0 < decode < latency


class GatedSession:
    """Wraps a real session: run() blocks until released, and fails on NaN input (a runtime error)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.input_names, self.output_names = inner.input_names, inner.output_names
        self.release = threading.Event()
        self.started = threading.Event()
        self.release.set()

    def run(self, feeds):
        self.started.set()
        self.release.wait(10)
        if any(np.isnan(v).any() for v in feeds.values()):
            raise RuntimeError("kernel exploded\non NaN")
        return self.inner.run(feeds)


def test_full_queue_answers_503_runtime_error_500_and_server_keeps_serving(models_dir: Path) -> None:
    served = load_served([str(models_dir / "tiny.onnx")], threads=1)
    gate = GatedSession(served[0].session)
    served[0].session = gate
    x = np.zeros((1, 1, 16, 16), np.float32)
    body = {"inputs": [tensor(x)]}
    with TestClient(create_app(served, ServeConfig(max_batch=1, queue_size=1))) as c:
        gate.release.clear()
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(c.post("/v2/models/tiny/infer", json=body).status_code))
        first.start()
        assert gate.started.wait(10)  # the first request is in the runtime, the queue is empty
        second = threading.Thread(target=lambda: results.append(c.post("/v2/models/tiny/infer", json=body).status_code))
        second.start()
        deadline = time.monotonic() + 10
        while served[0].batcher.depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 503 and "requests queued" in r.json()["error"]
        gate.release.set()
        first.join(10)
        second.join(10)
        assert results == [200, 200]
        nan = json.dumps({"inputs": [tensor(np.full((1, 1, 16, 16), np.nan, np.float32))]})  # NaN literals
        bad = c.post("/v2/models/tiny/infer", content=nan.encode())
        # the client learns that the model failed, not the runtime's own words (node names, paths)
        assert bad.status_code == 500
        assert bad.json()["error"] == "model 'tiny' failed on this input; the server log has the details"
        assert "exploded" not in bad.text
        ok = c.post("/v2/models/tiny/infer", json=body)
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 10]
        assert 'edgeopt_requests_total{code="503",model="tiny"} 1.0' in c.get("/metrics").text


def _request(batch: int, value: float, width: int = 3) -> InferRequest:
    feeds = {"x": np.full((batch, width), value, dtype=np.float32)}
    return InferRequest(feeds=feeds, batch=batch, outputs=("y",), binary_outputs=frozenset())


def test_batcher_merges_splits_and_respects_max_batch() -> None:
    calls: list[int] = []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        return [feeds["x"] * 2]

    async def main() -> list[dict]:
        b = Batcher("m", run, output_names=["y"], max_batch=4, max_delay=0.2, queue_size=16)
        b.start()
        for _ in range(6):
            b.arrival_started()  # six requests "being received": the worker waits for them
        tasks = []
        for i in range(6):
            b.arrival_ended()
            tasks.append(asyncio.ensure_future(b.submit(_request(1, float(i)))))
        out = await asyncio.gather(*tasks)
        await b.stop()
        return out

    outs = asyncio.run(main())
    assert calls == [4, 2]
    assert [float(o["y"][0, 0]) for o in outs] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert all(o["y"].shape == (1, 3) for o in outs)


async def _until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` on the event loop: an event to wait for, not a sleep of a guessed length."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.002)


def test_next_batch_waits_in_the_runtime_thread_and_counts_towards_the_queue_limit() -> None:
    """While batch 1 runs, batch 2 is already handed to the runtime thread, so it starts the moment
    batch 1 ends (no trip through the event loop); it still counts as queued for back-pressure."""
    gate = threading.Event()
    started: list[float] = []

    def run(feeds):
        started.append(float(feeds["x"][0, 0]))
        if len(started) == 1:
            assert gate.wait(10)
        return [feeds["x"] * 2]

    async def main() -> tuple[list[int], list[dict]]:
        b = Batcher("m", run, output_names=["y"], max_batch=1, max_delay=0.0, queue_size=2)
        b.start()
        depths = []
        first = asyncio.ensure_future(b.submit(_request(1, 1.0)))
        while not started:
            await asyncio.sleep(0.005)  # batch 1 is in the runtime
        second = asyncio.ensure_future(b.submit(_request(1, 2.0)))
        await _until(lambda: b._handed == [1, 1])  # batch 2 is handed to the runtime thread, behind batch 1
        depths.append(b.depth())
        third = asyncio.ensure_future(b.submit(_request(1, 3.0)))
        await _until(lambda: b.depth() == 2)
        depths.append(b.depth())  # and request 3 in the queue: the limit of 2 is reached
        with pytest.raises(QueueFull, match="has 2 requests queued"):
            await b.submit(_request(1, 4.0))
        gate.set()
        out = await asyncio.gather(first, second, third)
        depths.append(b.depth())
        await b.stop()
        return depths, out

    depths, outs = asyncio.run(main())
    assert depths == [1, 2, 0]
    assert started == [1.0, 2.0, 3.0]
    assert [float(o["y"][0, 0]) for o in outs] == [2.0, 4.0, 6.0]


def test_a_request_alone_skips_the_queue_and_later_ones_still_batch_behind_it() -> None:
    """``alone=True`` on an idle model runs at once without the queue; requests that come while it
    runs are queued (alone or not) and merged into one call; a runtime failure of a lone request
    reaches only that request."""
    gate = threading.Event()
    calls: list[int] = []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        if len(calls) == 1:
            assert gate.wait(10)
        if float(feeds["x"][0, 0]) < 0:
            raise ValueError("negative input")
        return [feeds["x"] * 2]

    async def main() -> tuple[list[dict], int, str]:
        b = Batcher("m", run, output_names=["y"], max_batch=8, max_delay=0.0, queue_size=8)
        b.start()
        queued: list[object] = []
        b._queue.put_nowait = lambda item, put=b._queue.put_nowait: (queued.append(item), put(item))[1]
        first = asyncio.ensure_future(b.submit(_request(1, 1.0), alone=True))
        await _until(lambda: calls == [1])  # running, and never through the queue
        assert queued == []
        later = [asyncio.ensure_future(b.submit(_request(1, v), alone=True)) for v in (2.0, 3.0)]
        await _until(lambda: len(queued) == 2)  # the model is busy: these two wait in the queue
        gate.set()
        outs = await asyncio.gather(first, *later)
        with pytest.raises(ModelRunError) as failed:
            await b.submit(_request(1, -1.0), alone=True)
        await _until(lambda: not b._handed)  # the model is idle again (its bookkeeping follows the answers)
        ok = await b.submit(_request(1, 4.0), alone=True)
        await b.stop()
        return [*outs, ok], len(queued), str(failed.value)

    outs, n_queued, message = asyncio.run(main())
    assert calls == [1, 2, 1, 1]  # lone, the two queued ones merged, the failing one, the next lone one
    assert n_queued == 2
    assert [float(o["y"][0, 0]) for o in outs] == [2.0, 4.0, 6.0, 8.0]
    assert message == "model 'm' failed on this input; the server log has the details"


def test_batcher_keeps_different_shapes_apart_and_skips_delay_when_alone() -> None:
    calls: list[tuple[int, int]] = []

    def run(feeds):
        calls.append(feeds["x"].shape)
        return [feeds["x"].sum(axis=1, keepdims=True)]

    async def main() -> tuple[list[dict], float]:
        b = Batcher("m", run, output_names=["y"], max_batch=8, max_delay=30.0, queue_size=16)
        b.start()
        t0 = time.perf_counter()
        alone = await b.submit(_request(2, 1.0))  # nobody else arriving: no 30 s wait
        elapsed = time.perf_counter() - t0
        outs = await asyncio.gather(b.submit(_request(1, 1.0, width=3)), b.submit(_request(2, 2.0, width=3)),
                                    b.submit(_request(1, 1.0, width=5)))
        await b.stop()
        return [alone, *outs], elapsed

    outs, elapsed = asyncio.run(main())
    assert elapsed < 30.0 / 3  # a third of the delay it skipped: the margin covers any machine load
    assert [o["y"].ravel().tolist() for o in outs] == [[3.0, 3.0], [3.0], [6.0, 6.0], [5.0]]
    assert calls == [(2, 3), (3, 3), (1, 5)]  # the two width-3 requests merged, width 5 ran alone


def test_batcher_queue_is_bounded() -> None:
    gate = threading.Event()

    taken = threading.Event()

    def run(feeds):
        taken.set()
        gate.wait(5)
        return [feeds["x"]]

    async def main() -> int:
        b = Batcher("m", run, output_names=["y"], max_batch=1, max_delay=0, queue_size=2)
        b.start()
        running = asyncio.ensure_future(b.submit(_request(1, 0.0)))
        await _until(taken.is_set)  # the worker took it: the queue is empty again
        queued = [asyncio.ensure_future(b.submit(_request(1, 0.0))) for _ in range(2)]
        await asyncio.sleep(0)
        refused = 0
        try:
            await b.submit(_request(1, 0.0))
        except QueueFull:
            refused = 1
        gate.set()
        await asyncio.gather(running, *queued)
        await b.stop()
        return refused

    assert asyncio.run(main()) == 1


def test_load_served_rejects_bad_input(models_dir: Path) -> None:
    with pytest.raises(BadInput, match="two models are named 'tiny'"):
        load_served([str(models_dir / "tiny.onnx"), str(models_dir / "tiny.onnx")])
    with pytest.raises(BadInput, match="model name 'a b'"):
        load_served([f"a b={models_dir / 'tiny.onnx'}"])
    with pytest.raises(BadInput, match="not found"):
        load_served([str(models_dir / "missing.onnx")])
    with pytest.raises(BadInput, match="--max-batch must be an integer in 1..4096, got 0"):
        ServeConfig(max_batch=0)


def test_cli_bad_model_path_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    result = cli("serve", str(tmp_path / "missing.onnx"), "--port", "0")
    assert result.exit_code == 2
    assert "missing.onnx" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli("serve", str(tmp_path / "missing.onnx"), "--queue-size", "0")
    assert result.exit_code == 2 and "--queue-size must be an integer in 1..1000000, got 0" in result.stderr


def test_listening_socket_is_tcp_so_responses_are_not_delayed_by_nagle() -> None:
    import socket

    from edgeopt.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; proto 0 costs ~40 ms a response
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    with pytest.raises(BadInput, match="--port must be 0..65535"):
        bind("127.0.0.1", 70000)


def test_serving_an_onnx_model_needs_no_torch(tmp_path: Path) -> None:
    """The Docker image installs .[serve] only: loading, validating and running must not touch torch."""
    import subprocess
    import sys

    path = make_onnx_cnn(tmp_path / "tiny.onnx")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from fastapi.testclient import TestClient\n"
        "from edgeopt.serve import create_app, load_served\n"
        f"app = create_app(load_served([{str(path)!r}], threads=1))\n"
        "with TestClient(app) as c:\n"
        "    r = c.post('/v2/models/tiny/infer', json={'inputs': [{'name': 'input', 'shape': [1, 1, 16, 16],"
        " 'datatype': 'FP32', 'data': [0.0] * 256}]})\n"
        "    print(r.status_code, r.json()['outputs'][0]['shape'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "200 [1, 10]"


def test_batcher_survives_a_session_returning_the_wrong_number_of_outputs() -> None:
    calls = []

    def run(feeds):
        calls.append(1)
        return [] if len(calls) == 1 else [feeds["x"]]  # first call breaks the output contract

    async def main() -> tuple[str, float]:
        b = Batcher("m", run, output_names=["y"], max_batch=4, max_delay=0, queue_size=4)
        b.start()
        try:
            await b.submit(_request(1, 1.0))
            message = ""
        except Exception as exc:  # noqa: BLE001 - the message is what is checked
            message = str(exc)
        ok = await asyncio.wait_for(b.submit(_request(1, 7.0)), 5)
        await b.stop()
        return message, float(ok["y"][0, 0])

    message, value = asyncio.run(main())
    assert message == "model 'm' failed on this input; the server log has the details"
    assert value == 7.0


def test_each_model_runs_on_its_stored_runtime(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from edgeopt.model import load_model

    plain = make_onnx_cnn(tmp_path / "plain.onnx")
    tuned = tmp_path / "tuned.onnx"
    load_model(plain).with_metadata(runtime="openvino").save(tuned)
    served = load_served([str(plain), str(tuned)], threads=1)
    assert [m.settings.runtime for m in served] == ["onnxruntime", "openvino"]
    x = np.random.default_rng(2).standard_normal((2, 1, 16, 16)).astype(np.float32)
    with TestClient(create_app(served)) as c:
        assert c.get("/v2/models/tuned").json()["platform"] == "openvino_onnx"
        outs = [np.array(c.post(f"/v2/models/{n}/infer", json={"inputs": [tensor(x)]}).json()["outputs"][0]["data"],
                         dtype=np.float32).reshape(2, 10) for n in ("plain", "tuned")]
    np.testing.assert_array_equal(outs[1], served[1].session.run({"input": x})[0])
    # same weights on two runtimes (OpenVINO may compute in BF16 on this CPU): close, same classes
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    assert (outs[0].argmax(1) == outs[1].argmax(1)).all()
