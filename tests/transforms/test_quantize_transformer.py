"""A 2-layer transformer encoder exported with to_onnx: dynamic INT8 and INT4 keep cosine >= 0.99."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import Dataset
from edgeopt.measure.evaluate import evaluate
from edgeopt.model import Model, load_model
from edgeopt.search.space import matmul_heavy
from edgeopt.transforms.quantize import DynamicInt8, Int4WeightOnly, quantize

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


class Encoder(torch.nn.Module):
    """Token features (batch, 16, 128) -> 2 encoder layers -> mean-pool -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0,
                                                 batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def weight_bytes(model: Model) -> int:
    return sum(len(i.SerializeToString()) for i in model.onnx.graph.initializer)


@pytest.fixture(scope="module")
def encoder() -> tuple[Model, Dataset]:
    from edgeopt.transforms.export import OnnxExport, to_onnx

    torch.manual_seed(0)
    module = Encoder().eval()
    data = Dataset({"x": np.random.default_rng(0).standard_normal((64, 16, 128)).astype(np.float32)}, None,
                   "tokens")
    onnx_model, check = to_onnx(Model.from_torch(module, source="encoder", input_shape=(1, 16, 128)),
                                OnnxExport(), data=data)
    assert check.cosine > 0.9999
    return onnx_model, data


@pytest.mark.slow
def test_encoder_is_matmul_heavy_and_dynamic_int8_keeps_cosine(encoder) -> None:
    model, data = encoder
    assert matmul_heavy(model)
    q = quantize(model, DynamicInt8())
    ops = {n.op_type for n in q.onnx.graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    r = evaluate(q, data, reference=model, threads=1)
    assert r.cosine >= 0.99
    assert weight_bytes(model) / weight_bytes(q) >= 3.5
    assert model.size_bytes / q.size_bytes >= 2.5  # the exporter's per-node metadata is not weights


@pytest.mark.slow
def test_encoder_int4_weight_only_keeps_cosine(encoder, tmp_path) -> None:
    model, data = encoder
    q = load_model(quantize(model, Int4WeightOnly(block_size=32)).save(tmp_path / "int4.onnx").path)
    assert sum(n.op_type == "MatMulNBits" for n in q.onnx.graph.node) == 6  # fused qkv + 2 FFN MatMuls per layer
    r = evaluate(q, data, reference=model, threads=1)
    assert r.cosine >= 0.99
    assert weight_bytes(model) / weight_bytes(q) >= 3.5  # the out_proj Gemms stay float (MatMul only)
    assert model.size_bytes / q.size_bytes >= 2.5
