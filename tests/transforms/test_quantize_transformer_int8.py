"""Transformer-aware INT8: detection, SmoothQuant, ORT fusions, block-wise INT8 weights, and the
auto search's transformer space, on a tiny BERT-style encoder (random weights: shapes and
mechanics here; fidelity on real weights is benchmarks/quantize_transformer.py's job)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.data import load_data
from edgeopt.errors import ConfigError
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
def test_auto_searches_the_transformer_space_and_judges_by_neighbours(encoder) -> None:
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.search.auto_quantize import auto_quantize

    model, data = encoder
    r = auto_quantize(model, data, runtimes=("onnxruntime",), threads=1, max_drop=0.01,
                      bench=BenchSettings(warmup=2, min_runs=5, min_seconds=0.05, max_seconds=1.0))
    assert r.budget.metric == "neighbours" and r.budget.floor == 0.99
    assert any("transformer graph" in n for n in r.notes)
    assert any("judged by nearest-neighbour agreement" in n for n in r.notes)
    names = {x.name for x in r.results}
    assert {"int8-dynamic", "int8-dynamic-perchannel-smoothquant-0.5", "int8-weight-only-block32",
            "int8-weight-only-block64", "int8-qdq-u8s8-perchannel-matmul", "int4-weight-only"} <= names
    by_name = {x.name: x for x in r.results}
    # the fused variant has the outputs of the unfused one: built only when that one meets the budget
    assert ("int8-dynamic-perchannel-fused" in names) == by_name["int8-dynamic-perchannel"].meets_budget
    # only variants within the budget are timed; every built one has its size
    for x in r.results:
        assert bool(x.latency_ms) == x.meets_budget and x.size_ratio > 1.0
    assert not any(n.startswith("int8-qdq-u8s8-pertensor") for n in names)  # the CNN space is not tried
    built = [x for x in r.results if x.status != "failed"]
    assert len(built) == len(r.results), [x.reason for x in r.results if x.status == "failed"]
    for x in built:
        assert x.cosine is not None and x.nn_agreement is not None and x.cosine_p5 <= x.cosine + 1e-12
        assert x.nn_agreement <= x.nn_tie_agreement and x.drop == pytest.approx(1 - x.nn_tie_agreement)
        assert 0.0 <= x.nn_expected_agreement <= 1.0
        assert x.meets_budget == (x.drop <= 0.01 + 1e-12 and x.cosine >= 0.99 - 1e-12
                                  and x.nn_expected_agreement + x.nn_expected_margin >= 0.98 - 1e-12)
    assert r.budget.nn_floor == 0.98
    assert np.isfinite(r.baseline.latency_ms["p50"])
    assert (r.baseline.nn_expected_agreement, r.baseline.nn_expected_margin) == (1.0, 0.0)  # itself: no noise


def test_dynamic_int8_keeps_the_excluded_matmuls_float(encoder) -> None:
    from edgeopt.errors import BadInput
    from edgeopt.transforms.quantize import prepared

    model, _ = encoder
    matmuls = [n.name for n in prepared(model).graph.node if n.op_type == "MatMul"
               and any(i.name == n.input[1] for i in prepared(model).graph.initializer)]
    q = quantize(model, DynamicInt8(per_channel=True, exclude_nodes=tuple(matmuls[:2])))
    ops = [n.op_type for n in q.onnx.graph.node]
    assert ops.count("MatMulInteger") == len(matmuls) - 2 and ops.count("MatMul") >= 2
    with pytest.raises(BadInput, match="not in"):
        quantize(model, DynamicInt8(exclude_nodes=("no_such_node",)))


def _with_outlier_channel(model, node_name: str, factor: float = 60.0):
    """``model`` with one input channel of ``node_name`` (a MatMul) scaled up by ``factor`` and the
    matching weight row scaled down: the same function in float, the activation outlier that makes
    a transformer layer's per-tensor INT8 input coarse."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    node = next(n for n in proto.graph.node if n.name == node_name)
    init = next(i for i in proto.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0] /= factor
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    scale = np.ones(w.shape[0], np.float32)
    scale[0] = factor
    proto.graph.initializer.append(numpy_helper.from_array(scale, "outlier_scale"))
    mul = helper.make_node("Mul", [node.input[0], "outlier_scale"], ["outlier_in"], name="outlier_mul")
    node.input[0] = "outlier_in"
    index = list(proto.graph.node).index(node)
    proto.graph.node.insert(index, mul)
    return type(model).from_onnx(proto, source="outlier.onnx")


