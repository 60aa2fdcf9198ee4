"""PyTorch (or ONNX) -> ExecuTorch ``.pte`` with the XNNPACK delegate, optionally INT8, verified.

The field's own path: ``torch.export`` captures the graph, ``to_edge_transform_and_lower`` hands
every subgraph XNNPACK can run to the XNNPACK delegate, and the rest stays on ExecuTorch's portable
kernels (correct, but plain C++ loops: a fallback that is easy not to notice). INT8 is PT2E
post-training quantization with XNNPACK's quantizer (symmetric INT8 weights, per channel by default,
and INT8 activations), calibrated on the user's data.

Every export reports how much of the graph the delegate took (``Delegation``: node counts and the
op names left on portable kernels) and runs the ``.pte`` in ``executorch.runtime`` against the
source model: cosine below the floor (0.999 FP32, 0.98 INT8) is an error, not a file.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, UnsupportedOperation, first_line
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, register_config, register_transform
from edgeopt.transforms.export import ConverterCheck, check_converter_fields, compare_converted, torch_outputs

QUANTIZE_MODES = ("none", "int8")
DEFAULT_MIN_COSINE = {"none": 0.999, "int8": 0.98}
_SKIP_TARGETS = ("getitem",)
_EDGE_OP = re.compile(r"<EdgeOpOverload: ([^>]+)>")


@register_config
@dataclass(frozen=True)
class ExecutorchExport:
    """Export to an ExecuTorch ``.pte`` (XNNPACK delegate); ``quantize`` is none | int8 (needs data).

    ``per_channel`` quantizes weights per output channel (INT8 only); ``min_cosine`` None uses
    :data:`DEFAULT_MIN_COSINE`; ``calibration_samples`` caps the calibration set; ``verify_samples``
    inputs are compared with the source model.
    """

    quantize: str = "none"
    per_channel: bool = True
    min_cosine: float | None = None
    calibration_samples: int = 128
    verify_samples: int = 16

    def __post_init__(self) -> None:
        check_converter_fields(self, modes=QUANTIZE_MODES, flag="--quantize for executorch")

    @property
    def cosine_floor(self) -> float:
        return DEFAULT_MIN_COSINE[self.quantize] if self.min_cosine is None else self.min_cosine


@dataclass
class Delegation:
    """How the lowered graph splits between the XNNPACK delegate and ExecuTorch's portable kernels.

    ``delegated_ops`` / ``portable_ops`` count nodes by op name (e.g. ``aten.convolution.default``);
    ``portable_nodes`` names each node left on portable kernels, so a user can find it in the model.
    """

    subgraphs: int
    delegated: list[tuple[str, str]] = field(default_factory=list)  # (node name, op name) inside XNNPACK
    portable_nodes: list[tuple[str, str]] = field(default_factory=list)  # (node name, op name) outside

    @property
    def delegated_nodes(self) -> int:
        return len(self.delegated)

    @property
    def delegated_ops(self) -> dict[str, int]:
        return dict(Counter(op for _, op in self.delegated))

    @property
    def portable_ops(self) -> dict[str, int]:
        return dict(Counter(op for _, op in self.portable_nodes))

    @property
    def fully_delegated(self) -> bool:
        return not self.portable_nodes

    def to_dict(self) -> dict[str, Any]:
        return {"delegate": "XnnpackBackend", "delegated_subgraphs": self.subgraphs,
                "delegated_nodes": self.delegated_nodes, "portable_nodes": len(self.portable_nodes),
                "delegated_ops": dict(sorted(self.delegated_ops.items())),
                "portable_ops": dict(sorted(self.portable_ops.items())),
                "portable_node_names": [{"node": n, "op": op} for n, op in self.portable_nodes]}


@dataclass
class ExecutorchCheck(ConverterCheck):
    """How the ``.pte``'s outputs in ``executorch.runtime`` compare with the source model's."""

    delegation: Delegation

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "delegation": self.delegation.to_dict()}


# -- the steps, usable on their own (edgeopt check lowers without verifying) ---------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export / ExecuTorch log deprecation chatter and C++ cpuinfo probes; none is a user problem."""
    loggers = [logging.getLogger(n) for n in ("torch", "executorch", "torchao", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def capture(module: Any, args: tuple[Any, ...], source: str) -> Any:
    """``torch.export.export`` with its failure turned into one line naming what it could not trace."""
    torch = require("torch", extra="torch")
    try:
        with quiet():
            return torch.export.export(module, args, strict=False)
    except Exception as exc:
        raise UnsupportedOperation(f"torch.export cannot capture {source}: {first_line(exc)}") from exc


def quantize_pt2e(module: Any, args: tuple[Any, ...], calibration: list[tuple[Any, ...]], *,
                  per_channel: bool, source: str) -> Any:
    """PT2E post-training INT8 with XNNPACK's quantizer; returns the re-exported quantized program."""
    torch = require("torch", extra="torch")
    require("executorch", extra="executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = capture(module, args, source).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    try:
        with quiet():
            prepared = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for sample in calibration:
                    prepared(*sample)
            converted = convert_pt2e(prepared)
    except Exception as exc:
        raise UnsupportedOperation(f"XNNPACK INT8 quantization of {source} failed: {first_line(exc)}") from exc
    return capture(converted, args, source)


def lower(program: Any, source: str) -> tuple[Any, Delegation]:
    """Lower an ExportedProgram with the XNNPACK partitioner; the edge program and its :class:`Delegation`."""
    require("executorch", extra="executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with quiet():
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    except Exception as exc:
        raise UnsupportedOperation(f"ExecuTorch lowering of {source} failed: {first_line(exc)}") from exc
    return edge, delegation_of(edge.exported_program().graph_module)


def _op_name(target: Any) -> str:
    """``aten.convolution.default`` for an edge or aten op overload, the callable's name otherwise."""
    text = str(target)
    match = _EDGE_OP.match(text)
    if match:
        return match.group(1)
    return text if text.startswith(("aten.", "quantized_decomposed.")) else getattr(target, "__name__", text)


def delegation_of(graph_module: Any) -> Delegation:
    """Walk a lowered graph: nodes inside ``executorch_call_delegate`` subgraphs vs nodes left outside."""
    delegated: list[tuple[str, str]] = []
    portable: list[tuple[str, str]] = []
    subgraphs = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            subgraphs += 1
            lowered = getattr(graph_module, node.args[0].target)
            inner = lowered.original_module.graph_module.graph
            for sub in inner.nodes:
                if sub.op == "call_function" and getattr(sub.target, "__name__", "") not in _SKIP_TARGETS:
                    delegated.append((sub.name, _op_name(sub.target)))
        elif name not in _SKIP_TARGETS:
            portable.append((node.name, _op_name(node.target)))
    return Delegation(subgraphs=subgraphs, delegated=delegated, portable_nodes=portable)


def to_pte(edge: Any, source: str) -> bytes:
    try:
        with quiet():
            return bytes(edge.to_executorch().buffer)
    except Exception as exc:
        raise UnsupportedOperation(f"ExecuTorch cannot serialize {source}: {first_line(exc)}") from exc


# -- the transform ----------------------------------------------------------------------------------
def to_executorch(model: Model, config: ExecutorchExport | None = None, *, data: Dataset | None = None,
                  lowered: tuple[Any, Any, Delegation] | None = None) -> tuple[Model, ExecutorchCheck]:
    """Export ``model`` to an ExecuTorch ``.pte`` with the XNNPACK delegate and verify it.

    Args:
        model: PyTorch (``file.py:factory`` / ``.pt2``) or ONNX (converted through onnx2torch).
        config: FP32 (default) or INT8 (PT2E + XNNPACK quantizer).
        data: inputs for tracing, verification and (``int8``) calibration; random inputs of the
            model's input shape otherwise (not allowed for ``int8``).

    Returns:
        The ``.pte`` Model (batch 1) and its :class:`ExecutorchCheck` (fidelity and delegation).

    Raises:
        UnsupportedOperation: torch.export, the quantizer or the lowering fails (message names why).
        BadInput: ``int8`` without data, or outputs below the cosine floor.
        MissingDependency: the ``[executorch]`` extra is not installed.

    ``lowered`` (module, edge program, delegation) from ``edgeopt.check`` skips a second FP32 lowering.

    Example:
        >>> pte, check = to_executorch(load_model("net.py:build", weights="w.pt"),
        ...                            ExecutorchExport("int8"), data=load_data("cal.npz"))  # doctest: +SKIP
        >>> check.cosine > 0.98, check.delegation.fully_delegated  # doctest: +SKIP
    """
    require("torch", extra="torch")
    require("executorch", extra="executorch")
    cfg = config or ExecutorchExport()
    if cfg.quantize == "int8" and data is None:
        raise BadInput("--quantize int8 needs calibration data: pass --data CAL.npz (a few hundred "
                       "representative inputs)")
    if lowered is not None and cfg.quantize == "none":
        module, edge, delegation = lowered
    else:
        module, edge, delegation = _lowered(model, cfg, data)
    payload = to_pte(edge, model.source)
    names = [t.name for t in model.inputs] or None
    out = Model.from_executorch(payload, source=f"{model.source} (executorch {cfg.quantize})", input_names=names)
    check = verify(model, module, out, cfg, data, delegation)
    return out, check


def _lowered(model: Model, cfg: ExecutorchExport, data: Dataset | None) -> tuple[Any, Any, Delegation]:
    torch = require("torch", extra="torch")
    from edgeopt.transforms.export import batch1_args, module_for_export

    module = module_for_export(model, target="ExecuTorch")
    args = batch1_args(model, data)
    if data is not None and cfg.quantize == "int8":
        fitted = data.feeds_for(model) if model.inputs else data
        arrays = list(fitted.inputs.values())
        n = min(len(arrays[0]), cfg.calibration_samples)
        calibration = [tuple(torch.from_numpy(np.ascontiguousarray(a[i:i + 1], dtype=np.float32)) for a in arrays)
                       for i in range(n)]
        program = quantize_pt2e(module, args, calibration, per_channel=cfg.per_channel, source=model.source)
    else:
        program = capture(module, args, model.source)
    edge, delegation = lower(program, model.source)
    return module, edge, delegation


def _verify_inputs(model: Model, pte: Model, data: Dataset | None, n: int) -> list[np.ndarray]:
    if data is not None:
        fitted = data.feeds_for(model) if model.inputs else data
        return [np.ascontiguousarray(a[:n], dtype=np.float32) for a in fitted.inputs.values()]
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, *spec.shape[1:])).astype(np.float32) for spec in pte.inputs]


def verify(model: Model, module: Any, pte: Model, cfg: ExecutorchExport, data: Dataset | None,
           delegation: Delegation) -> ExecutorchCheck:
    """Run the ``.pte`` in ``executorch.runtime`` and the source module in PyTorch on the same inputs."""
    from edgeopt.runtimes.executorch import ExecutorchRuntime

    inputs = _verify_inputs(model, pte, data, cfg.verify_samples)
    ref = torch_outputs(module, inputs)
    session = ExecutorchRuntime().load(pte, threads=None)  # the pool as it is: it is process-wide
    got = session.run(dict(zip(session.input_names, inputs, strict=True)))[0]
    agreement, cos, min_cos, diff = compare_converted(
        got, ref, floor=cfg.cosine_floor, what=f"ExecuTorch {cfg.quantize}", ref_label="PyTorch",
        shape_ref="PyTorch's", hint="try --quantize none or more representative --data")
    return ExecutorchCheck(quantize=cfg.quantize, reference="pytorch" if model.format == "torch" else "onnx2torch",
                           cosine=cos, min_cosine=min_cos, max_abs_diff=diff, agreement=agreement,
                           samples=len(got), delegation=delegation)


@register_transform(ExecutorchExport)
def _apply(model: Model, config: ExecutorchExport, ctx: TransformContext) -> Model:
    return to_executorch(model, config, data=ctx.calibration or ctx.train)[0]

