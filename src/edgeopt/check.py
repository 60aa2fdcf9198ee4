"""Will this model deploy on that runtime? Per target, which operators run natively, are delegated,
fall back to a slow path, or are not supported at all, with the node names, before any work starts.

Why: export failing late on an operator the target lacks is one of the field's most common
complaints (a supported-op list is asked for in litert-torch#358, executorch#1340,
tensorflow#56162), and a delegate that silently leaves part of the graph on reference kernels is
worse, because nothing fails. Each target is asked with the target's own tools, never a
hand-written op list that goes stale:

- ``onnxruntime``: the ONNX graph (exported from PyTorch when needed) against ONNX Runtime's
  registered CPU kernels for the model's opset, then a session is created.
- ``openvino``: the ONNX graph read by OpenVINO and ``Core.query_model`` on the CPU plugin.
- ``tflite``: every ATen op after litert-torch's own decompositions against its lowering table
  (an op without one names the node), then the real conversion; the ``.tflite``'s ops are builtin
  or Select-TF (``Flex*``, needs the large TF ops library: a fallback) or custom.
- ``executorch``: ``torch.export`` + lowering with the XNNPACK partitioner; nodes left outside the
  delegate run on ExecuTorch's portable kernels (a fallback).

Verdict per target: ``deploys`` (exit 0), ``fallback`` (exit 3: runs, but part of the graph on a
slow path), ``cannot export`` (exit 2: the converter or runtime cannot take it). ``export`` and
``optimize`` run the check for their target first and stop with its message.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, EdgeoptError, first_line
from edgeopt.model import Model

TARGETS = ("onnxruntime", "openvino", "tflite", "executorch")
# edgeopt export --to X / optimize --target X -> the runtime the check asks
TARGET_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "tflite", "executorch": "executorch"}
STATUSES = ("native", "delegated", "fallback", "unsupported")
_EXIT = {"deploys": 0, "fallback": 3, "cannot export": 2}
_MAX_NODES = 20  # node names kept per op in reports; counts stay exact


@dataclass
class OpSupport:
    """One operator type on one target: how it runs and on which nodes."""

    op: str
    status: str  # native | delegated | fallback | unsupported
    nodes: list[str] = field(default_factory=list)
    count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "status": self.status, "count": self.count, "nodes": self.nodes[:_MAX_NODES]}


@dataclass
class TargetCheck:
    """What one target makes of the model; ``error`` is set when it cannot take the model at all."""

    target: str
    ops: list[OpSupport] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    artifact: Any = field(default=None, repr=False)  # the converted model, reused by export

    @property
    def verdict(self) -> str:
        if self.error is not None or any(o.status == "unsupported" for o in self.ops):
            return "cannot export"
        if any(o.status == "fallback" for o in self.ops):
            return "fallback"
        return "deploys"

    @property
    def exit_code(self) -> int:
        return _EXIT[self.verdict]

    def by_status(self, status: str) -> list[OpSupport]:
        return [o for o in self.ops if o.status == status]

    def message(self) -> str:
        """One line a user can act on."""
        if self.error is not None:
            return f"{self.target}: cannot export: {self.error}"
        bad = self.by_status("unsupported")
        if bad:
            return f"{self.target}: cannot export: {_UNSUPPORTED_WHAT[self.target]} {_ops_text(bad)}"
        slow = self.by_status("fallback")
        if slow:
            return f"{self.target}: runs with fallbacks: {_ops_text(slow)} {_FALLBACK_WHERE[self.target]}"
        n = sum(o.count for o in self.ops)
        how = "delegated to XNNPACK" if self.target == "executorch" else "native"
        return f"{self.target}: deploys fully ({n} nodes, all {how})"

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(o.count for o in self.ops if o.status == s) for s in STATUSES}
        return {"target": self.target, "verdict": self.verdict, "exit_code": self.exit_code,
                "message": self.message(), "error": self.error, "node_counts": counts,
                "ops": [o.to_dict() for o in self.ops], "notes": self.notes, "seconds": round(self.seconds, 2)}


_UNSUPPORTED_WHAT = {"onnxruntime": "no CPU kernel for operator(s)",
                     "openvino": "the CPU plugin does not support operator(s)",
                     "tflite": "the converter has no lowering for operator(s)",
                     "executorch": "unsupported operator(s)"}
_FALLBACK_WHERE = {"executorch": "run on portable kernels, outside XNNPACK",
                   "tflite": "are Select-TF ops (need the TF ops library, not the builtin runtime)",
                   "openvino": "", "onnxruntime": ""}


def _ops_text(ops: list[OpSupport]) -> str:
    return ", ".join(f"{o.op} (node{'s' if o.count > 1 else ''} {', '.join(o.nodes[:3])}"
                     f"{', ...' if o.count > 3 else ''})" for o in ops)


@dataclass
class CheckReport:
    """Every target's check; the exit code is the worst of them (2 over 3 over 0)."""

    model: str
    targets: list[TargetCheck]

    @property
    def exit_code(self) -> int:
        codes = {t.exit_code for t in self.targets}
        return 2 if 2 in codes else 3 if 3 in codes else 0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "exit_code": self.exit_code, "targets": [t.to_dict() for t in self.targets]}


