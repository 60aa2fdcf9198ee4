"""Hessian-aware INT8 weight rounding (transforms/weight_rounding.py) on a small depthwise CNN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.data import Dataset
from edgeopt.errors import BadInput, ConfigError
from edgeopt.measure.evaluate import predict
from edgeopt.model import Model
from edgeopt.transforms.quantize import StaticInt8, quantize
from edgeopt.transforms.weight_rounding import WeightRounding, _hessians, _layers, round_weights

pytest.importorskip("onnxruntime.quantization")


def depthwise_cnn(seed: int = 0) -> Model:
    """Stem conv (stride 2, asymmetric pads) - ReLU6 - depthwise 3x3 - ReLU6 - 1x1 - pool - Gemm:
    every layer kind the rounding handles, random weights (shapes only)."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w0", 16, 3, 3, 3), init("b0", 16), init("w1", 16, 1, 3, 3, scale=0.5), init("b1", 16),
             init("w2", 24, 16, 1, 1), init("b2", 24), init("fw", 10, 24), init("fb", 10),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="stem", strides=[2, 2], pads=[0, 0, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], name="clip0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw", group=16, pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="clip1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="project", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "dw_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model.from_onnx(proto, source="dw-cnn")


def smooth_images(n: int, seed: int) -> Dataset:
    """Spatially correlated inputs (random walks), so neighbouring pixels, and so a layer's input
    columns, are correlated as in photos: the case where rounding against H beats rounding alone."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(np.cumsum(rng.standard_normal((n, 3, 16, 16)), axis=2), axis=3)
    x /= np.abs(x).max(axis=(1, 2, 3), keepdims=True)
    return Dataset({"input": x.astype(np.float32)}, None, source=f"smooth-{seed}")


def output_error(model: Model, q_model: Model, data: Dataset) -> dict[str, float]:
    """Each layer's mean squared output error from its INT8 weights alone, on FP32 inputs."""
    layers = _layers(q_model.onnx, model.onnx)
    hessians = _hessians(model, layers, data)
    inits = {i.name: numpy_helper.to_array(i) for i in q_model.onnx.graph.initializer}
    out = {}
    for layer in layers:
        q = inits[layer.q_name].astype(np.float64)
        q = q.T if layer.kind == "matmul" else q  # stored [in, out]; the layer's weight is [out, in]
        dq = (q - layer.zero.reshape([-1] + [1] * (q.ndim - 1))) * layer.scale.reshape([-1] + [1] * (q.ndim - 1))
        diff = (layer.weight - dq).reshape(layer.weight.shape[0], -1)
        h = hessians[layer.name]
        if layer.kind == "depthwise":
            out[layer.name] = float(np.einsum("ci,cij,cj->", diff, h, diff))
        else:
            out[layer.name] = float(np.einsum("oi,ij,oj->", diff, h, diff))
    return out


def test_rounding_keeps_the_grid_and_lowers_every_layers_output_error() -> None:
    model = depthwise_cnn()
    cal = smooth_images(48, seed=1)
    int8 = quantize(model, StaticInt8(per_channel=True), data=cal)
    rounded = round_weights(int8, model, cal, WeightRounding(samples=32))

    before = {i.name: numpy_helper.to_array(i) for i in int8.onnx.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in rounded.onnx.graph.initializer}
    layers = _layers(int8.onnx, model.onnx)
    assert sorted(layer.kind for layer in layers) == ["conv", "conv", "depthwise", "gemm"]
    changed = 0
    for layer in layers:
        old, new = before[layer.q_name], after[layer.q_name]
        assert new.dtype == old.dtype and new.shape == old.shape
        assert new.min() >= old.min() and new.max() <= old.max()  # the quantizer's own integer range
        assert np.abs(new.astype(int) - old.astype(int)).max() <= 2  # a neighbouring grid point, not a new scale
        changed += int((new != old).sum())
    assert changed > 0
    for name in before:  # scales, zero points and biases untouched
        if name not in {layer.q_name for layer in layers}:
            np.testing.assert_array_equal(before[name], after[name])
    assert [n.op_type for n in rounded.onnx.graph.node] == [n.op_type for n in int8.onnx.graph.node]
    assert rounded.metadata["edgeopt.weight_rounding"] == "hessian-4-layers"

    held = smooth_images(48, seed=2)
    err_rtn, err_new = output_error(model, int8, held), output_error(model, rounded, held)
    for name in ("stem", "dw", "project"):  # on samples it never saw, each layer's output is closer
        assert err_new[name] < 0.9 * err_rtn[name], (name, err_rtn[name], err_new[name])
    assert sum(err_new.values()) < 0.7 * sum(err_rtn.values())


def test_rounded_model_is_closer_to_fp32_end_to_end() -> None:
    model = depthwise_cnn(seed=3)
    cal, held = smooth_images(48, seed=4), smooth_images(64, seed=5)
    int8 = quantize(model, StaticInt8(per_channel=True), data=cal)
    rounded = round_weights(int8, model, cal, WeightRounding(samples=32))
    ref = predict(model, held)
    mse_rtn = float(np.mean((predict(int8, held) - ref) ** 2))
    mse_new = float(np.mean((predict(rounded, held) - ref) ** 2))
    assert mse_new < mse_rtn


