"""OpenVINO on the CPU: ONNX models compiled by OpenVINO, with an explicit precision choice.

Why a precision option at all: on CPUs with AVX-512 BF16 or AMX, OpenVINO's *default* CPU
inference precision is BF16, not FP32, so "OpenVINO FP32" timings taken with default settings
are really BF16 timings (faster, and outputs differ from FP32 in the third digit). edgeopt makes
that choice explicit (``precision``) and records what OpenVINO actually compiled
(:attr:`OpenVinoSession.details`), so reports say which precision was timed.

QDQ ONNX models (QuantizeLinear/DequantizeLinear pairs, e.g. from NNCF or ONNX Runtime's
``quantize_static``) are executed by OpenVINO as real INT8 kernels: ``details["compute_precisions"]``
then counts u8/i8 convolutions.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.deps import available, require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation

if TYPE_CHECKING:
    from edgeopt.model import Model

PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}
PERFORMANCE_MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
KNOWN_OPTIONS = ("precision", "num_streams", "performance_mode", "cpu_pinning", "dynamic_quantization_group_size")
_COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Check ") and not line.startswith("Exception from"):
            return line
    return text.splitlines()[0] if text else type(exc).__name__


class OpenVinoSession:
    """A compiled OpenVINO model plus one reused InferRequest: ``run`` does no compile or allocation
    beyond copying the outputs out of OpenVINO's buffers. An InferRequest is not thread-safe, so
    ``run`` holds a lock (uncontended: tens of nanoseconds) and may be called from several threads.

    Attributes:
        details: what OpenVINO compiled, for reports: ``inference_precision`` (e.g. "bf16"),
            ``num_threads``, ``num_streams``, ``performance_mode`` and ``compute_precisions``
            (runtime precision of each Convolution/FullyConnected/MatMul layer, counted).
    """

    def __init__(self, compiled: Any, input_names: list[str], output_names: list[str],
                 details: dict[str, Any]) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.input_names = input_names
        self.output_names = output_names
        self._n_outputs = len(output_names)
        self._lock = threading.Lock()
        self.details = details

    @property
    def precision(self) -> str:
        """OpenVINO's effective floating-point inference precision ("f32" or "bf16")."""
        return str(self.details["inference_precision"])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            inputs = {i: feeds[name] for i, name in enumerate(self.input_names)}
        except KeyError as exc:
            raise DataError(f"missing input {exc.args[0]!r}; the model takes {self.input_names}") from exc
        request = self._request
        with self._lock:
            try:
                request.infer(inputs, share_inputs=True)
            except RuntimeError as exc:
                raise DataError(f"OpenVINO could not run these inputs: {_first_line(exc)}") from exc
            return [request.get_output_tensor(i).data.copy() for i in range(self._n_outputs)]


class OpenVinoRuntime:
    """OpenVINO CPU plugin for ONNX models.

    ``options``:
        precision: None (OpenVINO's default: BF16 on CPUs with AVX-512 BF16/AMX, else FP32),
            "f32" (alias "fp32") or "bf16"; sets ``INFERENCE_PRECISION_HINT``.
        num_streams: parallel inference streams (default 1: one request at a time, as edgeopt times).
        performance_mode: "latency" (default) or "throughput"; sets ``PERFORMANCE_HINT``.
        cpu_pinning: False (default) or True; sets ``ENABLE_CPU_PINNING``. OpenVINO's own default
            pins its threads to cores; on a CPU shared with other busy processes (an edge device
            running anything else, or this build machine) a pinned thread cannot move off a busy
            core: measured 8.7x (1 thread) and 26x (2 threads) slower p50 on the digits CNN at load
            average 15 on 2 cores, unpinned within 1.2x of ONNX Runtime. Set True on a dedicated CPU.
        dynamic_quantization_group_size: None (OpenVINO's default) or an integer >= 0; sets
            ``DYNAMIC_QUANTIZATION_GROUP_SIZE``. On a model with compressed (INT8/INT4) weights the CPU
            plugin quantizes each FullyConnected input to INT8 at run time, one scale per group of
            this many values, to use INT8 kernels; 0 turns that off (weights decompressed, float
            activations: more faithful, usually slower).

    Example:
        >>> from edgeopt.runtimes import get_runtime
        >>> session = get_runtime("openvino").load(model, threads=1, options={"precision": "f32"})  # doctest: +SKIP
        >>> session.details["inference_precision"]  # doctest: +SKIP
        'f32'
    """

    name = "openvino"
    formats = ("onnx",)

    def available(self) -> bool:
        return available("openvino")

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> OpenVinoSession:
        """Compile ``model`` for the CPU; see the class docstring for ``options``.

        Raises:
            BadInput: unknown options or values, threads < 1.
            ModelError: a non-ONNX model or one OpenVINO cannot read.
            UnsupportedOperation: an operator OpenVINO's ONNX frontend or CPU plugin lacks.
            MissingDependency: openvino is not installed.
        """
        config = compile_config(threads=threads, options=options)
        if model.format != "onnx":
            raise ModelError(f"openvino runs ONNX models; {model.source} is {model.format}")
        ov = require("openvino", extra="openvino")
        core = ov.Core()
        try:
            ov_model = _read(core, model)
        except RuntimeError as exc:
            text = _first_line(exc)
            if "not supported" in text.lower() or "OpConversionFailure" in text or "No conversion rule" in text:
                raise UnsupportedOperation(f"OpenVINO cannot convert {model.source}: {text}") from exc
            raise ModelError(f"OpenVINO cannot read {model.source}: {text}") from exc
        try:
            compiled = core.compile_model(ov_model, "CPU", config)
        except RuntimeError as exc:
            text = _first_line(exc)
            if "not supported" in text.lower() or "Unsupported" in text:
                raise UnsupportedOperation(f"OpenVINO's CPU plugin cannot run {model.source}: {text}") from exc
            raise ModelError(f"OpenVINO cannot compile {model.source}: {text}") from exc
        input_names = _port_names(compiled.inputs, [t.name for t in model.inputs])
        output_names = _port_names(compiled.outputs, [t.name for t in model.outputs])
        return OpenVinoSession(compiled, input_names, output_names, compiled_details(compiled))


