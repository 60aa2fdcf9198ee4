"""Transformer-aware INT8: detection, SmoothQuant, ORT fusions, block-wise INT8 weights, and the
auto search's transformer space, on a tiny BERT-style encoder (random weights: shapes and
mechanics here; fidelity on real weights is benchmarks/quantize_transformer.py's job)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import load_data
from edgeopt.measure.evaluate import evaluate
from edgeopt.model import load_model
from edgeopt.search.budget import Budget
from edgeopt.transforms.quantize import DynamicInt8, Int8WeightOnly, StaticInt8, quantize
from edgeopt.transforms.smooth_quant import SmoothQuant, smooth_quant
from edgeopt.transforms.transformer import (
    TransformerFusion,
    attention_shape,
    fuse_transformer,
    is_transformer,
)


@pytest.fixture(scope="module")
def encoder(tiny_transformer):
    path, npz = tiny_transformer
    return load_model(path), load_data(npz)


def test_transformers_are_recognised(encoder, digits_onnx) -> None:
    model, _ = encoder
    assert is_transformer(model)
    assert attention_shape(model) == (4, 32)  # 4 heads of 8: the scores are divided by sqrt(8)
    assert not is_transformer(load_model(digits_onnx))


def test_smoothquant_is_exact_in_float_and_helps_int8(encoder) -> None:
    model, data = encoder
    smoothed = smooth_quant(model, SmoothQuant(alpha=0.75), data=data)
    muls = [n for n in smoothed.onnx.graph.node if n.name.startswith("edgeopt_smooth_")]
    assert len(muls) == 8  # per layer: the QKV input, the attention context, the FFN input, the GELU output
    assert evaluate(smoothed, data, reference=model, threads=1).cosine > 0.99999
    plain = evaluate(quantize(model, DynamicInt8(per_channel=True)), data, reference=model, threads=1)
    smooth = evaluate(quantize(smoothed, DynamicInt8(per_channel=True)), data, reference=model, threads=1)
    assert smooth.cosine >= plain.cosine - 1e-4 and smooth.cosine > 0.999


def test_fusion_and_block_int8_weights(encoder) -> None:
    model, data = encoder
    fused, stats = fuse_transformer(model, TransformerFusion())
    assert stats.get("SkipLayerNormalization") == 4 and stats.get("BiasGelu") == 2
    assert evaluate(fused, data, reference=model, threads=1).cosine > 0.99999
    q = quantize(model, Int8WeightOnly(block_size=32))
    ops = [n.op_type for n in q.onnx.graph.node]
    assert ops.count("MatMulNBits") == 12
    assert any(i.name == "pos_emb_int8" and i.data_type == 3 for i in q.onnx.graph.initializer)  # INT8 rows
    r = evaluate(q, data, reference=model, threads=1)
    assert r.cosine > 0.999 and r.nn_agreement >= 0.9
    assert model.size_bytes / q.size_bytes > 2.5


def test_static_int8_of_matmul_inputs_only_keeps_layernorm_and_softmax_float(encoder) -> None:
    model, data = encoder
    q = quantize(model, StaticInt8(op_types=("MatMul",)), data=data)
    producers = {o: n for n in q.onnx.graph.node for o in n.output}
    quantized_inputs = {producers[x].op_type for n in q.onnx.graph.node if n.op_type in ("Softmax",
                        "LayerNormalization") for x in n.input if x in producers}
    assert "DequantizeLinear" not in quantized_inputs
    assert sum(n.op_type == "QuantizeLinear" for n in q.onnx.graph.node) > 0


@pytest.mark.slow
def test_auto_searches_the_transformer_space_and_judges_by_cosine(encoder) -> None:
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.search.auto_quantize import auto_quantize

    model, data = encoder
    r = auto_quantize(model, data, runtimes=("onnxruntime",), threads=1, max_drop=0.01,
                      bench=BenchSettings(warmup=2, min_runs=5, min_seconds=0.05, max_seconds=1.0))
    assert r.budget.metric == "cosine" and r.budget.min_cosine == 0.99
    assert any("transformer graph" in n for n in r.notes)
    assert any("judged by mean cosine" in n for n in r.notes)
    names = {x.name for x in r.results}
    assert {"int8-dynamic", "int8-dynamic-perchannel-smoothquant-0.5", "int8-dynamic-perchannel-fused",
            "int8-weight-only-block32", "int8-qdq-u8s8-perchannel-matmul", "int4-weight-only"} <= names
    assert not any(n.startswith("int8-qdq-u8s8-pertensor") for n in names)  # the CNN space is not tried
    built = [x for x in r.results if x.status != "failed"]
    assert len(built) == len(r.results), [x.reason for x in r.results if x.status == "failed"]
    for x in built:
        assert x.cosine is not None and x.nn_agreement is not None and x.cosine_p5 <= x.cosine + 1e-12
        assert x.drop == pytest.approx(1 - x.cosine)
        assert x.meets_budget == Budget().allows(1.0, x.cosine, cosine=x.cosine)
    assert np.isfinite(r.baseline.latency_ms["p50"])


def test_nncf_int8_weight_compression_runs_in_openvino(encoder) -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    model, data = encoder
    q = nncf_compress_weights(model, NncfWeightsInt8())
    assert q.metadata["edgeopt.runtime"] == "openvino"
    assert sum(n.op_type == "DequantizeLinear" for n in q.onnx.graph.node) >= 12
    r = evaluate(q, data, reference=model, threads=1)
    assert r.cosine > 0.99 and model.size_bytes / q.size_bytes > 2.5


def test_optimize_searches_the_transformer_space_too(encoder, digits_onnx) -> None:
    from edgeopt.devices import get_device
    from edgeopt.search.space import default_recipes

    names = {r.name for r in default_recipes(encoder[0], get_device(None))}
    assert "int8-dynamic-perchannel-smoothquant-0.75" in names and "int8-weight-only-block32" in names
    assert "int8-qdq-u8s8-pertensor" not in names
    assert "int8-qdq-u8s8-pertensor" in {r.name for r in default_recipes(load_model(digits_onnx), get_device(None))}