def parse_targets(text: str) -> list[str]:
    """``onnxruntime,tflite`` -> a validated list; BadInput naming the known targets otherwise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if not names or bad:
        raise BadInput(f"--target takes {', '.join(TARGETS)} (comma-separated), got {text!r}")
    return list(dict.fromkeys(names))


def check(model: Model, targets: list[str] | tuple[str, ...] = TARGETS, *, data: Dataset | None = None,
          convert: bool = True) -> CheckReport:
    """Check ``model`` on each target; never raises for an operator problem (it is reported).

    Args:
        model: PyTorch (``file.py:factory``/``.pt2``) or ONNX; a ``.tflite`` or ``.pte`` is checked
            for its own runtime only.
        targets: any of :data:`TARGETS`.
        data: sample inputs for tracing (else random inputs of the model's input shape).
        convert: False skips TFLite's full conversion when every op has a lowering (``export``
            converts right after, so its pre-check only needs the lowering table).

    Raises:
        BadInput: unknown targets, a model format the target cannot start from, no input shape.

    Example:
        >>> report = check(load_model("net.py:build"), ["tflite", "executorch"])  # doctest: +SKIP
        >>> report.exit_code, report.targets[1].message()  # doctest: +SKIP
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise BadInput(f"unknown check target(s) {unknown}; known: {', '.join(TARGETS)}")
    if model.format == "torch" and not model.inputs and data is None:
        raise BadInput(f"{model.source}: input shape unknown; pass --input-shape 1x3x224x224, --data, or define "
                       "INPUT_SHAPE in the factory file")
    onnx_cache: dict[str, Any] = {}
    results = []
    for target in targets:
        start = time.perf_counter()
        result = TargetCheck(target=target)
        try:
            _CHECKS[target](model, data, result, onnx_cache | {"convert": convert})
        except EdgeoptError as exc:
            result.error = str(exc)
        result.seconds = time.perf_counter() - start
        results.append(result)
    return CheckReport(model=model.source, targets=results)


def _group(rows: list[tuple[str, str, str]]) -> list[OpSupport]:
    """(op, status, node name) rows -> one OpSupport per (op, status), worst statuses first."""
    grouped: dict[tuple[str, str], OpSupport] = {}
    for op, status, node in rows:
        entry = grouped.setdefault((op, status), OpSupport(op=op, status=status))
        entry.count += 1
        if len(entry.nodes) < _MAX_NODES:
            entry.nodes.append(node)
    order = {"unsupported": 0, "fallback": 1, "delegated": 2, "native": 3}
    return sorted(grouped.values(), key=lambda o: (order[o.status], o.op))


# -- ONNX-based targets ---------------------------------------------------------------------------
def _onnx_of(model: Model, data: Dataset | None, cache: dict[str, Any]) -> Model:
    if model.format == "onnx":
        return model
    if model.format != "torch":
        raise BadInput(f"{model.source} is a {model.format} model; onnxruntime/openvino checks take "
                       "a PyTorch or ONNX model")
    if "onnx" not in cache:
        from edgeopt.transforms.export import OnnxExport, to_onnx

        try:
            cache["onnx"] = to_onnx(model, OnnxExport(atol=float("inf")), data=data)[0]
        except EdgeoptError as exc:
            cache["onnx"] = exc
    if isinstance(cache["onnx"], EdgeoptError):
        raise cache["onnx"]
    return cache["onnx"]


def _check_onnxruntime(model: Model, data: Dataset | None, result: TargetCheck, cache: dict[str, Any]) -> None:
    onnx_model = _onnx_of(model, data, cache)
    require("onnxruntime", extra="core")
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for k in ort_c.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            kernels[(k.domain or "ai.onnx", k.op_name)].append(tuple(k.version_range))
    opsets = {(o.domain or "ai.onnx"): o.version for o in onnx_model.onnx.opset_import}
    rows = []
    for i, node in enumerate(onnx_model.onnx.graph.node):
        domain = node.domain or "ai.onnx"
        version = opsets.get(domain, 1)
        ranges = kernels.get((domain, node.op_type), [])
        ok = any(lo <= version <= hi for lo, hi in ranges)
        op = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
        rows.append((op, "native" if ok else "unsupported", node.name or f"node_{i}"))
    result.ops = _group(rows)
    if not result.by_status("unsupported"):
        from edgeopt.runtimes.onnxruntime import OnnxRuntime

        OnnxRuntime().load(onnx_model, threads=1)  # raises (reported) when a session cannot be made
    result.artifact = onnx_model


def _check_openvino(model: Model, data: Dataset | None, result: TargetCheck, cache: dict[str, Any]) -> None:
    from edgeopt.errors import UnsupportedOperation

    onnx_model = _onnx_of(model, data, cache)
    ov = require("openvino", extra="openvino")
    core = ov.Core()
    try:
        ov_model = core.read_model(model=onnx_model.serialized())
    except Exception as exc:  # the ONNX frontend names the op it has no conversion rule for
        raise UnsupportedOperation(f"OpenVINO cannot read the ONNX graph: {first_line(exc)}") from exc
    supported = core.query_model(ov_model, "CPU")
    rows = []
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Parameter", "Result", "Constant"):
            continue
        name = op.get_friendly_name()
        rows.append((kind, "native" if name in supported else "unsupported", name))
    result.ops = _group(rows)
    result.notes.append("op types are OpenVINO's (after its ONNX frontend), node names its friendly names")