def compile_config(*, threads: int | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenVINO CPU properties for edgeopt's ``threads`` and runtime ``options``.

    Raises:
        BadInput: an unknown option, a bad value, or threads < 1.
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(KNOWN_OPTIONS))
    if unknown:
        raise BadInput(f"unknown openvino option(s) {unknown}; known: {', '.join(KNOWN_OPTIONS)}")
    config: dict[str, Any] = {}
    precision = opts.get("precision")
    if precision is not None:
        key = str(precision).lower()
        if key not in PRECISIONS:
            raise BadInput(f"openvino precision must be one of f32, bf16 (or unset for OpenVINO's default), "
                           f"got {precision!r}")
        config["INFERENCE_PRECISION_HINT"] = PRECISIONS[key]
    streams = opts.get("num_streams", 1)
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise BadInput(f"openvino num_streams must be an integer >= 1, got {streams!r}")
    config["NUM_STREAMS"] = streams
    mode = str(opts.get("performance_mode", "latency")).lower()
    if mode not in PERFORMANCE_MODES:
        raise BadInput(f"openvino performance_mode must be one of {', '.join(PERFORMANCE_MODES)}, "
                       f"got {opts.get('performance_mode')!r}")
    config["PERFORMANCE_HINT"] = PERFORMANCE_MODES[mode]
    pinning = opts.get("cpu_pinning", False)
    if not isinstance(pinning, bool):
        raise BadInput(f"openvino cpu_pinning must be true or false, got {pinning!r}")
    config["ENABLE_CPU_PINNING"] = pinning
    group = opts.get("dynamic_quantization_group_size")
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise BadInput(f"openvino dynamic_quantization_group_size must be an integer >= 0, got {group!r}")
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BadInput(f"threads must be an integer >= 1, got {threads!r}")
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def compiled_details(compiled: Any) -> dict[str, Any]:
    """What OpenVINO really compiled: precision hint, threads, streams, per-layer compute precisions."""
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    counts: Counter[str] = Counter()
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS:
                counts[info["runtimePrecision"].astype(str)] += 1
    except (RuntimeError, KeyError):
        pass
    return {
        "inference_precision": hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint),
        "num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "num_streams": int(compiled.get_property("NUM_STREAMS")),
        "performance_mode": str(compiled.get_property("PERFORMANCE_HINT")).split(".")[-1],
        "cpu_pinning": bool(compiled.get_property("ENABLE_CPU_PINNING")),
        "dynamic_quantization_group_size": _group_size(compiled),
        "compute_precisions": dict(sorted(counts.items())),
    }


def _group_size(compiled: Any) -> int | None:
    try:
        return int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
    except (RuntimeError, TypeError, ValueError):
        return None


def _read(core: Any, model: Model) -> Any:
    """Read from memory; from the file when the model keeps weights as ONNX external data."""
    path = model.path
    if path is not None and Path(path).exists() and any(
            init.data_location == 1 for init in model.onnx.graph.initializer):
        return core.read_model(os.fspath(path))
    return core.read_model(model=model.serialized())


def _port_names(ports: Any, preferred: list[str]) -> list[str]:
    """The ONNX tensor name of each port (OpenVINO may give a port several names)."""
    wanted = set(preferred)
    names = []
    for port in ports:
        port_names = port.get_names()
        match = [n for n in port_names if n in wanted]
        names.append(match[0] if match else port.get_any_name())
    return names
