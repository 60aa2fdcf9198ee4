"""One-pass per-layer INT8 error: every weight layer quantized alone, all measured in one run.

Quantizing each layer alone and re-evaluating the whole model costs one quantizer pass and one
evaluation per layer: minutes for 10 layers, hours for 100+. Here the FP32 graph gets, beside
each weight layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight), a twin that reads
the layer's input through a Quantize/Dequantize pair with the calibrated INT8 range and uses the
INT8-rounded weights; the graph also emits the energy of the twin's deviation from the float
layer output and of the float output itself. One forward pass over the data then gives every
layer's output SQNR (signal-to-quantization-noise ratio, dB) and cosine at once. The twin sees
the *float* input, so each figure is what quantizing that layer alone adds, not what earlier
layers left; ranges come from ONNX Runtime's own calibrator (and its cache, so the variants the
auto search builds later reuse them). With a :class:`DynamicInt8` config the twin quantizes its
input as dynamic INT8 does at run time (``DynamicQuantizeLinear``: U8, one range per call, no
calibration), so the ranking is that of the variant mixed precision starts from.

Model-agnostic: nothing here knows CNNs from transformers; any ONNX graph with constant-weight
Conv/Gemm/MatMul works (mixed precision for CNNs and transformers uses the same ranking).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import UnsupportedOperation
from edgeopt.model import Model
from edgeopt.transforms.quantize import (
    DynamicInt8,
    StaticInt8,
    calibration_ranges,
    check_quantizable,
    prepared,
    weight_nodes,
)


@dataclass
class LayerError:
    """What quantizing one layer alone does to that layer's output (``noise``: error energy over
    signal energy; ``sqnr_db`` = -10 log10 noise; ``cosine``: of quantized vs float output, flattened
    per sample and averaged)."""

    node: str
    op_type: str
    params: int
    sqnr_db: float
    noise: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def _activation_qparams(lo: float, hi: float, cfg: StaticInt8) -> tuple[float, int, int]:
    """(scale, zero point, ONNX element type) as ONNX Runtime computes them for an activation."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if cfg.activation_type == "u8" and not cfg.symmetric_activations:
        scale = (hi - lo) / 255.0 or 1.0
        return scale, int(np.clip(round(-lo / scale), 0, 255)), 2  # UINT8
    if cfg.symmetric_activations:
        m = max(abs(lo), abs(hi))
        scale = (2 * m / 254.0 if cfg.activation_type == "s8" else 2 * m / 255.0) or 1.0
        return scale, (0 if cfg.activation_type == "s8" else 128), (3 if cfg.activation_type == "s8" else 2)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127)), 3  # INT8


