"""Where an ONNX graph can be cut: the tensors that cross each position between two nodes.

ONNX stores nodes in topological order, so "cut after node i" splits the graph into nodes
``0..i`` and ``i+1..``. The tensors crossing that cut are the ones produced at or before ``i``
(or graph inputs) that a later node or a graph output still needs. In a plain chain one tensor
crosses every cut; a residual branch (ResNet) keeps its block input alive until the ``Add``, so
every position inside the block needs two tensors. edgeopt sends one tensor per link, so only
single-tensor cuts are valid; tensors computable from weights alone (``Constant`` nodes, shape
arithmetic on initializers) never count, because a stage recomputes them from its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.errors import BadInput, ModelError, first_line

if TYPE_CHECKING:
    import onnx

_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


@dataclass(frozen=True)
class CutPoint:
    """A position after node ``index`` and the tensors that cross it.

    ``bytes`` is the size of one sample of the crossing tensors (batch 1), or ``None`` when a
    dimension other than the batch is unknown.
    """

    index: int
    node: str
    tensors: tuple[str, ...]
    bytes: int | None
    shapes: tuple[tuple[int | str | None, ...], ...]

    @property
    def valid(self) -> bool:
        return len(self.tensors) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"after_node": self.index, "node": self.node, "tensors": list(self.tensors),
                "bytes": self.bytes, "shapes": [list(s) for s in self.shapes]}


class GraphCuts:
    """Every cut position of one ONNX model, with the crossing tensors and their sizes.

    Example:
        >>> cuts = GraphCuts(load_model("resnet18.onnx").onnx)  # doctest: +SKIP
        >>> [c.index for c in cuts.valid()][:3]
        [0, 1, 2]
    """

    def __init__(self, proto: onnx.ModelProto) -> None:
        import onnx

        try:
            self.proto = onnx.shape_inference.infer_shapes(proto)
        except Exception as exc:  # onnx raises several inference error types
            raise ModelError(f"cannot infer tensor shapes to plan cuts: {first_line(exc)}") from exc
        graph = self.proto.graph
        self.nodes = list(graph.node)
        if not self.nodes:
            raise ModelError("the ONNX graph has no nodes; nothing to split")
        self.input_names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        self.output_names = [o.name for o in graph.output]
        self._types = _value_types(self.proto)
        self._constant = _constant_tensors(self.proto)
        self.cuts = self._crossings()

    def _crossings(self) -> list[CutPoint]:
        n = len(self.nodes)
        produced_at: dict[str, int] = {name: -1 for name in self.input_names}
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name in produced_at:
                    last_use[name] = i
            for name in node.output:
                if name:
                    produced_at[name] = i
        for name in self.output_names:
            last_use[name] = n  # graph outputs are needed after the last node
        # a tensor crosses cut i when produced_at <= i < last_use
        cuts = []
        live: list[tuple[int, int, str]] = sorted(
            (p, last_use[t], t) for t, p in produced_at.items() if t in last_use and t not in self._constant)
        for i in range(n - 1):
            crossing = tuple(t for p, u, t in live if p <= i < u)
            shapes = tuple(self.shape(t) for t in crossing)
            cuts.append(CutPoint(index=i, node=self.nodes[i].name or f"{self.nodes[i].op_type}_{i}",
                                 tensors=crossing, bytes=self._bytes(crossing), shapes=shapes))
        return cuts

    def shape(self, tensor: str) -> tuple[int | str | None, ...]:
        return self._types.get(tensor, (0, ()))[1]

    def dtype(self, tensor: str) -> int:
        return self._types.get(tensor, (0, ()))[0]

    def _bytes(self, tensors: tuple[str, ...]) -> int | None:
        total = 0
        for t in tensors:
            elem, shape = self._types.get(t, (0, ()))
            if elem not in _ITEMSIZE or not shape and t not in self._types:
                return None
            count = 1
            for axis, d in enumerate(shape):
                if isinstance(d, int) and d > 0:
                    count *= d
                elif axis != 0:
                    return None  # only the batch dimension may be symbolic
            total += count * _ITEMSIZE[elem]
        return total

    def valid(self) -> list[CutPoint]:
        """Cuts crossed by exactly one tensor of known size: the positions the planner may use."""
        return [c for c in self.cuts if c.valid and c.bytes is not None]

    def check(self, indices: list[int]) -> list[CutPoint]:
        """The cuts at ``indices`` (node positions), or BadInput naming the first one that cannot work."""
        if list(indices) != sorted(set(indices)):
            raise BadInput(f"--cuts must be strictly increasing node positions, got {indices}")
        out = []
        for i in indices:
            if not 0 <= i < len(self.cuts):
                raise BadInput(f"cut after node {i} is outside the graph: it has {len(self.nodes)} nodes, "
                               f"so cuts go after nodes 0..{len(self.nodes) - 2}")
            cut = self.cuts[i]
            if len(cut.tensors) != 1:
                raise BadInput(
                    f"cut after node {i} ({cut.node}) needs {len(cut.tensors)} tensors "
                    f"({', '.join(cut.tensors[:4])}{', ...' if len(cut.tensors) > 4 else ''}); only "
                    f"single-tensor cuts are supported; valid cuts: {_ranges([c.index for c in self.valid()])}")
            if cut.bytes is None:
                raise BadInput(f"cut after node {i} ({cut.node}): the size of tensor {cut.tensors[0]} is unknown "
                               "(a non-batch dimension is dynamic); pick another cut")
            out.append(cut)
        return out


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: a readable list of valid positions."""
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _value_types(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | str | None, ...]]]:
    out: dict[str, tuple[int, tuple[int | str | None, ...]]] = {}
    graph = proto.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in ttype.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
        out[value.name] = (ttype.elem_type, tuple(dims))
    return out


def _constant_tensors(proto: onnx.ModelProto) -> set[str]:
    """Tensors computable from initializers and Constant nodes alone (no graph input reaches them)."""
    const = {t.name for t in proto.graph.initializer}
    const.add("")
    for node in proto.graph.node:
        if _has_subgraph(node):
            continue
        if node.op_type == "Constant" or (node.input and all(name in const for name in node.input)):
            const.update(node.output)
    const.discard("")
    return const


def _has_subgraph(node: Any) -> bool:
    return any(attr.type in (5, 10) for attr in node.attribute)  # GRAPH, GRAPHS


def sample_bytes(tensor: np.ndarray) -> int:
    """Bytes of one sample (the first axis is the batch)."""
    return int(tensor.nbytes // max(1, tensor.shape[0])) if tensor.ndim else int(tensor.nbytes)
