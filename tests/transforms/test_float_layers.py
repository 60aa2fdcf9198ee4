"""Float layers restored in a QDQ INT8 model by a graph edit (transforms/float_layers.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.errors import BadInput
from edgeopt.measure.evaluate import fidelity, predict
from edgeopt.transforms.float_layers import revert_to_float
from edgeopt.transforms.quantize import StaticInt8, quantize
from tests.transforms.test_analyze import fragile_mlp
from tests.transforms.test_int8_recovery import deep_mlp

pytest.importorskip("onnxruntime.quantization")


def test_reverting_the_fragile_layer_restores_its_float_weights_and_the_agreement() -> None:
    model, data = fragile_mlp()
    cal, held = data.split(0.5, seed=0)
    int8 = quantize(model, StaticInt8(per_channel=False), data=cal)
    ref = predict(model, held)
    agreement, cosine, _ = fidelity(predict(int8, held), ref)
    assert agreement < 0.7 and cosine < 0.9  # per-tensor INT8 of fc2's outlier input crushes it

    mixed = revert_to_float(int8, model, ["fc2"])
    fc2 = next(n for n in mixed.onnx.graph.node if n.name == "fc2")
    weights = {i.name: i for i in mixed.onnx.graph.initializer}
    assert fc2.input[1] == "w2__float" and weights["w2__float"].data_type == 1  # FP32, the original values
    assert fc2.output[0] == "logits"  # the model's output leaves fc2 unquantized
    agreement, cosine, _ = fidelity(predict(mixed, held), ref)
    assert agreement >= 0.95 and cosine > 0.999
    assert mixed.metadata["edgeopt.float_layers"] == "fc2"
    # the INT8 model is untouched, the other layer still reads INT8 weights through a DequantizeLinear
    assert any(n.name == "fc2" and n.input[1] != "w2__float" for n in int8.onnx.graph.node)
    fc1 = next(n for n in mixed.onnx.graph.node if n.name == "fc1")
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == fc1.input[1] for n in mixed.onnx.graph.node)


def test_reverting_every_layer_of_a_chain_gives_the_float_model_back() -> None:
    model = deep_mlp(6)
    rng = np.random.default_rng(1)
    from edgeopt.data import Dataset

    data = Dataset({"input": rng.standard_normal((64, 16)).astype(np.float32)}, None, "x")
    int8 = quantize(model, StaticInt8(), data=data)
    ref = predict(model, data)
    assert np.abs(predict(int8, data) - ref).max() > 1e-3
    layers = [f"fc{i}" for i in range(6)]
    back = revert_to_float(int8, model, layers)
    # only Relu's QDQ pairs could be left: nothing a Relu does to quantized values is lost, so exact
    np.testing.assert_allclose(predict(back, data), ref, atol=1e-5)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "input" for n in back.onnx.graph.node)
    # fewer float layers: the error grows monotonically here as more layers stay INT8
    errors = [float(np.abs(predict(revert_to_float(int8, model, layers[:k]), data) - ref).mean()) for k in (0, 3, 6)]
    assert errors[0] > errors[1] > errors[2]


def test_openvino_models_get_the_f32_hint_and_unknown_layers_are_refused() -> None:
    model, data = fragile_mlp()
    int8 = quantize(model, StaticInt8(per_channel=False), data=data).with_metadata(runtime="openvino")
    mixed = revert_to_float(int8, model, ["fc2"])
    assert mixed.metadata["edgeopt.runtime"] == "openvino"
    assert json.loads(mixed.metadata["edgeopt.runtime_options"]) == {"precision": "f32"}
    with pytest.raises(BadInput, match="not found in both"):
        revert_to_float(int8, model, ["fc9"])