def test_dynamic_layer_error_finds_the_layer_with_an_outlier_channel(encoder) -> None:
    from edgeopt.transforms.layer_error import layer_errors

    model, data = encoder
    skewed = _with_outlier_channel(model, "l1.ffn1.mm")
    assert evaluate(skewed, data, reference=model, threads=1).cosine > 0.99999  # same function in float
    rows = layer_errors(skewed, None, data, config=DynamicInt8(per_channel=True))
    assert len(rows) == 12 and all(r.op_type == "MatMul" for r in rows)
    assert rows[0].node == "l1.ffn1.mm" and rows[0].sqnr_db < rows[1].sqnr_db - 6  # >= 4x the noise of any other
    assert all(0.9 < r.cosine <= 1.0 for r in rows)

    def loss(exclude: tuple[str, ...]) -> float:
        q = quantize(skewed, DynamicInt8(per_channel=True, exclude_nodes=exclude))
        return 1 - evaluate(q, data, reference=model, threads=1).cosine

    # keeping the one layer ranked worst float removes most of the loss; keeping the best-ranked does not
    assert loss((rows[0].node,)) < 0.5 * loss((rows[-1].node,))


def test_mixed_precision_for_transformers_reuses_the_recovery_step(encoder) -> None:
    from edgeopt.search.engine import baseline_result, build_one, result_for
    from edgeopt.search.recipe import Recipe
    from edgeopt.search.recovery import mixed_precision
    from edgeopt.transforms.config import TransformContext

    original, data = encoder
    model = _with_outlier_channel(original, "l0.ffn2.mm")
    loose = Budget(metric="neighbours", max_drop=0.5, min_cosine=0.0)
    base, out, metric = baseline_result(model, data, loose, threads=1)
    ctx = TransformContext(calibration=data, progress=False)
    start_recipe = Recipe("int8-dynamic-perchannel", (DynamicInt8(per_channel=True),))
    start = result_for(build_one(model, start_recipe, ctx), key="s", eval_data=data, budget=loose,
                       baseline_outputs=out, baseline_metric=metric, threads=1)
    # a floor between the all-INT8 cosine and FP32: some MatMuls must stay float, not all
    budget = Budget(metric="neighbours", max_drop=0.5, min_cosine=start.cosine + 0.5 * (1 - start.cosine))

    def run(recipes):
        return [result_for(build_one(model, r, ctx), key=r.key(), eval_data=data, budget=budget,
                           baseline_outputs=out, baseline_metric=metric, threads=1) for r in recipes]

    steps, notes = [], []
    kept = mixed_precision(model, data, data, start, DynamicInt8(per_channel=True), run=run, threads=1,
                           steps=steps, notes=notes)
    assert any("one-pass per-layer error: 12 layers" in n for n in notes)
    tried = {len(s["float_layers"]): s for s in steps}
    assert tried and all(s["variant"].startswith("int8-dynamic-mixed-") for s in steps)
    assert len(kept) == 1 and kept[0].meets_budget and kept[0].cosine > start.cosine
    k = int(kept[0].name.split("-")[3])
    assert 1 <= k <= 6 and tried[k]["status"] == "meets budget"
    assert "l0.ffn2.mm" in tried[k]["float_layers"]  # the layer with the outlier input stays float
    assert all(tried[j]["status"] == "misses budget" for j in tried if j < k)  # the fewest that meet it


