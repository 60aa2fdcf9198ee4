"""Hessian-aware rounding of the INT8 weights in a QDQ model (GPTQ/OBQ-style), scales kept.

Round-to-nearest makes each weight's error as small as it can be on its own, but what matters
is the layer's OUTPUT error on real inputs, ``E||(W - Q) x||^2 = sum_rows (w - q) H (w - q)^T``
with ``H = E[x x^T]`` (Frantar et al., "GPTQ", 2022; "Optimal Brain Compression", 2022; the same
objective AdaRound optimises by gradient descent). Rounding one input column at a time and
spreading its rounding error over the columns not yet rounded, weighted by ``H``'s inverse,
solves it greedily in closed form: no training, numpy only (35-50 s for EfficientNet-Lite1 on
a loaded 2-core machine, most of it collecting ``H``).

Measured on EfficientNet-Lite1 (NNCF's INT8 in OpenVINO, f32 hint, 16 calibration crops for ``H``,
300 crops never used to build or judge; benchmarks/cnn_float_layers_sweep.py): all-INT8 cosine to
FP32 0.9847 -> 0.9882; INT8 weights with float activations 0.9921 -> 0.9961; with the same 8 layers
put back to FP32 0.9934 -> 0.9952 (the float layers alone plateau at 0.993 from 2 to 32 layers: the
error they leave is the weights' rounding spread over every layer, which this removes).

The model keeps its quantizers: each weight stays on its layer's own grid (same scales and
zero points, the integer range the quantizer used, e.g. NNCF's 7-bit first layer), so the
runtime runs the same INT8 kernels at the same speed; only which grid point each weight takes
changes. Biases are left alone (a quantizer's bias correction stays valid for the activation
part). ``H`` comes from the FP32 model's inputs to each layer. Tried on Lite1 and left out: ``H``
from the INT8 model's own (quantized) inputs (all-INT8 cosine 0.9818, worse than plain), fitting
each layer to undo its upstream layers' error by least squares (every layer undoes the same error:
cosine 0.45-0.53), and moving biases by the mean change (0.9821).
Handled: Conv (any kernel, stride, padding; group 1 or depthwise), Gemm with transB=1, and MatMul
with a 2-D ``[in, out]`` weight per output channel (NNCF's INT8 weight compression of transformers; a
text model's padding tokens, where ``attention_mask`` is 0, are left out of ``H``). Measured on
all-MiniLM-L6-v2 (NNCF INT8_ASYM weights, OpenVINO, 434 real sentences,
benchmarks/quantize_transformer.py): weights alone, float activations, embedding cosine 0.99969 -> 0.99989;
after SmoothQuant 0.5 with run-time activation groups of 32, 0.99969 -> 0.99982.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, ConfigError, DataError
from edgeopt.model import Model


@dataclass(frozen=True)
class WeightRounding:
    """Settings of :func:`round_weights`.

    Args:
        samples: calibration samples whose layer inputs build each ``H`` (more: steadier, slower).
        damp: added to ``H``'s diagonal as a share of its mean (keeps the inverse stable when
            inputs are correlated or few).
    """

    samples: int = 16
    damp: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"WeightRounding samples must be an integer >= 1, got {self.samples!r}")
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"WeightRounding damp must be between 0 and 1, got {self.damp!r}")


@dataclass
class _Layer:
    name: str
    float_input: str  # the layer's input tensor in the FP32 graph
    kind: str  # "conv", "depthwise", "gemm" or "matmul" (weight stored [in, out]; ``weight`` is its transpose)
    attrs: dict[str, Any]
    weight: np.ndarray  # FP32 weight
    q_name: str  # the INT8 initializer the DequantizeLinear reads
    scale: np.ndarray
    zero: np.ndarray


def round_weights(quantized: Model, original: Model, data: Dataset, config: WeightRounding | None = None) -> Model:
    """``quantized`` with each INT8 Conv/Gemm/MatMul weight re-rounded to minimise its layer's output error.

    Args:
        quantized: a QDQ INT8 ONNX model (NNCF's or ONNX Runtime's) whose weights are INT8
            initializers read by a DequantizeLinear; node names as in ``original``.
        original: the FP32 model it was quantized from (the weights to round, the inputs for ``H``).
        data: calibration samples (the first ``config.samples`` are used).

    Returns:
        A new Model, same graph, metadata and quantizer scales; ``weight_rounding`` metadata
        says how many layers were re-rounded.

    Raises:
        BadInput: not ONNX models, or no INT8 weight layer shared by the two graphs.
        DataError: no calibration samples.

    Example:
        >>> better = round_weights(int8, fp32, calibration)  # doctest: +SKIP
    """
    onnx = require("onnx", extra="core")
    from onnx import numpy_helper

    cfg = config or WeightRounding()
    if quantized.format != "onnx" or original.format != "onnx":
        raise BadInput("weight rounding works on ONNX QDQ models")
    fitted = data.feeds_for(original)
    if len(fitted) == 0:
        raise DataError(f"{data.source} is empty: weight rounding needs calibration samples")
    proto = onnx.ModelProto()
    proto.CopyFrom(quantized.onnx)
    layers = _layers(proto, original.onnx)
    if not layers:
        raise BadInput(f"{quantized.source} has no INT8 Conv/Gemm/MatMul weights (DequantizeLinear of an INT8 "
                       "initializer) whose layer is also in the FP32 graph")
    hessians = _hessians(original, layers, fitted.take(np.arange(min(len(fitted), cfg.samples))))
    inits = {i.name: i for i in proto.graph.initializer}
    for layer in layers:
        q_old = numpy_helper.to_array(inits[layer.q_name])
        if layer.kind == "matmul":  # rounded as [out, in] rows like a Gemm, stored back as [in, out]
            q_new = _round_layer(layer, hessians[layer.name], q_old.T, cfg.damp).T
        else:
            q_new = _round_layer(layer, hessians[layer.name], q_old, cfg.damp)
        inits[layer.q_name].CopyFrom(numpy_helper.from_array(q_new.astype(q_old.dtype), layer.q_name))
    out = Model.from_onnx(proto, source=f"{quantized.source} [weights rounded]")
    return out.with_metadata(weight_rounding=f"hessian-{len(layers)}-layers")


def _layers(proto: Any, float_proto: Any) -> list[_Layer]:
    from onnx import TensorProto, helper, numpy_helper

    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    float_nodes = {n.name: n for n in float_proto.graph.node}
    float_inits = {i.name: i for i in float_proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        ref = float_nodes.get(node.name)
        if node.op_type not in ("Conv", "Gemm", "MatMul") or ref is None or ref.op_type != node.op_type or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or ref.input[1] not in float_inits:
            continue
        q = inits[dq.input[0]]
        if q.data_type not in (TensorProto.INT8, TensorProto.UINT8):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(float_inits[ref.input[1]]).astype(np.float64)
        if node.op_type == "MatMul":
            if weight.ndim != 2 or len(q.dims) != 2:
                continue
            kind = "matmul"
        elif node.op_type == "Gemm":
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
                continue
            kind = "gemm"
        else:
            group = int(attrs.get("group", 1))
            if group == 1:
                kind = "conv"
            elif group == weight.shape[0] and weight.shape[1] == 1:
                kind = "depthwise"
            else:
                continue
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(d != 1 for d in attrs.get(
                    "dilations", [1])) or weight.ndim != 4:
                continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64) if dq.input[1] in inits else None
        zero = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
                if len(dq.input) > 2 and dq.input[2] in inits else np.zeros(1))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % max(len(q.dims), 1)  # NNCF writes -2
        if kind == "matmul":  # [in, out], scales along out (axis 1): as a Gemm's [out, in] rows
            if scale is None or (scale.size > 1 and (axis != 1 or scale.size != weight.shape[1])):
                continue
            weight = weight.T
        elif scale is None or (scale.size > 1 and (axis != 0 or scale.size != weight.shape[0])):
            continue
        out.append(_Layer(node.name, ref.input[0], kind, attrs, weight, dq.input[0], scale, zero))
    return out


def _columns(x: np.ndarray, layer: _Layer) -> np.ndarray:
    """One sample's layer input (C, H, W) as the vectors each output sees: (C*kh*kw, L) for a
    dense conv, (C, kh*kw, L) for a depthwise one."""
    kh, kw = layer.attrs.get("kernel_shape", layer.weight.shape[2:])
    sh, sw = layer.attrs.get("strides", [1, 1])
    pads = layer.attrs.get("pads", [0, 0, 0, 0])
    c = x.shape[0]
    if kh == kw == 1 and sh == sw == 1 and not any(pads):
        flat = x.reshape(c, -1)
        return flat[:, None, :] if layer.kind == "depthwise" else flat
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    cols = windows.transpose(0, 3, 4, 1, 2).reshape(c, kh * kw, -1)
    return cols if layer.kind == "depthwise" else cols.reshape(c * kh * kw, -1)


def _hessians(original: Model, layers: list[_Layer], data: Dataset) -> dict[str, np.ndarray]:
    """``E[x x^T]`` of every layer's FP32 input over the samples (one forward pass each):
    (d, d) for dense layers, (C, k*k, k*k) for depthwise ones. A MatMul sees each token of its
    ``[batch, seq, d]`` input; the padding tokens of a text model (``attention_mask`` 0) are left
    out: their outputs are masked away, so their error does not matter."""
    onnx = require("onnx", extra="core")
    ort = require("onnxruntime", extra="core")
    proto = onnx.ModelProto()
    proto.CopyFrom(original.onnx)
    have = {o.name for o in proto.graph.output}
    for tensor in dict.fromkeys(layer.float_input for layer in layers):
        if tensor not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # a smoothed model's unused LayerNorm initializers would each print a warning
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    distinct = {_hessian_key(layer): layer for layer in layers}  # layers that share an H build it once
    sums: dict[Any, np.ndarray] = {}
    counts: dict[Any, int] = {}
    for inputs, _ in data.batches(1):
        values = dict(zip(names, session.run(None, inputs), strict=True))
        for key, layer in distinct.items():
            x = np.asarray(values[layer.float_input], np.float32)
            if layer.kind == "matmul":
                cols = _tokens(x, inputs).T  # (d, tokens)
                h = cols @ cols.T
            elif layer.kind == "gemm":
                cols = x.reshape(len(x), -1).T  # (d, batch)
                h = cols @ cols.T
            else:
                cols = _columns(x[0], layer)
                h = cols @ cols.T if layer.kind == "conv" else np.matmul(cols, cols.transpose(0, 2, 1))
            sums[key] = sums.get(key, 0) + h.astype(np.float64)
            counts[key] = counts.get(key, 0) + cols.shape[-1]
    h_of = {key: sums[key] / counts[key] for key in sums}
    return {layer.name: h_of[_hessian_key(layer)] for layer in layers}


def _hessian_key(layer: _Layer) -> Any:
    """What a layer's ``H`` depends on: a dense layer's only on its input tensor (a transformer's Q, K and V
    MatMuls share one), a convolution's also on its kernel, stride and padding."""
    return (layer.float_input, layer.kind) if layer.kind in ("matmul", "gemm") else layer.name


