"""edgeopt split run --stage-urls: a split's stages on real `edgeopt serve` processes, driven over OIP v2."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeopt.model import load_model
from edgeopt.serve.protocol import encode_response, parse_infer_request
from edgeopt.split.remote import decode_infer, encode_infer
from tests.conftest import Server, start_server, stop
from tests.split.test_split import make_residual_cnn

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


@dataclass
class Stages:
    out: Path
    npz: Path
    first: Server  # serves stage_0.onnx
    second: Server  # serves stage_1.onnx
    tight: Server  # serves stage_1.onnx but refuses bodies over 2 KB

    def url(self, server: Server, model: str | None = None) -> str:
        return f"http://{server.url}" + (f"/v2/models/{model}" if model else "")


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Iterator[Stages]:
    from typer.testing import CliRunner

    from edgeopt.cli import app

    tmp = tmp_path_factory.mktemp("split_remote")
    model = make_residual_cnn(tmp / "res.onnx")
    npz = tmp / "res.npz"
    np.savez(npz, x=np.random.default_rng(3).standard_normal((5, 1, 16, 16)).astype(np.float32))
    out = tmp / "split"
    # cut after node 8: a 16x8x8 float tensor (4 KB) crosses
    result = CliRunner().invoke(app, ["split", str(model), "--devices", "host,host", "--link-mbps", "100",
                                      "--cuts", "8", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    servers: list[Server] = []
    try:
        for args in ([str(out / "stage_0.onnx")], [str(out / "stage_1.onnx")],
                     [str(out / "stage_1.onnx"), "--max-request-mb", "0.002"]):
            servers.append(start_server(*args, "--log-level", "warning"))
        yield Stages(out, npz, *servers)
    finally:
        for server in servers:
            stop(server)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_stages_on_two_servers_reproduce_the_whole_model(cli, stages: Stages) -> None:
    urls = f"{stages.url(stages.first)},{stages.url(stages.second, 'stage_1')}"
    result = cli("split", "run", stages.out, "--stage-urls", urls, "--data", stages.npz, "--items", "7",
                 "--json", "-")
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["stages"] == 2 and run["items"] == 7 and run["in_flight"] == 3
    assert run["max_abs_diff"] is not None and run["max_abs_diff"] <= 1e-5
    assert run["latency_ms"]["p50"] > 0 and run["throughput_ips"] > 0
    assert [r["url"] for r in run["remote"]] == [f"{stages.url(stages.first)}/v2/models/stage_0",
                                                 f"{stages.url(stages.second)}/v2/models/stage_1"]
    for stage in run["remote"]:
        # the server's own time is part of the round trip the driver measured
        assert 0 < stage["server_mean_ms"] <= stage["round_trip_ms"]["mean"]
        assert stage["runtime"] == "onnxruntime" and stage["threads"] == 1
    assert "round trip p50 ms" in result.stderr


def test_swapped_urls_name_the_stage(cli, stages: Stages) -> None:
    swapped = f"{stages.url(stages.second)},{stages.url(stages.first)}"
    result = cli("split", "run", stages.out, "--stage-urls", swapped, "--items", "2")
    # the server's 404 names the missing model but no longer lists the ones it serves (issue 20)
    _one_line_error(result, "stage 0 (", "does not serve model 'stage_0'", "unknown model 'stage_0'")
    explicit = f"{stages.url(stages.second, 'stage_1')},{stages.url(stages.first, 'stage_0')}"
    result = cli("split", "run", stages.out, "--stage-urls", explicit, "--items", "2")
    _one_line_error(result, "stage 0 (", "does not serve this stage: inputs are ['d_r'], the stage's are ['input']")


def test_a_dead_port_is_one_line(cli, stages: Stages) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    result = cli("split", "run", stages.out, "--stage-urls", f"{stages.url(stages.first)},http://127.0.0.1:{dead}")
    _one_line_error(result, "stage 1 (", f"cannot reach http://127.0.0.1:{dead}/v2/health/live")


def test_a_server_error_mid_run_names_the_stage(cli, stages: Stages) -> None:
    result = cli("split", "run", stages.out, "--stage-urls", f"{stages.url(stages.first)},{stages.url(stages.tight)}",
                 "--items", "2")
    _one_line_error(result, "stage 1 (", "failed: HTTP 413", "exceeds --max-request-mb 0.002")


@pytest.mark.parametrize(("urls", "extra", "message"), [
    ("http://127.0.0.1:9", [], "--stage-urls gave 1 URL(s) but the plan has 2 stage(s)"),
    ("http://a:1,http://b:2,http://c:3", [], "--stage-urls gave 3 URL(s) but the plan has 2 stage(s)"),
    ("ftp://a:1,http://b:2", [], "stage 0 URL 'ftp://a:1' must be http://HOST:PORT"),
    ("http://a:1,b:2", [], "stage 1 URL 'b:2' must be http://HOST:PORT"),
    ("http://a:1,http://b:2/v1/models/x", [], "stage 1 URL path '/v1/models/x' must be empty or /v2/models/NAME"),
    ("http://a:1,http://b:2", ["--simulate-link"], "--simulate-link does not apply to --stage-urls"),
    ("http://a:1,http://b:2", ["--simulate-devices"], "--simulate-devices does not apply to --stage-urls"),
    ("http://a:1,http://b:2", ["--in-flight", "0"], "--in-flight must be >= 1"),
])
def test_bad_stage_urls_are_one_line_exit_2(cli, stages: Stages, urls: str, extra: list[str], message: str) -> None:
    _one_line_error(cli("split", "run", stages.out, "--stage-urls", urls, *extra), message)


def test_in_flight_without_stage_urls_is_refused(cli, stages: Stages) -> None:
    _one_line_error(cli("split", "run", stages.out, "--in-flight", "2"), "--in-flight applies to --stage-urls only")


def test_binary_tensors_round_trip_through_the_servers_codec(stages: Stages) -> None:
    stage = load_model(stages.out / "stage_1.onnx")
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    body, headers = encode_infer({"d_r": x}, ["logits"])
    request = parse_infer_request(body, header_length=headers["Inference-Header-Content-Length"],
                                  inputs=stage.inputs, outputs=stage.outputs)
    assert np.array_equal(request.feeds["d_r"], x) and request.binary_outputs == {"logits"}
    assert len(body) < x.nbytes + 400  # raw bytes plus a small JSON header, no JSON numbers
    logits = np.arange(10, dtype=np.float32).reshape(1, 10)
    payload, out_headers = encode_response(model_name="stage_1", version="1", request=request,
                                           results={"logits": logits})
    assert np.array_equal(decode_infer(payload, out_headers["inference-header-content-length"])["logits"], logits)


def test_run_split_api_takes_stage_urls(stages: Stages) -> None:
    from edgeopt.split import run_split

    result = run_split(stages.out, stage_urls=f"{stages.url(stages.first)},{stages.url(stages.second)}", items=3,
                       in_flight=1)
    assert result.items == 3 and result.in_flight == 1 and result.max_abs_diff is not None
    assert result.max_abs_diff <= 1e-5 and len(result.remote or []) == 2


@pytest.mark.parametrize(("served", "message"), [
    ([{"name": "x", "datatype": "FP16", "shape": [-1, 16]}], "input 'x' is FP16, the stage's is FP32"),
    ([{"name": "x", "datatype": "FP32", "shape": [-1, 8]}], "input 'x' has shape [-1, 8], the stage's is [-1, 16]"),
    ([{"name": "x", "datatype": "FP32", "shape": [1, 16, 1]}], "has shape [1, 16, 1]"),
    ([{"name": "x", "datatype": "FP32", "shape": ["b", 16]}], "has no integer shape"),
    ([{"name": "y", "datatype": "FP32", "shape": [-1, 16]}], "inputs are ['y'], the stage's are ['x']"),
    ([{"name": "x", "datatype": "FP32", "shape": [1, 16]}], None),  # a fixed size matches a dynamic one
])
def test_metadata_mismatch_says_what_differs(served: list[dict], message: str | None) -> None:
    from edgeopt.split.remote import _mismatch

    problem = _mismatch("input", [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}], served)
    assert problem == message if message is None else message in (problem or "")