@pytest.mark.slow
def test_auto_tries_mixed_precision_when_only_openvino_fp32_meets_the_budget(encoder) -> None:
    # OpenVINO running the FP32 model meets any budget; it once stopped auto from trying mixed precision at
    # all, and then was not chosen either (no faster than FP32 on ONNX Runtime): the user got nothing
    pytest.importorskip("openvino")
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.search.auto_quantize import auto_quantize

    original, data = encoder
    model = _with_outlier_channel(original, "l0.ffn2.mm")
    r = auto_quantize(model, data, runtimes=("onnxruntime", "openvino"), threads=1, max_drop=0.5,
                      min_cosine=0.999999, bench=BenchSettings(warmup=2, min_runs=5, min_seconds=0.05, max_seconds=1.0))
    by_name = {x.name: x for x in r.results}
    assert by_name["openvino-f32"].meets_budget
    assert not any(x.meets_budget for x in r.results if x.recipe.get("steps") and not x.name.startswith("int8-dynamic-mixed-"))
    assert any("mixed precision from int8-dynamic-perchannel and from openvino-nncf-int8-weights" in n for n in r.notes)
    assert any("compressed MatMuls ranked by reverting each to float" in n for n in r.notes)  # its own ranking
    mixed = [s for s in r.steps if s["step"] == "3 mixed precision"]
    assert all(s["float_layers"] for s in mixed)
    dynamic = [s for s in mixed if s["variant"].startswith("int8-dynamic-mixed-")]
    # the closest NNCF INT8 weight compression is searched too: each try rebuilt with its ignored scope
    weights = [s for s in mixed if s["variant"].startswith("openvino-nncf-int8-weights")]
    assert dynamic and weights and len(dynamic) + len(weights) == len(mixed)
    assert {s["start"] for s in weights} == {weights[0]["start"]} and "-mixed-" in weights[0]["variant"]
    kept = [x for x in r.results if x.name.startswith("openvino-nncf-int8-weights") and "-mixed-" in x.name]
    assert len(kept) == 1  # the search's answer joins the candidates; every try is a row of the steps
    row = next(s for s in weights if s["variant"] == kept[0].name)
    scope = next(st for st in kept[0].recipe["steps"] if st["type"] == "NncfWeightsInt8")["fields"]["ignored_scope"]
    assert list(scope) == row["float_layers"] and kept[0].recipe["runtime"] == "openvino"


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
    # OpenVINO quantizes the activations of compressed-weight layers at run time, per group of values;
    # group size 0 turns that off: only the weights' rounding is left, so the outputs are closer to FP32
    from edgeopt.runtimes import get_runtime

    rt = get_runtime("openvino")
    off = rt.load(q, threads=1, options={"precision": "f32", "dynamic_quantization_group_size": 0})
    on = rt.load(q, threads=1, options={"precision": "f32", "dynamic_quantization_group_size": 32})
    assert (off.details["dynamic_quantization_group_size"], on.details["dynamic_quantization_group_size"]) == (0, 32)
    exact = rt.load(model, threads=1, options={"precision": "f32"})
    feeds = {k: v[:8] for k, v in data.feeds_for(model).inputs.items()}
    ref = exact.run(feeds)[0].ravel()

    def cos(x):
        return float(np.dot(x, ref) / np.linalg.norm(x) / np.linalg.norm(ref))

    assert cos(off.run(feeds)[0].ravel()) >= cos(on.run(feeds)[0].ravel()) - 1e-7