def test_bad_inputs_say_what_is_wrong() -> None:
    model = depthwise_cnn()
    cal = smooth_images(8, seed=1)
    with pytest.raises(BadInput, match="no INT8 Conv/Gemm/MatMul weights"):
        round_weights(model, model, cal)  # an FP32 model has no INT8 weights to round
    with pytest.raises(ConfigError, match="samples must be an integer >= 1"):
        WeightRounding(samples=0)
    with pytest.raises(ConfigError, match="damp must be between 0 and 1"):
        WeightRounding(damp=2.0)


def test_nncf_int8_with_weight_rounding_keeps_nncf_scales_and_gets_closer() -> None:
    pytest.importorskip("nncf")
    from edgeopt.transforms.nncf_quantize import NncfInt8, nncf_quantize

    model = depthwise_cnn(seed=3)
    cal, held = smooth_images(32, seed=4), smooth_images(64, seed=5)
    plain = nncf_quantize(model, NncfInt8(), data=cal)
    rounded = nncf_quantize(model, NncfInt8(weight_rounding=True), data=cal)
    assert rounded.metadata["edgeopt.runtime"] == "openvino"
    assert rounded.metadata["edgeopt.weight_rounding"] == "hessian-4-layers"
    a = {i.name: numpy_helper.to_array(i) for i in plain.onnx.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in rounded.onnx.graph.initializer}
    assert a.keys() == b.keys()
    assert sum(int((a[k] != b[k]).sum()) for k in a if a[k].dtype == np.int8) > 0
    assert all(np.array_equal(a[k], b[k]) for k in a if a[k].dtype != np.int8)  # scales, biases: NNCF's
    err_plain, err_new = output_error(model, plain, held), output_error(model, rounded, held)
    assert sum(err_new.values()) < 0.8 * sum(err_plain.values())


def test_compressed_transformer_matmuls_are_rounded_and_closer(tiny_transformer) -> None:
    """NNCF's INT8 weight compression of a BERT-style encoder ([in, out] MatMul weights, scales per
    output column) re-rounded: same grid, and the hidden states on held-out sequences are closer."""
    pytest.importorskip("nncf")
    from edgeopt.data import load_data
    from edgeopt.measure.judge import fidelity_of, token_mask
    from edgeopt.model import load_model
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    model = load_model(tiny_transformer[0])
    tokens = load_data(tiny_transformer[1])
    cal, held = tokens.take(np.arange(30)), tokens.take(np.arange(30, 60))
    plain = nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym"))
    rounded = nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym", weight_rounding=True), data=cal)
    layers = _layers(plain.onnx, model.onnx)
    assert {layer.kind for layer in layers} == {"matmul"} and len(layers) == 12  # 2 x (Q, K, V, out, FFN in, out)
    assert rounded.metadata["edgeopt.weight_rounding"] == "hessian-12-layers"
    assert rounded.metadata["edgeopt.runtime"] == "openvino"
    a = {i.name: numpy_helper.to_array(i) for i in plain.onnx.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in rounded.onnx.graph.initializer}
    for layer in layers:
        old, new = a[layer.q_name], b[layer.q_name]
        assert new.shape == old.shape and new.dtype == old.dtype  # stored [in, out] as NNCF wrote it
        assert np.abs(new.astype(int) - old.astype(int)).max() <= 2
    assert all(np.array_equal(a[k], b[k]) for k in a if k not in {layer.q_name for layer in layers})

    def error(q: Model) -> float:  # 1 - mean cosine of the hidden states, padding left out, in ONNX Runtime
        ref = predict(model, held)
        out = predict(q.with_metadata(runtime="onnxruntime"), held)
        return 1.0 - fidelity_of(out, ref, mask=token_mask(ref, held.inputs)).cosine

    assert error(rounded) < 0.9 * error(plain), (error(plain), error(rounded))
    err_plain, err_new = output_error(model, plain, held), output_error(model, rounded, held)
    assert sum(err_new.values()) < 0.85 * sum(err_plain.values())  # 0.0082 -> 0.0062 (random weights and tokens)


def test_padding_tokens_are_left_out_of_a_matmuls_statistics() -> None:
    from edgeopt.transforms.weight_rounding import _tokens

    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(_tokens(x, {"attention_mask": mask}), x[[0, 0, 1], [0, 1, 0]])
    assert _tokens(x, {}).shape == (6, 4)
    assert _tokens(x, {"attention_mask": np.ones((2, 5))}).shape == (6, 4)  # a mask that does not fit is ignored


def test_weight_rounding_of_compressed_weights_needs_data(tiny_transformer) -> None:
    pytest.importorskip("nncf")
    from edgeopt.errors import DataError
    from edgeopt.model import load_model
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    with pytest.raises(DataError, match="needs calibration data"):
        nncf_compress_weights(load_model(tiny_transformer[0]), NncfWeightsInt8(weight_rounding=True))
    with pytest.raises(ConfigError, match="weight_rounding must be true or false"):
        NncfWeightsInt8(weight_rounding=1)  # type: ignore[arg-type]