def fake_quant_weight(w: np.ndarray, *, axis: int | None, cfg: StaticInt8) -> np.ndarray:
    """``w`` rounded to INT8 and back (per channel along ``axis``, or per tensor), as float32."""
    w = w.astype(np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    if cfg.weight_type == "s8" and cfg.symmetric_weights:
        absmax = np.max(np.abs(w), axis=reduce, keepdims=True) if reduce != () else np.abs(w)
        scale = np.where(absmax > 0, absmax / 127.5, 1.0)
        return (np.clip(np.round(w / scale), -128, 127) * scale).astype(np.float32)
    lo = np.minimum(np.min(w, axis=reduce, keepdims=True), 0.0)
    hi = np.maximum(np.max(w, axis=reduce, keepdims=True), 0.0)
    qmin, qmax = (0, 255) if cfg.weight_type == "u8" else (-128, 127)
    scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
    zp = np.round(qmin - lo / scale)
    return ((np.clip(np.round(w / scale) + zp, qmin, qmax) - zp) * scale).astype(np.float32)


def _channel_axis(node: Any, weight_index: int, ndim: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (0 if trans_b else 1) if weight_index == 1 else None
    if node.op_type == "MatMul" and weight_index == 1:
        return ndim - 1
    return None


def weight_config(cfg: StaticInt8 | DynamicInt8) -> StaticInt8:
    """The weight rounding of ``cfg`` as a StaticInt8 (dynamic INT8: signed weights are symmetric in ONNX Runtime)."""
    if isinstance(cfg, DynamicInt8):
        return StaticInt8(per_channel=cfg.per_channel, weight_type=cfg.weight_type,
                          symmetric_weights=cfg.weight_type == "s8")
    return cfg


def _augment(proto: Any, cfg: StaticInt8 | DynamicInt8, ranges: Any, *, diffs: bool = False
             ) -> tuple[Any, list[tuple[str, str, int]]]:
    """The FP32 graph plus, per weight layer, a quantized twin and three energy outputs (and, with
    ``diffs``, the twin's deviation tensor itself, float minus INT8). A DynamicInt8 ``cfg`` quantizes
    each twin's input at run time (DynamicQuantizeLinear), as ONNX Runtime's dynamic INT8 does."""
    onnx = require("onnx", extra="core")
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    del graph.output[:]
    measured: list[tuple[str, str, int]] = []
    new_nodes, new_inits = [], []
    for name, op_type, params in weight_nodes(proto):
        node = next(n for n in proto.graph.node if n.name == name)
        w_index = next((i for i, x in enumerate(node.input[:2]) if x in inits), None)
        a_index = next((i for i, x in enumerate(node.input[:2]) if x and x not in inits), None)
        if w_index is None or a_index is None or not node.output:
            continue
        act = node.input[a_index]
        w = numpy_helper.to_array(inits[node.input[w_index]])
        if w.dtype != np.float32:
            continue
        tag = f"_edgeopt_le{len(measured)}"
        inputs = list(node.input)
        rng = ranges.data.get(act) if ranges is not None else None
        if isinstance(cfg, DynamicInt8):
            new_nodes += [helper.make_node("DynamicQuantizeLinear", [act], [f"{tag}_q", f"{tag}_s", f"{tag}_z"]),
                          helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_a"])]
            inputs[a_index] = f"{tag}_a"
        elif rng is not None:
            lo, hi = float(np.min(rng.range_value[0])), float(np.max(rng.range_value[1]))
            scale, zp, etype = _activation_qparams(lo, hi, cfg)
            new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_s"),
                          helper.make_tensor(f"{tag}_z", etype, [], [zp])]
            new_nodes += [helper.make_node("QuantizeLinear", [act, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
                          helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_a"])]
            inputs[a_index] = f"{tag}_a"
        axis = _channel_axis(node, w_index, w.ndim) if cfg.per_channel else None
        new_inits.append(numpy_helper.from_array(fake_quant_weight(w, axis=axis, cfg=weight_config(cfg)), f"{tag}_w"))
        inputs[w_index] = f"{tag}_w"
        twin = helper.make_node(node.op_type, inputs, [f"{tag}_y"], name=f"{tag}_twin")
        twin.attribute.extend(node.attribute)
        y = node.output[0]
        new_nodes += [twin,
                      helper.make_node("Sub", [y, f"{tag}_y"], [f"{tag}_d"]),
                      helper.make_node("ReduceSumSquare", [f"{tag}_d"], [f"{tag}_err"], keepdims=0),
                      helper.make_node("ReduceSumSquare", [y], [f"{tag}_sig"], keepdims=0),
                      helper.make_node("ReduceSumSquare", [f"{tag}_y"], [f"{tag}_qsig"], keepdims=0)]
        for suffix in ("err", "sig", "qsig"):
            graph.output.append(helper.make_tensor_value_info(f"{tag}_{suffix}", TensorProto.FLOAT, []))
        if diffs:
            graph.output.append(helper.make_tensor_value_info(f"{tag}_d", TensorProto.FLOAT, None))
        measured.append((name, op_type, params))
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return out, measured


def layer_errors(model: Model, calibration: Dataset | None, data: Dataset, *,
                 config: StaticInt8 | DynamicInt8 | None = None, threads: int = 1) -> list[LayerError]:
    """Every weight layer's INT8 output error when it alone is quantized, from one pass over ``data``.

    Args:
        model: an FP32 ONNX model.
        calibration: samples the activation ranges are calibrated on (``config.calibration`` method);
            unused (may be None) with a DynamicInt8 config.
        data: samples the error is measured on, run one at a time (batch 1: per-sample cosine).
        config: the StaticInt8 settings (activation/weight types, per-channel, calibration method),
            or DynamicInt8 (activations quantized per call, as ONNX Runtime's dynamic INT8 does).

    Returns:
        One LayerError per weight layer, worst (lowest SQNR) first. Node names are those of
        :func:`edgeopt.transforms.quantize.prepared`, as ``exclude_nodes`` expects.

    Raises:
        BadInput/UnsupportedOperation as :func:`edgeopt.quantize`; UnsupportedOperation when the
        model has no weight layer.

    Example:
        >>> rows = layer_errors(load_model("cnn.onnx"), cal, held)  # doctest: +SKIP
        >>> rows[0].node, rows[0].sqnr_db
    """
    ort = require("onnxruntime", extra="core")
    cfg = config or StaticInt8()
    check_quantizable(model)
    proto = prepared(model)
    if not weight_nodes(proto):
        raise UnsupportedOperation(f"{model.source} has no Conv, Gemm or MatMul with constant weights to analyze")
    ranges = None if isinstance(cfg, DynamicInt8) else calibration_ranges(model, cfg, calibration)
    augmented, measured = _augment(proto, cfg, ranges)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(augmented.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    err = np.zeros(len(measured))
    sig = np.zeros(len(measured))
    cos_sum = np.zeros(len(measured))
    fitted = data.feeds_for(model)
    n = 0
    for feeds, _ in fitted.batches(1):
        values = np.asarray(session.run(names, feeds), dtype=np.float64).reshape(len(measured), 3)
        e, s, q = values[:, 0], values[:, 1], values[:, 2]
        err += e
        sig += s
        # cos = <y, yq> / |y||yq| with <y, yq> = (|y|^2 + |yq|^2 - |y - yq|^2) / 2
        denom = np.sqrt(s * q)
        cos_sum += np.where(denom > 0, (s + q - e) / 2 / np.maximum(denom, 1e-30), 1.0)
        n += 1
    rows = []
    for i, (name, op_type, params) in enumerate(measured):
        noise = err[i] / sig[i] if sig[i] > 0 else 0.0
        sqnr = -10 * math.log10(noise) if noise > 0 else float("inf")
        rows.append(LayerError(name, op_type, params, sqnr, float(noise), float(cos_sum[i] / max(n, 1))))
    return sorted(rows, key=lambda r: r.sqnr_db)


def own_shifts(model: Model, calibration: Dataset, *, config: StaticInt8 | None = None,
               samples: int = 64) -> dict[str, np.ndarray]:
    """Per-channel mean of (float output - INT8 output) of every weight layer, each quantized alone
    on the *float* input: the systematic shift that layer's own rounding adds (bias correction).

    Returns ``{node name: shift per output channel (axis 1)}`` for Conv/ConvTranspose/Gemm/MatMul
    layers of :func:`prepared` ``(model)``.
    """
    ort = require("onnxruntime", extra="core")
    cfg = config or StaticInt8()
    proto = prepared(model)
    ranges = calibration_ranges(model, cfg, calibration)
    augmented, measured = _augment(proto, cfg, ranges, diffs=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(augmented.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [f"_edgeopt_le{i}_d" for i in range(len(measured))]
    subset = calibration.feeds_for(model)
    if len(subset) > samples:
        subset = subset.take(np.arange(samples))
    sums: list[Any] = [0.0] * len(names)
    counts = [0] * len(names)
    for feeds, _ in subset.batches(8):
        for i, value in enumerate(session.run(names, feeds)):
            v = np.asarray(value, dtype=np.float64)
            v = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1) if v.ndim > 1 else v[None]
            sums[i] = sums[i] + v.sum(axis=1)
            counts[i] += v.shape[1]
    return {name: (sums[i] / max(counts[i], 1)).astype(np.float32) for i, (name, _, _) in enumerate(measured)}