def _tokens(x: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """A MatMul input's rows (tokens x d), without the padding tokens when the data's mask fits."""
    from edgeopt.measure.judge import token_mask

    mask = token_mask(x, inputs)
    return (x[mask] if mask is not None else x).reshape(-1, x.shape[-1])


def _round_layer(layer: _Layer, h: np.ndarray, q_old: np.ndarray, damp: float) -> np.ndarray:
    """The layer's integer weights by greedy column-wise rounding with error feedback."""
    out_ch = layer.weight.shape[0]
    shape = [-1] + [1] * (layer.weight.ndim - 1)
    scale = np.broadcast_to(layer.scale.reshape(shape) if layer.scale.size > 1 else layer.scale.reshape(()),
                            (out_ch,) + (1,) * (layer.weight.ndim - 1)).reshape(out_ch)
    zero = np.broadcast_to(layer.zero.reshape(-1) if layer.zero.size > 1 else layer.zero.reshape(()), (out_ch,))
    lo, hi = float(q_old.min()), float(q_old.max())  # the quantizer's own integer range
    if layer.kind == "depthwise":  # one row per channel, each with its own H
        w = layer.weight.reshape(out_ch, 1, -1)
        s, z, hs = scale.reshape(out_ch, 1), zero.reshape(out_ch, 1), h
    else:
        w = layer.weight.reshape(1, out_ch, -1)
        s, z, hs = scale.reshape(1, out_ch), zero.reshape(1, out_ch), h[None]
    q = _gptq(w, s, z, hs, lo, hi, damp)
    return q.reshape(q_old.shape)


def _gptq(w: np.ndarray, s: np.ndarray, z: np.ndarray, h: np.ndarray, lo: float, hi: float,
          damp: float) -> np.ndarray:
    """Greedy column-wise rounding of ``w`` (G, rows, d) on the grid ``s * (q - z)``, q in [lo, hi],
    minimising ``(w - dq) H (w - dq)^T`` per row, ``h`` (G, d, d). Returns the integers q."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    d = w.shape[2]
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0  # inputs that never fire: their weights do not matter, round them alone
    g_idx, i_idx = np.nonzero(dead)
    h[g_idx, i_idx, i_idx] = 1.0
    h += damp * np.maximum(diag.mean(axis=1), 1e-12)[:, None, None] * np.eye(d)[None]
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # H^-1 = U^T U
    q = np.empty_like(w)
    safe = np.where(s == 0, 1.0, s)
    for i in range(d):
        col = w[:, :, i]
        qi = np.clip(np.round(col / safe) + z, lo, hi)
        q[:, :, i] = qi
        err = (col - (qi - z) * s) / upper[:, i, i][:, None]
        w[:, :, i + 1:] -= err[:, :, None] * upper[:, i, i + 1:][:, None, :]
    return q
