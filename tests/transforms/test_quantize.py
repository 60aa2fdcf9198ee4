"""ONNX Runtime quantization: sizes, fidelity, configs, recipes, bad input (API and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.data import Dataset, load_data
from edgeopt.errors import BadInput, ConfigError, DataError, UnsupportedOperation
from edgeopt.measure.evaluate import evaluate
from edgeopt.model import Model, load_model
from edgeopt.search.recipe import Recipe, apply_recipe
from edgeopt.transforms.config import TransformContext, config_from_dict, config_to_dict
from edgeopt.transforms.quantize import (
    Bf16,
    DynamicInt8,
    Fp16,
    Int4WeightOnly,
    StaticInt8,
    check_quantizable,
    prepared,
    quantize,
    weight_nodes,
)

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def digits(digits_onnx, digits_train_npz, digits_test_npz) -> tuple[Model, Dataset, Dataset]:
    return load_model(digits_onnx), load_data(digits_train_npz), load_data(digits_test_npz)


@pytest.fixture(scope="module")
def digits_int8(digits) -> Model:
    model, train, _ = digits
    return quantize(model, StaticInt8(), data=train)


# -- the done-when figures on the digits CNN ------------------------------------------------------
def test_static_int8_digits_is_smaller_and_as_accurate(digits, digits_int8) -> None:
    model, _, test = digits
    assert model.size_bytes / digits_int8.size_bytes >= 3.5
    base = evaluate(model, test, threads=1)
    q = evaluate(digits_int8, test, reference=model, threads=1)
    assert base.accuracy - q.accuracy <= 0.005
    assert q.agreement >= 0.99
    assert q.cosine >= 0.99
    ops = {n.op_type for n in digits_int8.onnx.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = json.loads(digits_int8.metadata["edgeopt.quantization"])
    assert meta["type"] == "StaticInt8" and meta["fields"]["per_channel"] is True


@pytest.mark.parametrize("cfg", [
    StaticInt8(format="qoperator", per_channel=False),
    StaticInt8(activation_type="s8", symmetric_activations=True),
    StaticInt8(calibration="percentile", samples=64),
])
def test_static_variants_keep_fidelity(digits, cfg) -> None:
    model, train, test = digits
    q = quantize(model, cfg, data=train)
    r = evaluate(q, test.take(slice(0, 200)), reference=model, threads=1)
    assert r.agreement >= 0.98 and r.cosine >= 0.99
    assert model.size_bytes / q.size_bytes >= 3.5
    if cfg.format == "qoperator":
        assert any(n.op_type == "QLinearConv" for n in q.onnx.graph.node)


def test_dynamic_and_fp16_sizes_and_fidelity(digits) -> None:
    model, _, test = digits
    dyn = quantize(model, DynamicInt8())
    half = quantize(model, Fp16())
    assert model.size_bytes / dyn.size_bytes >= 3.5
    assert 1.9 <= model.size_bytes / half.size_bytes <= 2.1
    sample = test.take(slice(0, 100))
    assert evaluate(dyn, sample, reference=model, threads=1).agreement >= 0.98
    r = evaluate(half, sample, reference=model, threads=1)
    assert r.cosine >= 0.9999
    assert half.inputs[0].dtype == "float32"  # keep_io_types


def test_every_mode_saves_a_valid_reloadable_model(tmp_path, digits, digits_int8) -> None:
    model, _, test = digits
    for name, q in [("int8", digits_int8), ("dyn", quantize(model, DynamicInt8())), ("fp16", quantize(model, Fp16()))]:
        saved = q.save(tmp_path / f"{name}.onnx")
        again = load_model(saved.path)  # runs the ONNX checker (e.g. topological order after the fp16 Casts)
        assert again.sha256 == q.sha256
        assert again.metadata["edgeopt.quantization"] == q.metadata["edgeopt.quantization"]
        assert evaluate(again, test.take(slice(0, 50)), reference=model, threads=1).agreement >= 0.98


def test_exclude_nodes_keeps_those_layers_float(digits) -> None:
    model, train, _ = digits
    convs = [n for n, op, _ in weight_nodes(prepared(model)) if op == "Conv"]
    q = quantize(model, StaticInt8(exclude_nodes=(convs[0],)), data=train)
    float_convs = [n for n in q.onnx.graph.node if n.op_type == "Conv" and n.name == convs[0]]
    assert float_convs, "the excluded conv is still a Conv with float weights"
    weights = {i.name: i for i in q.onnx.graph.initializer}
    assert weights[float_convs[0].input[1]].data_type == TensorProto.FLOAT


# -- configs and recipes --------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [StaticInt8(exclude_nodes=("a", "b")), DynamicInt8(op_types=("MatMul",)), Fp16(),
                                 Int4WeightOnly(block_size=64), Bf16()])
def test_configs_round_trip(cfg) -> None:
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "qlinear"}, "format must be one of qdq, qoperator"),
    ({"calibration": "mse"}, "calibration must be one of minmax, entropy, percentile"),
    ({"samples": 0}, "samples must be an integer >= 1"),
    ({"activation_type": "s8", "weight_type": "u8"}, "S8 activations with U8 weights"),
    ({"exclude_nodes": "conv1"}, "list of node names"),
])
def test_static_config_validates(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        StaticInt8(**kwargs)


def test_int4_config_validates() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        Int4WeightOnly(block_size=48)
    with pytest.raises(ConfigError, match="accuracy_level"):
        Int4WeightOnly(accuracy_level=7)


def test_recipe_applies_static_with_calibration_from_context(digits) -> None:
    model, train, _ = digits
    recipe = Recipe("int8", (StaticInt8(),), needs=("calibration",))
    out = apply_recipe(model, recipe, TransformContext(calibration=train.take(slice(0, 64))))
    assert out.metadata["edgeopt.runtime"] == "onnxruntime"
    assert "StaticInt8" in out.metadata["edgeopt.recipe"]
    with pytest.raises(BadInput, match="needs calibration data"):
        apply_recipe(model, recipe, TransformContext())


# -- bad input ------------------------------------------------------------------------------------
def test_already_quantized_model_is_refused(digits_int8) -> None:
    with pytest.raises(BadInput, match="already quantized .*DequantizeLinear"):
        quantize(digits_int8, DynamicInt8())


def test_static_without_data_and_misfit_data(digits) -> None:
    model, _, _ = digits
    with pytest.raises(BadInput, match="needs calibration data"):
        quantize(model, StaticInt8())
    wrong = Dataset({"x": np.zeros((8, 3, 32, 32), np.float32)}, None, "wrong.npz")
    with pytest.raises(DataError, match="expects 1x32x32"):
        quantize(model, StaticInt8(), data=wrong)


def test_unknown_exclude_node_is_named(digits) -> None:
    model, train, _ = digits
    with pytest.raises(BadInput, match="not in .*'no_such_conv'"):
        quantize(model, StaticInt8(exclude_nodes=("no_such_conv",)), data=train)


def custom_op_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]),
             helper.make_node("FancyActivation", ["c"], ["out"], domain="com.example")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 6, 6])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_unsupported_op_is_named(tmp_path) -> None:
    model = load_model(custom_op_model(tmp_path / "custom.onnx"))
    with pytest.raises(UnsupportedOperation, match="FancyActivation"):
        quantize(model, DynamicInt8())


def test_non_onnx_model_says_export_first(digits_factory) -> None:
    pytest.importorskip("torch")
    spec, weights = digits_factory
    with pytest.raises(BadInput, match="export it first"):
        check_quantizable(load_model(spec, weights=weights))


def test_int4_on_a_cnn_has_nothing_to_quantize(digits) -> None:
    with pytest.raises(UnsupportedOperation, match="no MatMul"):
        quantize(digits[0], Int4WeightOnly())


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_static_writes_model_and_report(cli, tmp_path, digits_onnx, digits_train_npz, digits_test_npz) -> None:
    out = tmp_path / "int8.onnx"
    result = cli("quantize", digits_onnx, "-o", out, "--mode", "static", "--data", digits_train_npz,
                 "--eval-data", digits_test_npz, "--threads", "1", "--seconds", "0.2", "--per-tensor",
                 "--format", "qoperator", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stdout + result.stderr
    saved = load_model(out)
    assert saved.metadata["edgeopt.quantization"]
    report = json.loads((tmp_path / "int8.report.json").read_text())
    assert report["config"]["fields"]["format"] == "qoperator"
    assert report["config"]["fields"]["per_channel"] is False
    assert report["size_ratio"] >= 3.5
    assert report["evaluation"]["agreement"] >= 0.99
    fp32_p50, int8_p50 = report["fp32"]["latency_ms"]["p50"], report["quantized"]["latency_ms"]["p50"]
    assert report["speedup"] == pytest.approx(fp32_p50 / int8_p50, abs=1e-3)  # the ratio of the two timings
    assert json.loads((tmp_path / "r.json").read_text())["size_ratio"] == report["size_ratio"]


@pytest.mark.parametrize(("args", "message"), [
    (("--mode", "static"), "--mode static needs calibration data"),
    (("--mode", "auto"), "--mode auto needs calibration data"),
    (("--mode", "dynamic", "--max-drop", "-0.5"), "--max-drop must be in"),
    (("--mode", "turbo"), "--mode must be one of"),
    (("--mode", "static", "--data", "WRONG"), "expects 1x32x32"),
    (("--mode", "static", "--data", "DATA", "--calibration", "mse"), "calibration must be one of"),
])
def test_cli_bad_input_exit_2_one_line_no_output(cli, tmp_path, digits_onnx, digits_train_npz, args, message) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 8, 8), np.float32))
    args = tuple(str(wrong) if a == "WRONG" else str(digits_train_npz) if a == "DATA" else a for a in args)
    out = tmp_path / "q.onnx"
    result = cli("quantize", digits_onnx, "-o", out, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists() and not (tmp_path / "q.report.json").exists()


def test_cli_already_quantized_and_custom_op(cli, tmp_path, digits_int8) -> None:
    q = digits_int8.save(tmp_path / "already.onnx")
    result = cli("quantize", q.path, "-o", tmp_path / "again.onnx", "--mode", "dynamic")
    assert result.exit_code == 2 and "already quantized" in result.stderr
    custom = custom_op_model(tmp_path / "custom.onnx")
    result = cli("quantize", custom, "-o", tmp_path / "c8.onnx", "--mode", "dynamic")
    assert result.exit_code == 2 and "FancyActivation" in result.stderr
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "c8.onnx").exists()


def test_cli_torch_model_says_export_first(cli, tmp_path, digits_factory) -> None:
    pytest.importorskip("torch")
    spec, weights = digits_factory
    result = cli("quantize", spec, "--weights", weights, "-o", tmp_path / "q.onnx", "--mode", "dynamic")
    assert result.exit_code == 2
    assert "export it first" in result.stderr


def test_cli_bf16_tags_openvino(cli, tmp_path, digits_onnx) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "bf16.onnx"
    result = cli("quantize", digits_onnx, "-o", out, "--mode", "bf16", "--threads", "1", "--seconds", "0.2")
    assert result.exit_code == 0, result.stderr
    saved = load_model(out)
    assert saved.metadata["edgeopt.runtime"] == "openvino"
    assert json.loads(saved.metadata["edgeopt.runtime_options"]) == {"precision": "bf16"}
    assert json.loads((tmp_path / "bf16.report.json").read_text())["quantized"]["runtime"] == "openvino"
