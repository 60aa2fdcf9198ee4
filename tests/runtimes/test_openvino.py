"""OpenVINO runtime and NNCF INT8: outputs match ONNX Runtime, settings are applied, INT8 is real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.data import load_data
from edgeopt.errors import BadInput, DataError, MissingDependency, ModelError
from edgeopt.model import Model, load_model
from edgeopt.runtimes import get_runtime

ov = pytest.importorskip("openvino")


def _cpu_has_bf16() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def digits(digits_onnx: Path) -> Model:
    return load_model(digits_onnx)


@pytest.fixture(scope="module")
def test_x(digits_test_npz: Path) -> np.ndarray:
    return load_data(digits_test_npz).inputs["x"][:64]


@pytest.fixture(scope="module")
def ort_logits(digits: Model, test_x: np.ndarray) -> np.ndarray:
    session = get_runtime("onnxruntime").load(digits, threads=1)
    return session.run({"input": test_x})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- runtime ------------------------------------------------------------------------------------
def test_f32_hint_matches_onnxruntime(digits: Model, test_x: np.ndarray, ort_logits: np.ndarray) -> None:
    session = get_runtime("openvino").load(digits, threads=1, options={"precision": "f32"})
    out = session.run({"input": test_x})
    assert session.input_names == ["input"] and session.output_names == ["logits"]
    assert out[0].shape == (64, 10) and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], ort_logits, atol=1e-4, rtol=0)
    assert session.details["inference_precision"] == "f32"
    assert session.details["compute_precisions"] == {"f32": 4}  # 3 convs + the classifier


@pytest.mark.parametrize("options", [{}, {"precision": "bf16"}])
def test_default_and_bf16_are_close_to_fp32(digits: Model, test_x: np.ndarray, ort_logits: np.ndarray,
                                            options: dict) -> None:
    session = get_runtime("openvino").load(digits, threads=1, options=options)
    out = session.run({"input": test_x})[0]
    assert _cosine(out, ort_logits) >= 0.999
    assert (out.argmax(1) == ort_logits.argmax(1)).mean() >= 0.98
    if _cpu_has_bf16():
        # OpenVINO's default CPU precision is BF16 on this hardware, not FP32: edgeopt records it.
        assert session.precision == "bf16"
        assert session.details["compute_precisions"].get("bf16", 0) >= 3
        assert np.abs(out - ort_logits).max() > 1e-3  # really not FP32


def test_threads_streams_and_mode_are_applied(digits: Model) -> None:
    rt = get_runtime("openvino")
    one = rt.load(digits, threads=1)
    two = rt.load(digits, threads=2, options={"num_streams": 2, "performance_mode": "throughput",
                                              "cpu_pinning": True})
    assert (one.details["num_threads"], one.details["num_streams"], one.details["performance_mode"]) == (1, 1, "LATENCY")
    assert (two.details["num_threads"], two.details["num_streams"], two.details["performance_mode"]) == (2, 2, "THROUGHPUT")
    assert one.details["cpu_pinning"] is False and two.details["cpu_pinning"] is True  # edgeopt's default: unpinned


def test_session_reuses_request_but_returns_independent_outputs(digits: Model, test_x: np.ndarray,
                                                                ort_logits: np.ndarray) -> None:
    session = get_runtime("openvino").load(digits, threads=1, options={"precision": "f32"})
    first = session.run({"input": test_x[:1]})[0]
    second = session.run({"input": test_x[1:6]})[0]  # dynamic batch, same request
    np.testing.assert_allclose(first, ort_logits[:1], atol=1e-4, rtol=0)  # not overwritten by run 2
    np.testing.assert_allclose(second, ort_logits[1:6], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("threads", "options", "message"), [
    (1, {"precison": "f32"}, "unknown openvino option(s) ['precison']"),
    (1, {"precision": "int8"}, "precision must be one of f32, bf16"),
    (1, {"num_streams": 0}, "num_streams must be an integer >= 1"),
    (1, {"performance_mode": "fast"}, "performance_mode must be one of latency, throughput"),
    (1, {"cpu_pinning": "yes"}, "cpu_pinning must be true or false"),
    (1, {"dynamic_quantization_group_size": -1}, "dynamic_quantization_group_size must be an integer >= 0"),
    (1, {"dynamic_quantization_group_size": "32"}, "dynamic_quantization_group_size must be an integer >= 0"),
    (0, {}, "threads must be an integer >= 1"),
])
def test_bad_options_are_bad_input(digits: Model, threads: int, options: dict, message: str) -> None:
    with pytest.raises(BadInput) as info:
        get_runtime("openvino").load(digits, threads=threads, options=options)
    assert message in str(info.value)


def test_non_onnx_and_bad_feeds(digits: Model, test_x: np.ndarray) -> None:
    torch_like = Model(format="torch", source="net.py:Net", inputs=[], outputs=[], module=object())
    with pytest.raises(ModelError, match="openvino runs ONNX models"):
        get_runtime("openvino").load(torch_like)
    session = get_runtime("openvino").load(digits, threads=1)
    with pytest.raises(DataError, match="missing input 'input'"):
        session.run({"x": test_x})
    with pytest.raises(DataError, match="OpenVINO could not run these inputs"):
        session.run({"input": test_x[:, :, :16]})


def test_missing_openvino_names_the_extra(digits: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert get_runtime("openvino").available() is False
    with pytest.raises(MissingDependency) as info:
        get_runtime("openvino").load(digits)
    assert str(info.value) == ("this needs the Python package 'openvino', which is not installed: "
                               "run pip install 'edgeopt[openvino]'")


def test_cli_bench_with_openvino(cli, digits_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", digits_onnx, "--runtime", "openvino", "--threads", "1", "--runs", "20",
                 "--seconds", "0.2", "--json", out)
    assert result.exit_code == 0, result.output
    assert "openvino" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["runtime"] == "openvino" and payload["threads"] == 1
    lat = payload["latency_ms"]
    assert payload["runs"] >= 20 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]  # (< 1000 ms always held)
    # the precision OpenVINO really compiled is in the report (BF16 by default on AVX-512 BF16 CPUs)
    assert payload["runtime_details"]["inference_precision"] == ("bf16" if _cpu_has_bf16() else "f32")
    assert payload["runtime_details"]["num_threads"] == 1


def test_cli_bad_stored_option_is_one_line_exit_2(cli, digits: Model, tmp_path: Path) -> None:
    path = tmp_path / "ov.onnx"
    digits.with_metadata(runtime="openvino", runtime_options=json.dumps({"precision": "f64"})).save(path)
    result = cli("bench", path, "--runs", "5", "--seconds", "0")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output
    assert "openvino precision must be one of f32, bf16" in err


def test_session_is_safe_to_share_between_threads(digits: Model, test_x: np.ndarray,
                                                  ort_logits: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    session = get_runtime("openvino").load(digits, threads=1, options={"precision": "f32"})
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: session.run({"input": test_x[i:i + 1]})[0], range(32)))
    np.testing.assert_allclose(np.concatenate(outs), ort_logits[:32], atol=1e-4, rtol=0)
