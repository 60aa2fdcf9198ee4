"""Transformer graphs: recognise them, and fuse them with ONNX Runtime's transformer optimizer.

Quantizers written for CNNs destroy transformers: per-tensor INT8 on the residual stream and on
LayerNorm/Softmax/GELU inputs (a few hidden dimensions carry outliers 100x the rest) loses the
outputs while top-1 "agreement" stays 100 %. So ``quantize --mode auto`` first asks
:func:`is_transformer` and, for those graphs, tries the variants that keep those operators in
float: dynamic INT8 (weights per channel, activations quantized per call), INT8 after ONNX
Runtime's transformer fusions (fused Attention, SkipLayerNormalization, BiasGelu, whose
quantized forms keep Softmax/LayerNorm/GELU in float), static INT8 restricted to MatMul inputs,
NNCF's transformer mode (SmoothQuant), and INT4/INT8 block-wise weight-only MatMuls.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.deps import require
from edgeopt.errors import ConfigError, UnsupportedOperation, first_line
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, register_config, register_transform

LAYER_NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization")


def _constants(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def is_transformer(model: Model) -> bool:
    """True for ONNX graphs with self-attention: a Softmax between two activation-by-activation
    MatMuls (scores = Q K^T, context = P V), plus a layer norm (plain or decomposed into ReduceMean).

    Example:
        >>> is_transformer(load_model("minilm.onnx"))  # doctest: +SKIP
        True
    """
    if model.format != "onnx":
        return False
    proto = model.onnx
    ops = {n.op_type for n in proto.graph.node}
    if "Attention" in ops or "MultiHeadAttention" in ops:
        return True
    if "Softmax" not in ops or not (ops & {*LAYER_NORMS, "ReduceMean"}):
        return False
    consts = set(_constants(proto))
    act_matmuls = sum(1 for n in proto.graph.node if n.op_type == "MatMul" and not (set(n.input) & consts))
    return act_matmuls >= 2


def attention_shape(model: Model) -> tuple[int, int]:
    """(heads, hidden size) of the attention, read from the graph; (0, 0) when not found
    (ONNX Runtime's optimizer then tries its own detection).

    The hidden size is the length of the LayerNorm scale; the head size comes from the constant
    the attention scores are divided by (sqrt(head size)) or multiplied with (1/sqrt(head size)).
    """
    proto = model.onnx
    consts = _constants(proto)
    hidden = 0
    for node in proto.graph.node:
        if node.op_type in LAYER_NORMS:
            scale = next((consts[x] for x in node.input[1:3] if x in consts and consts[x].ndim == 1), None)
            if scale is not None:
                hidden = int(scale.shape[0])
                break
    producer = {out: n for n in proto.graph.node for out in n.output}
    head = 0
    for node in proto.graph.node:
        if node.op_type != "Softmax":
            continue
        cur, seen = producer.get(node.input[0]), 0
        while cur is not None and seen < 4 and not head:
            seen += 1
            scalar = next((float(consts[x]) for x in cur.input if x in consts and consts[x].size == 1), None)
            if cur.op_type in ("Div", "Mul") and scalar:
                dh = scalar ** 2 if cur.op_type == "Div" else 1.0 / scalar ** 2
                if abs(dh - round(dh)) < 1e-3 and round(dh) >= 1:
                    head = int(round(dh))
            cur = next((producer[x] for x in cur.input if x in producer), None)
        if head:
            break
    if not hidden or not head or hidden % head:
        return 0, 0
    return hidden // head, hidden


@register_config
@dataclass(frozen=True)
class TransformerFusion:
    """ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model type
    ``bert``): fuses attention blocks into ``Attention``, Add+LayerNorm into
    ``SkipLayerNormalization``, bias+GELU into ``BiasGelu``, embeddings into
    ``EmbedLayerNormalization``. Fewer, faster kernels; and INT8 of the fused graph quantizes the
    MatMuls inside Attention while Softmax, LayerNorm and GELU stay float.

    Args:
        num_heads, hidden_size: 0 = read them from the graph (:func:`attention_shape`).
        attention: fuse attention blocks (off: their MatMuls stay MatMuls, e.g. for weight-only INT8).
        embeddings: fuse the embedding lookups and their LayerNorm (off: the Gathers stay, so their
            tables can be quantized).
    """

    num_heads: int = 0
    hidden_size: int = 0
    attention: bool = True
    embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("num_heads", "hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"TransformerFusion {name} must be an integer >= 0, got {v!r}")
        for name in ("attention", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TransformerFusion {name} must be true or false, got {getattr(self, name)!r}")


def fuse_transformer(model: Model, config: TransformerFusion | None = None) -> tuple[Model, dict[str, int]]:
    """The model after ONNX Runtime's transformer fusions, and how many of each fused operator.

    Raises:
        UnsupportedOperation: the optimizer fails, or fuses nothing (not a BERT-like graph).
    """
    cfg = config or TransformerFusion()
    optimizer = require("onnxruntime.transformers.optimizer", extra="core")
    fusion_options = require("onnxruntime.transformers.fusion_options", extra="core")
    onnx = require("onnx", extra="core")
    heads, hidden = cfg.num_heads, cfg.hidden_size
    if not heads or not hidden:
        heads, hidden = attention_shape(model)
    from edgeopt.transforms.quantize import _quiet

    with tempfile.TemporaryDirectory(prefix="edgeopt-fuse-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "fused.onnx"
        src.write_bytes(model.serialized())
        try:
            with _quiet():
                options = fusion_options.FusionOptions("bert")
                options.enable_attention = cfg.attention
                options.enable_embed_layer_norm = cfg.embeddings
                fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                                                 opt_level=0, optimization_options=options)
                stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
                fused.save_model_to_file(str(dst))
            proto = onnx.load(str(dst))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the optimizer raises many types
            raise UnsupportedOperation(f"ONNX Runtime's transformer optimizer failed on {model.source}: "
                                       f"{first_line(exc)}") from exc
    if not any(k in stats for k in ("Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu",
                                    "EmbedLayerNormalization")):
        raise UnsupportedOperation(f"ONNX Runtime's transformer optimizer fused nothing in {model.source}")
    out = Model.from_onnx(proto, source=f"{model.source} [fused]")
    return out.with_metadata(fusion=",".join(f"{k}:{v}" for k, v in sorted(stats.items()))), stats


@register_transform(TransformerFusion)
def _apply(model: Model, config: TransformerFusion, ctx: TransformContext) -> Model:
    return fuse_transformer(model, config)[0]