# -- TFLite -------------------------------------------------------------------------------------------
def _module_and_args(model: Model, data: Dataset | None, target: str) -> tuple[Any, tuple[Any, ...]]:
    from edgeopt.transforms.export import batch1_args, module_for_export

    return module_for_export(model, target=target), batch1_args(model, data)


def _check_tflite(model: Model, data: Dataset | None, result: TargetCheck, cache: dict[str, Any]) -> None:
    if model.format == "tflite":
        result.ops = _group(tflite_ops(model))
        result.artifact = model
        return
    module, args = _module_and_args(model, data, "TFLite")
    missing = _tflite_lowerings(module, args, model.source)
    if any(status == "unsupported" for _, status, _ in missing):
        result.ops = _group(missing)
        result.notes.append("litert-torch has no TFLite lowering for the unsupported ATen ops (after its "
                            "decompositions)")
        return
    if not cache.get("convert", True):
        result.ops = _group(missing)
        result.notes.append("every ATen op has a TFLite lowering; conversion not attempted in this check")
        return
    from edgeopt.transforms.tflite import _convert

    converted = _convert(module, model, data)
    result.ops = _group(tflite_ops(converted))
    result.artifact = converted


def _tflite_lowerings(module: Any, args: tuple[Any, ...], source: str) -> list[tuple[str, str, str]]:
    """(ATen op, native|unsupported, node) per node: does litert-torch have a lowering for it, after
    the converter's own decompositions."""
    torch = require("torch", extra="torch")
    require("litert_torch", extra="litert")
    from litert_torch import fx_infra
    from litert_torch.backend import lowerings

    from edgeopt.transforms.executorch import capture, quiet
    from edgeopt.transforms.tflite import _quiet_litert_torch

    program = capture(module, args, source)
    with quiet(), _quiet_litert_torch():
        program = fx_infra.safe_run_decompositions(program, fx_infra.decomp.pre_convert_decomp(), can_skip=False)
        program = fx_infra.safe_run_decompositions(program, fx_infra.decomp.pre_lower_decomp(), can_skip=False)
    rows = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue  # getitem and higher-order ops (with_effects) are plumbing, not kernels
        status = "unsupported" if lowerings.lookup(node.target) is None else "native"
        rows.append((str(node.target), status, node.name))
    return rows


def tflite_ops(model: Model) -> list[tuple[str, str, str]]:
    """(op, status, node) for each op of a ``.tflite``: builtin = native, Flex* = Select-TF fallback."""
    litert = require("ai_edge_litert.interpreter", extra="litert")
    interp = litert.Interpreter(model_content=model.serialized())
    tensors = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    rows = []
    for op in interp._get_ops_details():
        name = str(op["op_name"])
        outputs = [tensors.get(int(i), str(i)) for i in op.get("outputs", []) if int(i) >= 0]
        node = outputs[0] if outputs else f"op_{op['index']}"
        if name.startswith("Flex"):
            status = "fallback"
        elif name.isupper() or name == "DELEGATE":
            status = "native"
        else:
            status = "unsupported"  # a custom op the builtin runtime has no kernel for
        rows.append((name, status, node))
    return rows


# -- ExecuTorch -----------------------------------------------------------------------------------------
def _check_executorch(model: Model, data: Dataset | None, result: TargetCheck, cache: dict[str, Any]) -> None:
    if model.format == "executorch":
        from edgeopt.runtimes.executorch import program_summary

        summary = program_summary(model.serialized())
        rows = [(f"{backend} delegate", "delegated", f"call {i}") for backend, n in
                summary["delegate_calls"].items() for i in range(n)]
        rows += [(op, "fallback", f"call {i}") for op, n in summary["portable_kernel_calls"].items()
                 for i in range(n)]
        result.ops = _group(rows)
        result.notes.append("read from the .pte: delegate calls and portable kernel calls (no node names kept)")
        return
    from edgeopt.transforms.executorch import capture, lower

    module, args = _module_and_args(model, data, "ExecuTorch")
    edge, delegation = lower(capture(module, args, model.source), model.source)
    rows = [(op, "delegated", node) for node, op in delegation.delegated]
    rows += [(op, "fallback", node) for node, op in delegation.portable_nodes]
    result.ops = _group(rows)
    result.notes.append(f"{delegation.subgraphs} XNNPACK subgraph(s), {delegation.delegated_nodes} node(s) "
                        f"delegated, {len(delegation.portable_nodes)} on portable kernels")
    result.artifact = (module, edge, delegation)


_CHECKS: dict[str, Callable[[Model, Dataset | None, TargetCheck, dict[str, Any]], None]] = {
    "onnxruntime": _check_onnxruntime, "openvino": _check_openvino, "tflite": _check_tflite,
    "executorch": _check_executorch,
}
