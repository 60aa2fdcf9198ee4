"""Mixed precision without re-quantizing: chosen layers of a QDQ INT8 model put back to float.

Re-running a quantizer per mixed-precision try costs a calibration pass each time (45 s to a
minute for EfficientNet-Lite1 with NNCF or ONNX Runtime); here the INT8 model is built once and
each try is a graph edit that takes milliseconds. For every named layer (Conv, Gemm, MatMul, ...)
each input that comes through a DequantizeLinear is rewired: an activation to the float tensor
its QuantizeLinear read, a weight or bias to the ORIGINAL float initializer of the same layer in
the FP32 model (not the dequantized INT8 values: the layer is then exactly FP32, and the bias is
the original, not one a quantizer's bias correction moved for INT8 inputs). Quantize/Dequantize
nodes nobody reads any more are dropped. Works on QDQ models from NNCF and ONNX Runtime alike:
both keep the original node names.

Run in OpenVINO, such a model must be compiled with the f32 precision hint: OpenVINO's default on
CPUs with AVX-512 BF16/AMX runs every float layer in BF16, which caps what reverting buys
(measured on EfficientNet-Lite1: all-float under the default hint has cosine 0.9967 to FP32).
"""

from __future__ import annotations

import json
from typing import Any

from edgeopt.deps import require
from edgeopt.errors import BadInput
from edgeopt.model import Model

QDQ = ("QuantizeLinear", "DequantizeLinear")


def revert_to_float(quantized: Model, original: Model, nodes: tuple[str, ...] | list[str]) -> Model:
    """``quantized`` with ``nodes`` computing in float again (inputs, weights and bias as in ``original``).

    Raises:
        BadInput: a node name that is not in both graphs, or ``quantized`` is not an ONNX model.
    """
    onnx = require("onnx", extra="core")
    if quantized.format != "onnx" or original.format != "onnx":
        raise BadInput("float layers can be restored only in ONNX QDQ models")
    proto = onnx.ModelProto()
    proto.CopyFrom(quantized.onnx)
    graph = proto.graph
    by_name = {n.name: n for n in graph.node}
    float_nodes = {n.name: n for n in original.onnx.graph.node}
    missing = [n for n in nodes if n not in by_name or n not in float_nodes]
    if missing:
        raise BadInput(f"layers not found in both the INT8 and the FP32 graph: {missing[:5]}")
    producer = {out: n for n in graph.node for out in n.output}
    initializers = {i.name for i in graph.initializer}
    float_inits = {i.name: i for i in original.onnx.graph.initializer}

    def float_copy(name: str) -> str:
        new = f"{name}__float"
        if new not in initializers:
            init = onnx.TensorProto()
            init.CopyFrom(float_inits[name])
            init.name = new
            graph.initializer.append(init)
            initializers.add(new)
        return new

    for name in nodes:
        node, ref = by_name[name], float_nodes[name]
        for i, tensor in enumerate(node.input):
            if i >= len(ref.input) or not tensor:
                continue
            source = producer.get(tensor)
            if ref.input[i] in float_inits and (source is None or source.op_type in QDQ):
                node.input[i] = float_copy(ref.input[i])  # weight or bias: the original values
            elif source is not None and source.op_type == "DequantizeLinear":
                quant = producer.get(source.input[0])
                if quant is not None and quant.op_type == "QuantizeLinear":
                    # activation: the float tensor before Q/DQ, with any Relu/Clip the quantizer
                    # folded into the Q range put back (ONNX Runtime drops them: u8 with zero point
                    # 0 clamps at 0 by itself)
                    node.input[i] = _float_activation(graph, ref.input[i], quant.input[0], original.onnx.graph,
                                                      producer, initializers, float_inits) or tensor
        _float_graph_output(graph, node)
    _prune(graph)
    _topological(graph)
    out = Model.from_onnx(proto, source=f"{quantized.source} [{len(nodes)} float]")
    meta: dict[str, Any] = {"float_layers": ",".join(nodes)}
    if quantized.metadata.get("edgeopt.runtime") == "openvino":
        options = json.loads(quantized.metadata.get("edgeopt.runtime_options") or "{}")
        meta["runtime_options"] = json.dumps({**options, "precision": "f32"}, sort_keys=True)
    return out.with_metadata(**meta)


