"""SmoothQuant for ONNX: move activation outliers into the weights before INT8.

Transformer activations (LayerNorm and GELU outputs) have a few channels 10-100x larger than
the rest; per-tensor INT8 of such an activation spends its 256 levels on the outliers and
rounds every other channel to a handful of values. SmoothQuant (Xiao et al., 2023) divides each
input channel j of a MatMul by s_j = max|x_j|^alpha / max|W_j|^(1-alpha) and multiplies row j of
the weight by s_j: the product is unchanged in float, and both factors quantize well. Here the
division is an explicit ``Mul`` in front of the MatMuls that read the activation (the residual
path keeps the original tensor), so the graph stays exactly equivalent in float and any INT8
quantizer can follow (``DynamicInt8``, ``StaticInt8``). ``alpha`` trades activation against
weight difficulty; ``quantize --mode auto`` builds a few and judges them on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, ConfigError, UnsupportedOperation
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, register_config, register_transform


@register_config
@dataclass(frozen=True)
class SmoothQuant:
    """Per-channel smoothing of MatMul inputs (float-equivalent), to follow with INT8 quantization.

    Args:
        alpha: migration strength in [0, 1]: 0 leaves activations as they are, 1 moves all of
            their range into the weights. 0.5-0.85 suits BERT-style encoders.
        samples: calibration samples used to measure each channel's largest magnitude.
    """

    alpha: float = 0.7
    samples: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"SmoothQuant samples must be an integer >= 1, got {self.samples!r}")


def _targets(proto: Any) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Activation name -> (node index, weight) of the MatMuls reading it with a constant 2-D weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    found: dict[str, list[tuple[int, np.ndarray]]] = {}
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[0] in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim == 2 and w.dtype == np.float32:
            found.setdefault(node.input[0], []).append((index, w))
    return found


def channel_absmax(model: Model, data: Dataset, names: dict[str, int], *, samples: int = 64,
                   threads: int = 1) -> dict[str, np.ndarray]:
    """Largest |value| of each channel (last axis, of size ``names[name]``) of the named tensors over ``data``."""
    onnx = require("onnx", extra="core")
    ort = require("onnxruntime", extra="core")
    from onnx import TensorProto, helper, numpy_helper

    aug = onnx.ModelProto()
    aug.CopyFrom(model.onnx)
    opset = next((o.version for o in aug.opset_import if o.domain in ("", "ai.onnx")), 13)
    zero = numpy_helper.from_array(np.array([0], np.int64), "_edgeopt_sq_axis0")
    aug.graph.initializer.append(zero)
    del aug.graph.output[:]
    for i, (name, k) in enumerate(names.items()):
        tag = f"_edgeopt_sq{i}"
        aug.graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{tag}_shape"))
        reduce = (helper.make_node("ReduceMax", [f"{tag}_abs", zero.name], [f"{tag}_max"], keepdims=0)
                  if opset >= 18 else
                  helper.make_node("ReduceMax", [f"{tag}_abs"], [f"{tag}_max"], axes=[0], keepdims=0))
        aug.graph.node.extend([helper.make_node("Reshape", [name, f"{tag}_shape"], [f"{tag}_2d"]),
                               helper.make_node("Abs", [f"{tag}_2d"], [f"{tag}_abs"]), reduce])
        aug.graph.output.append(helper.make_tensor_value_info(f"{tag}_max", TensorProto.FLOAT, [k]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(aug.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fitted = data.feeds_for(model)
    if len(fitted) > samples:
        fitted = fitted.take(np.sort(np.random.default_rng(0).permutation(len(fitted))[:samples]))
    result = {name: np.zeros(k, np.float32) for name, k in names.items()}
    for feeds, _ in fitted.batches(16):
        for name, value in zip(names, session.run(None, feeds), strict=True):
            result[name] = np.maximum(result[name], value)
    return result


def smooth_quant(model: Model, config: SmoothQuant | None = None, *, data: Dataset) -> Model:
    """The float-equivalent model with each MatMul input divided by its SmoothQuant factors.

    Raises:
        BadInput: a non-ONNX model.
        UnsupportedOperation: no MatMul with a constant 2-D weight to smooth.
    """
    cfg = config or SmoothQuant()
    if model.format != "onnx":
        raise BadInput(f"SmoothQuant works on ONNX models; {model.source} is {model.format}")
    onnx = require("onnx", extra="core")
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    targets = _targets(proto)
    if not targets:
        raise UnsupportedOperation(f"{model.source} has no MatMul with a constant 2-D weight to smooth")
    amax = channel_absmax(model, data, {a: users[0][1].shape[0] for a, users in targets.items()},
                          samples=cfg.samples)
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    inserts: list[tuple[int, Any]] = []
    for i, (act, users) in enumerate(targets.items()):
        wmax = np.max(np.stack([np.abs(w).max(axis=1) for _, w in users]), axis=0)
        a = amax[act]
        scale = np.where((a > 0) & (wmax > 0),
                         np.maximum(a, 1e-8) ** cfg.alpha / np.maximum(wmax, 1e-8) ** (1 - cfg.alpha), 1.0)
        scale = np.clip(scale, 1e-4, 1e4).astype(np.float32)
        tag = f"edgeopt_smooth_{i}"
        proto.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{tag}_inv"))
        mul = helper.make_node("Mul", [act, f"{tag}_inv"], [f"{tag}_out"], name=f"{tag}_mul")
        for index, w in users:
            node = nodes[index]
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32),
                                                                  node.input[1]))
            node.input[0] = f"{tag}_out"
        inserts.append((min(index for index, _ in users), mul))
    for index, mul in sorted(inserts, key=lambda t: t[0], reverse=True):
        nodes.insert(index, mul)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    out = Model.from_onnx(proto, source=f"{model.source} [smoothquant a={cfg.alpha:g}]")
    return out.with_metadata(smoothquant=f"alpha={cfg.alpha:g},matmul_inputs={len(targets)}")


@register_transform(SmoothQuant)
def _apply(model: Model, config: SmoothQuant, ctx: TransformContext) -> Model:
    if ctx.calibration is None:
        raise BadInput("SmoothQuant needs calibration data and the recipe was given none")
    return smooth_quant(model, config, data=ctx.calibration)