def _with_layernorm_outlier(model, factor: float = 10.0):
    """``model`` with hidden channel 5 of every LayerNorm's scale ``factor`` times larger: the outlier
    channel of BERT's residual stream, which every MatMul reading a LayerNorm output sees."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    for init in proto.graph.initializer:
        if init.name.endswith("ln.g") or init.name.endswith("ln1.g") or init.name.endswith("ln2.g"):
            g = numpy_helper.to_array(init).copy()
            g[5] *= factor
            init.CopyFrom(numpy_helper.from_array(g, init.name))
    return type(model).from_onnx(proto, source="ln_outlier.onnx")


def test_nncf_int8_weight_compression_leaves_the_ignored_scope_float(encoder) -> None:
    pytest.importorskip("nncf")
    from edgeopt.errors import BadInput, ConfigError
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    model, data = encoder

    def compressed(q) -> set[str]:
        dequantized = {o for n in q.onnx.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name for n in q.onnx.graph.node if n.op_type == "MatMul" and n.input[1] in dequantized}

    full = compressed(nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym", weight_rounding=True), data=data))
    keep = ("l0.ffn2.mm", "l1.q.mm")
    mixed = nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym", weight_rounding=True, ignored_scope=keep),
                                  data=data)
    assert set(keep) <= full and compressed(mixed) == full - set(keep)  # the rest compressed (and re-rounded) as before
    weights = {i.name: i for i in mixed.onnx.graph.initializer}
    node = next(n for n in mixed.onnx.graph.node if n.name == "l0.ffn2.mm")
    assert weights[node.input[1]].data_type == 1  # FP32 weights read directly
    assert evaluate(mixed, data, reference=model, threads=1).cosine > 0.99
    with pytest.raises(BadInput, match=r"ignored_scope names not in .*\['nope'\]"):
        nncf_compress_weights(model, NncfWeightsInt8(ignored_scope=("nope",)))
    with pytest.raises(ConfigError, match="list of node names"):
        NncfWeightsInt8(ignored_scope="l0.ffn2.mm")


def test_reverting_each_compressed_matmul_ranks_the_outlier_layer_first(encoder) -> None:
    # what auto's recovery ranks an NNCF weight compression's MatMuls by (recovery._revert_ranking)
    pytest.importorskip("openvino")
    from edgeopt.transforms.float_layers import compressed_layers, revert_losses
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    original, data = encoder
    model = _with_outlier_channel(original, "l0.ffn2.mm")
    q = nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym")).with_metadata(
        runtime="openvino", runtime_options=json.dumps({"precision": "f32", "dynamic_quantization_group_size": 32}))
    weights = [f"l{i}.{m}.mm" for i in (0, 1) for m in ("q", "k", "v", "o", "ffn1", "ffn2")]
    assert compressed_layers(q) == weights  # the attention's activation MatMuls (qk, ctx) have no weights
    expected = evaluate(model, data, threads=1, keep_outputs=True).outputs
    before = evaluate(q, data, reference=expected, threads=1)
    losses = revert_losses(q, model, data, expected, threads=1)
    assert set(losses) == set(weights) and min(losses, key=losses.__getitem__) == "l0.ffn2.mm"
    # the run-time groups of that layer's input hold the outlier: float, it gives back most of the loss
    assert losses["l0.ffn2.mm"] < 0.25 * (1 - before.embedding_cosine)
    assert all(v > 0.9 * (1 - before.embedding_cosine) for k, v in losses.items() if k != "l0.ffn2.mm")


def test_smoothquant_folded_into_layernorms_is_exact_and_adds_no_op_before_the_matmuls(encoder) -> None:
    model, data = encoder
    smoothed = smooth_quant(model, SmoothQuant(alpha=0.5, placement="layernorm"), data=data)
    # the 4 LayerNorm outputs read by MatMuls (embeddings -> l0 QKV, l0.ln1 -> FFN, l0.ln2 -> l1 QKV,
    # l1.ln1 -> FFN); the attention context and GELU outputs are left alone
    assert smoothed.metadata["edgeopt.smoothquant"] == "alpha=0.5,placement=layernorm,matmul_inputs=4"
    producers = {o: n for n in smoothed.onnx.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type != "Mul" or not producers[n.input[0]].name.startswith("edgeopt_")
               for n in smoothed.onnx.graph.node if n.op_type == "MatMul" and n.input[0] in producers)
    restores = [n for n in smoothed.onnx.graph.node if n.name.endswith("_restore_mul")]
    assert len(restores) == 4 and all(producers[n.input[0]].op_type == "Add" for n in restores)
    assert not any(n.name.endswith("_other_mul") for n in smoothed.onnx.graph.node)  # folded into the dense
    assert evaluate(smoothed, data, reference=model, threads=1).cosine > 0.99999  # the same function in float
    with pytest.raises(ConfigError, match="placement"):
        SmoothQuant(placement="before")


def test_smoothquant_leaves_a_residual_add_of_two_smoothed_layernorms_alone() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeopt.data import Dataset
    from edgeopt.errors import UnsupportedOperation
    from edgeopt.model import Model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             [("ga", np.ones(8)), ("ba", np.zeros(8)), ("gb", np.ones(8)), ("bb", np.zeros(8)),
              ("wa", rng.standard_normal((8, 4))), ("wb", rng.standard_normal((8, 4)))]]
    nodes = [helper.make_node("LayerNormalization", ["a", "ga", "ba"], ["la"], name="lna", axis=-1),
             helper.make_node("LayerNormalization", ["b", "gb", "bb"], ["lb"], name="lnb", axis=-1),
             helper.make_node("MatMul", ["la", "wa"], ["ya"], name="mma"),
             helper.make_node("MatMul", ["lb", "wb"], ["yb"], name="mmb"),
             helper.make_node("Add", ["la", "lb"], ["s"], name="sum")]
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 8]) for n in ("a", "b")]
    outs = [helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 8])]
    proto = helper.make_model(helper.make_graph(nodes, "two_ln", spec, outs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    model = Model.from_onnx(proto, source="two_ln.onnx")
    data = Dataset({"a": rng.standard_normal((16, 8)).astype(np.float32),
                    "b": rng.standard_normal((16, 8)).astype(np.float32)}, None, "rand")
    # both LayerNorm outputs meet at one Add: folding either would need the other unscaled there
    with pytest.raises(UnsupportedOperation, match="reading a LayerNorm output"):
        smooth_quant(model, SmoothQuant(placement="layernorm"), data=data)
    assert evaluate(smooth_quant(model, SmoothQuant(), data=data), data, reference=model, threads=1).cosine > 0.99999


def test_smoothquant_before_openvino_weight_compression_keeps_an_outlier_out_of_the_run_time_groups(encoder) -> None:
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    import json

    from edgeopt.devices import get_device
    from edgeopt.search.recipe import apply_recipe
    from edgeopt.search.space import transformer_recipes
    from edgeopt.transforms.config import TransformContext
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights

    original, data = encoder
    model = _with_layernorm_outlier(original)
    recipes = {r.name: r for r in transformer_recipes(model, get_device(None), runtimes=("openvino",))}
    recipe = recipes["openvino-nncf-int8-weights-smoothquant-0.5-dq128"]
    assert "openvino-nncf-int8-weights-smoothquant-0.75-dq64" in recipes and recipe.needs == ("calibration",)
    built = apply_recipe(model, recipe, TransformContext(calibration=data, progress=False))
    assert built.metadata["edgeopt.runtime"] == "openvino"
    assert json.loads(built.metadata["edgeopt.runtime_options"])["dynamic_quantization_group_size"] == 128
    assert sum(n.name.endswith("_restore_mul") for n in built.onnx.graph.node) == 4
    # the smoothing is measured once and reused by the same alpha's other run-time settings
    config = SmoothQuant(alpha=0.5, placement="layernorm")
    assert smooth_quant(model, config, data=data) is smooth_quant(model, config, data=data)

    def loss(m) -> float:  # run-time activation groups of 32 (the hidden size): one scale per token and MatMul
        m = m.with_metadata(runtime="openvino", runtime_options=json.dumps(
            {"precision": "f32", "dynamic_quantization_group_size": 32}))
        return 1 - evaluate(m, data, reference=model, threads=1).cosine

    plain = loss(nncf_compress_weights(model, NncfWeightsInt8(mode="int8_asym")))
    smoothed = loss(nncf_compress_weights(smooth_quant(model, config, data=data), NncfWeightsInt8(mode="int8_asym")))
    assert 0 < smoothed < 0.6 * plain  # measured: 3.3e-5 vs 7.7e-5


def test_optimize_searches_the_transformer_space_too(encoder, digits_onnx) -> None:
    from edgeopt.devices import get_device
    from edgeopt.search.space import default_recipes

    names = {r.name for r in default_recipes(encoder[0], get_device(None))}
    assert "int8-dynamic-perchannel-smoothquant-0.75" in names and "int8-weight-only-block32" in names
    assert "int8-qdq-u8s8-pertensor" not in names
    assert "int8-qdq-u8s8-pertensor" in {r.name for r in default_recipes(load_model(digits_onnx), get_device(None))}


def test_cli_dynamic_int8_keeps_named_matmuls_float(cli, tiny_transformer, tmp_path) -> None:
    from edgeopt.transforms.quantize import prepared

    enc_path, npz = tiny_transformer
    out = tmp_path / "d.onnx"
    res = cli("quantize", enc_path, "-o", out, "--mode", "dynamic", "--per-channel", "--exclude", "l0.ffn2.mm,l1.ffn2.mm",
              "--data", npz, "--threads", "1")
    assert res.exit_code == 0, res.output
    q = load_model(out)
    kept = [n for n in q.onnx.graph.node if n.op_type == "MatMul" and n.name in ("l0.ffn2.mm", "l1.ffn2.mm")]
    assert len(kept) == 2
    n_weights = sum(n.op_type == "MatMul" and n.input[1] in {i.name for i in prepared(load_model(enc_path)).graph.initializer}
                    for n in prepared(load_model(enc_path)).graph.node)
    assert sum(n.op_type == "MatMulInteger" for n in q.onnx.graph.node) == n_weights - 2
    res = cli("quantize", enc_path, "-o", tmp_path / "e.onnx", "--mode", "dynamic", "--exclude", "nope")
    assert res.exit_code == 2 and "node name(s) not in" in res.output and not (tmp_path / "e.onnx").exists()