def compressed_layers(quantized: Model) -> list[str]:
    """The MatMul/Gemm nodes whose weight comes through a DequantizeLinear (INT8 weights), in graph order."""
    graph = quantized.onnx.graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in dequantized]


def revert_losses(quantized: Model, original: Model, data: Any, expected: Any, *,
                  threads: int | None = None) -> dict[str, float]:
    """For each of :func:`compressed_layers`, what ``quantized`` still loses with that layer alone back in
    float: 1 - the mean cosine to ``expected`` (the reference outputs on ``data``; of the pooled embeddings
    for a text encoder). The lower, the more reverting that layer buys: a ranking measured on the model
    itself, one graph edit and one run of ``data`` per layer."""
    from edgeopt.measure import evaluate

    losses = {}
    for name in compressed_layers(quantized):
        ev = evaluate(revert_to_float(quantized, original, [name]), data, reference=expected, threads=threads)
        losses[name] = 1.0 - (ev.embedding_cosine if ev.embedding_cosine is not None else ev.cosine)
    return losses


FOLDABLE = ("Relu", "Clip")


def _float_activation(graph: Any, wanted: str, available: str, float_graph: Any, producer: dict[str, Any],
                      initializers: set[str], float_inits: dict[str, Any]) -> str | None:
    """A tensor in ``graph`` holding the layer's float input (``wanted`` in the FP32 graph).

    ``available`` is what the QuantizeLinear read. When the node producing it is the one that
    produces ``wanted`` in the FP32 graph (same node name), it is that input. Otherwise the
    Relu/Clip between them was folded into the quantizer (ONNX Runtime drops them and may give
    the layer before the folded op's output name); the folded ops are copied back under new
    names. None when the two are not joined by such ops (the caller keeps the quantized input).
    """
    float_producer = {out: n for n in float_graph.node for out in n.output}
    have = producer.get(available)
    have_name = have.name if have is not None else None
    chain, tensor = [], wanted
    while True:
        op = float_producer.get(tensor)
        if (op.name if op is not None else None) == have_name and (op is not None or tensor == available):
            break
        if op is None or op.op_type not in FOLDABLE or len(chain) >= 3:
            return None
        chain.append(op)
        tensor = op.input[0]
    current = available
    for op in reversed(chain):
        for extra in op.input[1:]:
            if extra and extra not in initializers and extra in float_inits:
                init = float_inits[extra].__class__()
                init.CopyFrom(float_inits[extra])
                graph.initializer.append(init)
                initializers.add(extra)
        copy = graph.node.add()
        copy.CopyFrom(op)
        copy.name = f"{op.name or op.op_type}__float"
        copy.input[0] = current
        del copy.output[1:]
        copy.output[0] = current = f"{op.output[0]}__float"
        producer[current] = copy
    return current


def _float_graph_output(graph: Any, node: Any) -> None:
    """A float layer whose output is the model's output through Q/DQ alone gives it unquantized."""
    outputs = {o.name for o in graph.output}
    for j, tensor in enumerate(node.output):
        readers = [n for n in graph.node if tensor in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        quant = readers[0]
        deq = [n for n in graph.node if quant.output[0] in n.input]
        if len(deq) == 1 and deq[0].op_type == "DequantizeLinear" and deq[0].output[0] in outputs:
            node.output[j] = deq[0].output[0]
            graph.node.remove(quant)
            graph.node.remove(deq[0])


def _topological(graph: Any) -> None:
    """Nodes re-ordered so each comes after the nodes it reads (copied Relu/Clip were appended)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(t in known for t in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest in their order
            ordered += pending
            break
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _prune(graph: Any) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {t for n in graph.node for t in n.input}
    keep = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
