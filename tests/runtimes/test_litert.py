"""LiteRT runtime: .tflite sessions (float and integer IO), bench/eval through the one harness, mixed formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

from edgeopt.data import load_data  # noqa: E402
from edgeopt.errors import BadInput, ModelError  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.runtimes import runtime_for  # noqa: E402
from edgeopt.runtimes.litert import LiteRtRuntime  # noqa: E402
from edgeopt.transforms.tflite import TfliteExport, export_tflite  # noqa: E402
from tests.conftest import make_onnx_cnn  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny CNN as .onnx, float .tflite and int8 .tflite, plus data labelled by the ONNX model."""
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("litert")
    onnx_path = make_onnx_cnn(root / "cnn.onnx", channels=16)
    x = np.random.default_rng(2).random((40, 1, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"input": x})[0].argmax(1)
    np.savez(root / "data.npz", x=x, y=y)
    (fp32, check), (int8, _) = export_tflite(load_model(onnx_path), [TfliteExport("none"), TfliteExport("int8")],
                                             data=load_data(root / "data.npz"))
    assert check.reference == "onnxruntime" and check.cosine > 0.9999  # ONNX -> onnx2torch -> litert-torch
    fp32.save(root / "cnn.tflite")
    int8.save(root / "cnn_int8.tflite")
    return {"onnx": onnx_path, "tflite": root / "cnn.tflite", "int8": root / "cnn_int8.tflite",
            "data": root / "data.npz", "x": x}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_float_session_matches_onnxruntime_and_resizes_batches(pair) -> None:
    model = load_model(pair["tflite"])
    assert runtime_for(model).name == "litert"
    session = LiteRtRuntime().load(model, threads=1)
    name = session.input_names[0]
    x = pair["x"][:5]
    want = _ort(pair["onnx"], x)
    batched = session.run({name: x})[0]
    assert batched.shape == (5, 10) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, want, atol=1e-4)
    single = np.concatenate([session.run({name: x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(single, batched, atol=1e-5)


def test_int8_session_takes_and_returns_float32(pair) -> None:
    model = load_model(pair["int8"])
    assert model.inputs[0].dtype == "float32" and model.outputs[0].dtype == "float32"
    session = LiteRtRuntime().load(model, threads=1)
    assert session.details == {"quantized_inputs": 1, "quantized_outputs": 1}
    x = pair["x"][:8]
    got = np.concatenate([session.run({session.input_names[0]: x[i:i + 1]})[0] for i in range(8)])
    want = _ort(pair["onnx"], x)
    assert got.dtype == np.float32
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.mean() > 0.98
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.75


def test_reference_kernels_match_xnnpack(pair) -> None:
    model = load_model(pair["tflite"])
    x = pair["x"][:2]
    fast = LiteRtRuntime().load(model, threads=1)
    ref = LiteRtRuntime().load(model, threads=1, options={"use_xnnpack": False})
    np.testing.assert_allclose(ref.run({ref.input_names[0]: x})[0], fast.run({fast.input_names[0]: x})[0],
                               atol=1e-4)


def test_bad_options_and_files(pair, tmp_path: Path) -> None:
    model = load_model(pair["tflite"])
    with pytest.raises(BadInput, match="unknown litert option"):
        LiteRtRuntime().load(model, options={"precision": "f16"})
    with pytest.raises(BadInput, match="threads must be >= 1"):
        LiteRtRuntime().load(model, threads=0)
    with pytest.raises(ModelError, match="LiteRT runs .tflite models"):
        LiteRtRuntime().load(load_model(pair["onnx"]))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelError, match="not a valid TFLite model"):
        load_model(junk)


def test_cli_bench_tflite_and_onnx_in_one_table(cli, pair) -> None:
    result = cli("bench", pair["tflite"], pair["int8"], pair["onnx"], "--threads", "1", "--runs", "10",
                 "--seconds", "0", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert "(interleaved)" in result.stderr and "vs first" in result.stderr
    payload = json.loads(result.stdout)
    assert [(r["format"], r["runtime"]) for r in payload] == [
        ("tflite", "litert"), ("tflite", "litert"), ("onnx", "onnxruntime")]
    assert all(r["runs"] >= 10 and r["latency_ms"]["p50"] > 0 and r["threads"] == 1 for r in payload)
    assert payload[0]["size_bytes"] == pair["tflite"].stat().st_size
    assert payload[1]["runtime_details"] == {"quantized_inputs": 1, "quantized_outputs": 1}


def test_cli_eval_tflite_with_reference(cli, pair) -> None:
    result = cli("eval", pair["tflite"], "--data", pair["data"], "--reference", pair["onnx"], "--threads", "1",
                 "--json", "-")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["accuracy"] == 1.0  # labels are the ONNX model's own predictions
    assert payload["agreement"] == 1.0 and payload["cosine"] > 0.99999


def test_cli_runtime_mismatch_is_exit_2(cli, pair) -> None:
    result = cli("bench", pair["tflite"], "--runtime", "onnxruntime", "--runs", "1", "--seconds", "0")
    assert result.exit_code == 2
    assert "runtime onnxruntime cannot run tflite models" in result.stderr
