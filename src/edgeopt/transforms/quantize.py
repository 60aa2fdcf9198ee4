"""Quantization with ONNX Runtime: dynamic and static INT8, FP16, INT4 weight-only, BF16 run hint.

Each technique is a frozen config plus :func:`quantize`, which returns a *new* Model (the search
needs the original). The heavy lifting is onnxruntime.quantization's own: ``quant_pre_process``
(shape inference and graph fusions), ``quantize_static`` with a CalibrationDataReader over the
calibration Dataset, ``quantize_dynamic``, ``MatMulNBitsQuantizer`` and the float16 converter
from onnxruntime.transformers. What is ours: validation that fails with one line a user can act
on, refusing models that are already quantized, a calibration cache so that many static variants
of one model (the auto search, per-layer sensitivity) calibrate once, and the ``edgeopt.quantization``
metadata that records what was done.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import available, require
from edgeopt.errors import (
    BadInput,
    ConfigError,
    DataError,
    MissingDependency,
    UnsupportedOperation,
    first_line,
)
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, config_to_dict, register_config, register_transform

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger",
    "MatMulNBits", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat",
})
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
CALIBRATIONS = ("minmax", "entropy", "percentile")
INT8_TYPES = ("s8", "u8")
FORMATS = ("qdq", "qoperator")


# -- configs ------------------------------------------------------------------------------------
def _check_choice(cls: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{cls} {name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_bool(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{cls} {name} must be true or false, got {value!r}")


def _check_names(cls: str, name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{cls} {name} must be a list of node names, got {value!r}")


@register_config
@dataclass(frozen=True)
class DynamicInt8:
    """INT8 weights, activations quantized at run time (what TFLite's Optimize.DEFAULT does).

    No calibration data needed. Fast for MatMul-heavy models (transformers, RNNs); for CNNs
    ONNX Runtime's ConvInteger is often *slower* than FP32 — measure before you ship it.

    Args:
        per_channel: one scale per output channel instead of per tensor.
        weight_type: "s8" or "u8".
        op_types: ONNX op types to quantize (default: ONNX Runtime's list: MatMul, Conv, Gemm, ...).
        exclude_nodes: node names kept in float (mixed precision: names of :func:`prepared`'s graph,
            as ``edgeopt analyze`` lists them).
    """

    per_channel: bool = False
    weight_type: Literal["s8", "u8"] = "s8"
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bool("DynamicInt8", "per_channel", self.per_channel)
        _check_choice("DynamicInt8", "weight_type", self.weight_type, INT8_TYPES)
        if self.op_types is not None:
            _check_names("DynamicInt8", "op_types", self.op_types)
        _check_names("DynamicInt8", "exclude_nodes", self.exclude_nodes)


@register_config
@dataclass(frozen=True)
class StaticInt8:
    """INT8 weights and activations, with activation ranges calibrated on sample data.

    Args:
        format: "qdq" (QuantizeLinear/DequantizeLinear pairs; runtimes fuse them) or "qoperator"
            (QLinearConv/QLinearMatMul operators).
        per_channel: one weight scale per output channel (usually more accurate for CNNs).
        activation_type, weight_type: "u8" or "s8"; U8 activations with S8 weights is the fast
            path on x86 VNNI in ONNX Runtime.
        calibration: "minmax", "entropy" or "percentile" (99.999th) activation ranges.
        symmetric_activations, symmetric_weights: zero point fixed at 0 (symmetric) or fitted.
        samples: at most this many calibration samples are used.
        exclude_nodes: node names kept in float (mixed precision; see ``edgeopt analyze``).
        only_nodes: when given, quantize only these nodes (per-layer sensitivity).
        op_types: quantize only these ONNX op types (e.g. ``("MatMul",)`` for transformers, so
            Softmax, LayerNorm, GELU and residual Adds stay float); default ONNX Runtime's list.
        bias_correction: after quantizing, shift each layer's float bias by the mean error INT8
            adds to its output on the calibration data, then quantize again with the same ranges
            (empirical bias correction; see transforms/bias_correction.py).
    """

    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    activation_type: Literal["u8", "s8"] = "u8"
    weight_type: Literal["s8", "u8"] = "s8"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    samples: int = 128
    exclude_nodes: tuple[str, ...] = ()
    only_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        _check_bool("StaticInt8", "bias_correction", self.bias_correction)
        _check_choice("StaticInt8", "format", self.format, FORMATS)
        _check_bool("StaticInt8", "per_channel", self.per_channel)
        _check_choice("StaticInt8", "activation_type", self.activation_type, INT8_TYPES)
        _check_choice("StaticInt8", "weight_type", self.weight_type, INT8_TYPES)
        _check_choice("StaticInt8", "calibration", self.calibration, CALIBRATIONS)
        _check_bool("StaticInt8", "symmetric_activations", self.symmetric_activations)
        _check_bool("StaticInt8", "symmetric_weights", self.symmetric_weights)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"StaticInt8 samples must be an integer >= 1, got {self.samples!r}")
        _check_names("StaticInt8", "exclude_nodes", self.exclude_nodes)
        _check_names("StaticInt8", "only_nodes", self.only_nodes)
        if self.op_types is not None:
            _check_names("StaticInt8", "op_types", self.op_types)
        if self.activation_type == "s8" and self.weight_type == "u8":
            raise ConfigError("StaticInt8: S8 activations with U8 weights is not supported by ONNX Runtime; "
                              "use activation_type u8 or weight_type s8")

    @property
    def label(self) -> str:
        return (f"{self.format} {self.activation_type}{self.weight_type} "
                f"{'per-channel' if self.per_channel else 'per-tensor'} {self.calibration}"
                + (" bias-corrected" if self.bias_correction else ""))


@register_config
@dataclass(frozen=True)
class Fp16:
    """Weights and compute in float16 (half the file; fast only where the runtime has FP16 kernels).

    Args:
        keep_io_types: keep float32 inputs/outputs (Casts at the edges), so callers need not change.
    """

    keep_io_types: bool = True

    def __post_init__(self) -> None:
        _check_bool("Fp16", "keep_io_types", self.keep_io_types)


@register_config
@dataclass(frozen=True)
class Int4WeightOnly:
    """Block-wise INT4 weights for MatMul (ONNX Runtime MatMulNBits); activations stay float.

    For MatMul-heavy models (transformers): ~7x smaller MatMul weights. Conv layers are untouched.

    Args:
        block_size: weights per scale along K (a power of two >= 16).
        symmetric: symmetric blocks (no zero point).
        accuracy_level: MatMulNBits compute type: None/0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
            (fastest on CPUs with VNNI, slightly less accurate).
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = 4

    def __post_init__(self) -> None:
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ConfigError(f"Int4WeightOnly block_size must be a power of two >= 16, got {b!r}")
        _check_bool("Int4WeightOnly", "symmetric", self.symmetric)
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ConfigError(f"Int4WeightOnly accuracy_level must be null or 0..4, got {self.accuracy_level!r}")


@register_config
@dataclass(frozen=True)
class Bf16:
    """Run in BF16 on OpenVINO (an inference precision hint; the file stays FP32).

    Only a run setting: the model is tagged ``runtime=openvino`` with ``{"precision": "bf16"}``;
    OpenVINO executes BF16 on CPUs with AVX-512 BF16/AMX and falls back to FP32 elsewhere.
    """


@register_config
@dataclass(frozen=True)
class Int8WeightOnly:
    """INT8 MatMul weights in blocks along K (ONNX Runtime MatMulNBits, bits=8), INT8 embeddings per row.

    For transformers. With ``accuracy_level`` 4 ONNX Runtime also quantizes each MatMul's input at
    run time, one scale per block of ``block_size`` values of a row: much finer than the single
    scale of dynamic INT8, so the few outlier channels of a transformer's activations cost little.
    Embedding tables (Gather on a constant) are stored INT8 with one scale per row, which keeps the
    file near a quarter of FP32.

    Args:
        block_size: weights (and activations) per scale along K (a power of two >= 16).
        accuracy_level: MatMulNBits compute: 4 = INT8 (fast on CPUs with VNNI), 0/1 = FP32.
        embeddings: also store embedding tables INT8 per row.
    """

    block_size: int = 128
    accuracy_level: int = 4
    embeddings: bool = True

    def __post_init__(self) -> None:
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ConfigError(f"Int8WeightOnly block_size must be a power of two >= 16, got {b!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"Int8WeightOnly accuracy_level must be 0..4, got {self.accuracy_level!r}")
        _check_bool("Int8WeightOnly", "embeddings", self.embeddings)


QuantizeConfig = DynamicInt8 | StaticInt8 | Fp16 | Int4WeightOnly | Int8WeightOnly | Bf16


# -- checks -------------------------------------------------------------------------------------
def check_quantizable(model: Model) -> None:
    """Raise unless ``model`` is an FP32 ONNX model with only standard operators.

    Raises:
        BadInput: a non-ONNX model (export it first), or one that is already quantized.
        UnsupportedOperation: operators from a custom domain ONNX Runtime cannot run.
    """
    if model.format != "onnx":
        raise BadInput(f"quantize works on ONNX models; {model.source} is a {model.format} model: "
                       "export it first with edgeopt export MODEL --to onnx")
    proto = model.onnx
    found = sorted({n.op_type for n in proto.graph.node} & QUANTIZED_OPS)
    if not found:
        found = _int_weights_into_dequantize(proto)
    if found:
        raise BadInput(f"{model.source} is already quantized (it has {', '.join(found)}); "
                       "quantize the original FP32 model")
    custom = sorted({f"{n.op_type} ({n.domain})" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise UnsupportedOperation(f"{model.source} uses operator(s) ONNX Runtime's quantizer cannot handle: "
                                   f"{', '.join(custom)}")


def _int_weights_into_dequantize(proto: Any) -> list[str]:
    int_inits = {i.name for i in proto.graph.initializer if i.data_type in (2, 3, 21, 22)}  # u8, s8, u4, s4
    hits = {n.op_type for n in proto.graph.node if n.op_type.startswith("Dequantize") and
            any(x in int_inits for x in n.input)}
    return sorted(hits)


def weight_nodes(proto: Any) -> list[tuple[str, str, int]]:
    """(name, op_type, weight parameter count) of every Conv/Gemm/MatMul with a constant weight."""
    sizes = {i.name: int(np.prod(i.dims)) if len(i.dims) else 1 for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type in WEIGHT_OPS:
            params = sum(sizes.get(x, 0) for x in node.input)
            if params:
                out.append((node.name, node.op_type, params))
    return out


# -- the API ------------------------------------------------------------------------------------
def quantize(model: Model, config: QuantizeConfig | None = None, *, data: Dataset | None = None) -> Model:
    """Quantize an ONNX model; returns a new Model tagged with ``edgeopt.quantization``.

    Args:
        model: an FP32 ONNX model (export PyTorch models first).
        config: DynamicInt8, StaticInt8, Fp16, Int4WeightOnly or Bf16; default StaticInt8 when
            ``data`` is given, else DynamicInt8.
        data: calibration samples for StaticInt8 (preprocessed like the model's inputs).

    Returns:
        The quantized Model (in memory; ``.save(path)`` writes it atomically).

    Raises:
        BadInput: non-ONNX or already-quantized models, StaticInt8 without data, unknown node names.
        DataError: calibration data that does not fit the model's inputs.
        UnsupportedOperation: an operator ONNX Runtime's quantizer cannot handle, or nothing to quantize.
        MissingDependency: Bf16 without openvino installed.

    Example:
        >>> int8 = quantize(load_model("digits_cnn.onnx"), StaticInt8(), data=load_data("train.npz"))  # doctest: +SKIP
        >>> int8.size_bytes < model.size_bytes / 3.5  # doctest: +SKIP
        True
    """
    cfg: Any = config if config is not None else (StaticInt8() if data is not None else DynamicInt8())
    check_quantizable(model)
    if isinstance(cfg, StaticInt8):
        if data is None:
            raise BadInput("static INT8 quantization needs calibration data: pass --data CAL.npz "
                           "(or use --mode dynamic, which needs none)")
        out = _static(model, cfg, data)
    elif isinstance(cfg, DynamicInt8):
        out = _dynamic(model, cfg)
    elif isinstance(cfg, Fp16):
        out = _fp16(model, cfg)
    elif isinstance(cfg, Int4WeightOnly):
        out = _int4(model, cfg)
    elif isinstance(cfg, Int8WeightOnly):
        out = _int8_weight_only(model, cfg)
    elif isinstance(cfg, Bf16):
        if not available("openvino"):
            raise MissingDependency("openvino", "openvino")
        return model.with_metadata(runtime="openvino", runtime_options=json.dumps({"precision": "bf16"}),
                                   quantization=json.dumps(config_to_dict(cfg)))
    else:
        raise ConfigError(f"quantize does not know {type(cfg).__name__}; use DynamicInt8, StaticInt8, Fp16, "
                          "Int4WeightOnly or Bf16")
    return out.with_metadata(quantization=json.dumps(config_to_dict(cfg)))


@register_transform(DynamicInt8)
def _apply_dynamic(model: Model, config: DynamicInt8, ctx: TransformContext) -> Model:
    return quantize(model, config)


@register_transform(StaticInt8)
def _apply_static(model: Model, config: StaticInt8, ctx: TransformContext) -> Model:
    if ctx.calibration is None:
        raise BadInput("StaticInt8 needs calibration data and the recipe was given none")
    return quantize(model, config, data=ctx.calibration)


@register_transform(Fp16)
def _apply_fp16(model: Model, config: Fp16, ctx: TransformContext) -> Model:
    return quantize(model, config)


@register_transform(Int4WeightOnly)
def _apply_int4(model: Model, config: Int4WeightOnly, ctx: TransformContext) -> Model:
    return quantize(model, config)


@register_transform(Int8WeightOnly)
def _apply_int8_weight_only(model: Model, config: Int8WeightOnly, ctx: TransformContext) -> Model:
    return quantize(model, config)


# -- implementation -----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs warnings and prints progress; keep the CLI's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _unsupported(model: Model, what: str, exc: BaseException) -> UnsupportedOperation:
    message = first_line(exc)
    ops = sorted({n.op_type for n in model.onnx.graph.node if n.op_type in str(exc)}, key=len, reverse=True)
    named = f" (operator {ops[0]})" if ops else ""
    return UnsupportedOperation(f"ONNX Runtime could not {what} {model.source}{named}: {message}")


_PREPARED: dict[str, Any] = {}


def prepared(model: Model) -> Any:
    """The model after ``quant_pre_process`` (shape inference, fusions), every node named; cached.

    Node names in ``exclude_nodes``/``only_nodes`` and in ``edgeopt analyze`` refer to this graph.
    """
    key = model.sha256
    if key in _PREPARED:
        return _PREPARED[key]
    onnx = require("onnx", extra="core")
    shape_inference = require("onnxruntime.quantization.shape_inference", extra="core")
    with tempfile.TemporaryDirectory(prefix="edgeopt-q-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(model.serialized())
        try:
            # when symbolic shape inference gives up, ONNX Runtime saves the model (and its weights as a
            # uuid-named .data file) into the working directory: keep that inside our temporary directory
            with _quiet(), contextlib.chdir(tmp):
                shape_inference.quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
            proto = onnx.load(str(dst))
        except Exception:  # noqa: BLE001 - pre-processing is an optimization; quantize the model as given
            proto = onnx.load(str(src))
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    if len(_PREPARED) > 8:
        _PREPARED.clear()
    _PREPARED[key] = proto
    return proto


class _Reader:
    """A CalibrationDataReader over a fitted Dataset, in batches the model accepts."""

    def __init__(self, data: Dataset, batch: int) -> None:
        self._items = [feeds for feeds, _ in data.batches(batch) if len(next(iter(feeds.values()))) == batch]
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._items):
            return None
        self._pos += 1
        return self._items[self._pos - 1]

    def __len__(self) -> int:
        return len(self._items)

    def rewind(self) -> None:
        self._pos = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._items = self._items[start_index:end_index]
        self._pos = 0


def calibration_subset(model: Model, data: Dataset, samples: int, *, seed: int = 0) -> Dataset:
    """At most ``samples`` samples of ``data`` fitted to the model (a fixed random subset: files are often sorted)."""
    fitted = data.feeds_for(model)
    if len(fitted) == 0:
        raise DataError(f"{data.source} is empty: static quantization needs calibration samples")
    if len(fitted) > samples:
        idx = np.sort(np.random.default_rng(seed).permutation(len(fitted))[:samples])
        fitted = fitted.take(idx)
    return fitted


def _batch_for(model: Model, n: int) -> int:
    fixed = [s.shape[0] for s in model.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0]
    if fixed:
        if n < fixed[0]:
            raise DataError(f"the model's fixed batch size is {fixed[0]} but only {n} calibration samples were given")
        return fixed[0]
    return min(16, n)


_CACHE_DIR: tempfile.TemporaryDirectory[str] | None = None


def _calibration_cache(model: Model, cfg: StaticInt8, subset: Dataset) -> Path:
    """A per-process file where ORT keeps the activation ranges of (model, data, method)."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.TemporaryDirectory(prefix="edgeopt-calib-")
    h = hashlib.sha256(model.sha256.encode())
    h.update(f"{cfg.calibration}|{cfg.symmetric_activations}".encode())
    for k in sorted(subset.inputs):
        arr = np.ascontiguousarray(subset.inputs[k])
        h.update(k.encode() + str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes())
    return Path(_CACHE_DIR.name) / f"{h.hexdigest()[:24]}.json"


def calibration_ranges(model: Model, cfg: StaticInt8, data: Dataset) -> Any:
    """ONNX Runtime's activation ranges (``TensorsData``) for ``model`` under ``cfg``'s calibration.

    The same ranges ``quantize_static`` uses: computed by ORT's calibrator on the same subset of
    ``data`` and kept in the same per-process cache, so a later :func:`quantize` of the same model,
    data and method does not calibrate again (and vice versa).
    """
    ortq = require("onnxruntime.quantization", extra="core")
    calibrate = require("onnxruntime.quantization.calibrate", extra="core")
    subset = calibration_subset(model, data, cfg.samples)
    cache = _calibration_cache(model, cfg, subset)
    if not cache.is_file():
        method = {"minmax": ortq.CalibrationMethod.MinMax, "entropy": ortq.CalibrationMethod.Entropy,
                  "percentile": ortq.CalibrationMethod.Percentile}[cfg.calibration]
        with tempfile.TemporaryDirectory(prefix="edgeopt-q-") as tmp:
            src = Path(tmp) / "pre.onnx"
            src.write_bytes(prepared(model).SerializeToString())
            try:
                with _quiet():
                    calibrator = calibrate.create_calibrator(
                        src, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=method,
                        extra_options={"symmetric": cfg.symmetric_activations})
                    calibrator.collect_data(_Reader(subset, _batch_for(model, len(subset))))
                    calibrate.save_tensors_data(calibrator.compute_data(), cache)
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - ORT raises many types
                raise _unsupported(model, "calibrate", exc) from exc
    return calibrate.load_tensors_data(cache)


def _symmetric_from_minmax(model: Model, cfg: StaticInt8, subset: Dataset, cache: Path) -> None:
    """Symmetric MinMax ranges written from the asymmetric ones already cached, when there are.

    ORT's symmetric MinMax range of a tensor is +-max(|min|, |max|) over the same samples: a
    second calibration pass (40 s on EfficientNet-Lite1 under load) would compute the same numbers.
    """
    if cfg.calibration != "minmax" or not cfg.symmetric_activations or cache.is_file():
        return
    from dataclasses import replace

    source = _calibration_cache(model, replace(cfg, symmetric_activations=False), subset)
    if not source.is_file():
        return
    calibrate = require("onnxruntime.quantization.calibrate", extra="core")
    ortq = require("onnxruntime.quantization", extra="core")
    ranges = calibrate.load_tensors_data(source)
    data = {}
    for name in ranges.keys():
        lo, hi = ranges[name].range_value
        bound = np.maximum(np.abs(np.asarray(lo, np.float32)), np.abs(np.asarray(hi, np.float32)))
        data[name] = calibrate.TensorData(lowest=-bound, highest=bound)
    calibrate.save_tensors_data(calibrate.TensorsData(ortq.CalibrationMethod.MinMax, data), cache)


def _static(model: Model, cfg: StaticInt8, data: Dataset) -> Model:
    ortq = require("onnxruntime.quantization", extra="core")
    onnx = require("onnx", extra="core")
    subset = calibration_subset(model, data, cfg.samples)
    batch = _batch_for(model, len(subset))
    proto = prepared(model)
    names = {n.name for n in proto.graph.node}
    unknown = [n for n in (*cfg.exclude_nodes, *cfg.only_nodes) if n not in names]
    if unknown:
        raise BadInput(f"node name(s) not in {model.source} (after pre-processing): {unknown[:5]}; "
                       "see edgeopt analyze for the names")
    qtype = {"u8": ortq.QuantType.QUInt8, "s8": ortq.QuantType.QInt8}
    method = {"minmax": ortq.CalibrationMethod.MinMax, "entropy": ortq.CalibrationMethod.Entropy,
              "percentile": ortq.CalibrationMethod.Percentile}[cfg.calibration]
    extra = {"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": cfg.symmetric_weights,
             "CalibTensorRangeSymmetric": cfg.symmetric_activations}
    cache = _calibration_cache(model, cfg, subset)
    _symmetric_from_minmax(model, cfg, subset, cache)

    def run(graph: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="edgeopt-q-") as tmp:
            src, dst = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(graph.SerializeToString())
            try:
                with _quiet():
                    ortq.quantize_static(
                        str(src), str(dst), _Reader(subset, batch),
                        quant_format=ortq.QuantFormat.QDQ if cfg.format == "qdq" else ortq.QuantFormat.QOperator,
                        per_channel=cfg.per_channel, activation_type=qtype[cfg.activation_type],
                        weight_type=qtype[cfg.weight_type], calibrate_method=method,
                        nodes_to_exclude=float_region(graph, cfg.exclude_nodes),
                        nodes_to_quantize=list(cfg.only_nodes) or None,
                        op_types_to_quantize=list(cfg.op_types) if cfg.op_types else None,
                        extra_options=extra, calibration_cache_path=str(cache))
                return onnx.load(str(dst))
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # ORT raises ValueError, RuntimeError, Fail, KeyError...
                raise _unsupported(model, "quantize", exc) from exc

    if cfg.bias_correction:
        from edgeopt.transforms.bias_correction import corrected

        # the corrected float graph is quantized with the *same* activation ranges (the cache):
        # only the biases moved, by a fraction of a quantization step
        proto = corrected(model, subset, config=cfg, exclude=cfg.exclude_nodes)
    out = run(proto)
    return Model.from_onnx(out, source=f"{model.source} [int8 {cfg.label}]")


# Activations that bound their output (Clip to [0, 6], Relu to >= 0): the quantizer folds them into the
# producing layer's output range. Making one float moves the quantization point to its *input*, whose
# range can be many times wider (a stem conv before ReLU6: measured cosine 0.98 -> 0.87 on
# EfficientNet-Lite1), so the float region never grows upstream through them.
RANGE_LIMITING = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Softmax"})
ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu",
                         "Selu", "Gelu", "PRelu"})


def float_region(proto: Any, exclude: tuple[str, ...]) -> list[str]:
    """``exclude`` plus the weight-free nodes that should be float with them.

    Upstream: weight-free nodes (Mul, Add, Reshape, ...) that only feed excluded nodes: keeping a
    layer float must keep its *input* float too, or the node producing that input still quantizes
    it and the layer sees the rounding it was excluded to avoid; range-limiting activations
    (:data:`RANGE_LIMITING`) are not crossed. Downstream: an activation that is the only consumer of
    an excluded layer's output runs float with it, so the next quantization point is after it
    (the bounded range), not on the layer's raw output.
    """
    region = set(exclude)
    if not region:
        return []
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in proto.graph.node:
        if node.name in exclude and node.output:
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type in ACTIVATIONS:
                region.add(users[0].name)
    changed = True
    while changed:
        changed = False
        for node in proto.graph.node:
            if node.name in region or node.op_type in WEIGHT_OPS or node.op_type in RANGE_LIMITING:
                continue
            users = [u for out in node.output for u in consumers.get(out, [])]
            if users and all(u.name in region for u in users):
                region.add(node.name)
                changed = True
    return sorted(region)


def _dynamic(model: Model, cfg: DynamicInt8) -> Model:
    ortq = require("onnxruntime.quantization", extra="core")
    onnx = require("onnx", extra="core")
    proto = prepared(model)
    unknown = [n for n in cfg.exclude_nodes if n not in {node.name for node in proto.graph.node}]
    if unknown:
        raise BadInput(f"node name(s) not in {model.source} (after pre-processing): {unknown[:5]}; "
                       "see edgeopt analyze for the names")
    with tempfile.TemporaryDirectory(prefix="edgeopt-q-") as tmp:
        src, dst = Path(tmp) / "pre.onnx", Path(tmp) / "dyn.onnx"
        src.write_bytes(proto.SerializeToString())
        try:
            with _quiet():
                ortq.quantize_dynamic(str(src), str(dst), per_channel=cfg.per_channel,
                                      weight_type=ortq.QuantType.QInt8 if cfg.weight_type == "s8"
                                      else ortq.QuantType.QUInt8,
                                      op_types_to_quantize=list(cfg.op_types) if cfg.op_types else None,
                                      nodes_to_exclude=list(cfg.exclude_nodes) or None)
            out = onnx.load(str(dst))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise _unsupported(model, "quantize", exc) from exc
    return Model.from_onnx(out, source=f"{model.source} [int8 dynamic]")


def _fp16(model: Model, cfg: Fp16) -> Model:
    float16 = require("onnxruntime.transformers.float16", extra="core")
    onnx_model = require("onnxruntime.transformers.onnx_model", extra="core")
    onnx = require("onnx", extra="core")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    try:
        with _quiet():
            out = float16.convert_float_to_float16(proto, keep_io_types=cfg.keep_io_types, disable_shape_infer=False)
            # the converter appends the input Casts at the end; a saved model must be topologically sorted
            onnx_model.OnnxModel(out).topological_sort()
    except Exception as exc:  # noqa: BLE001
        raise _unsupported(model, "convert to float16", exc) from exc
    return Model.from_onnx(out, source=f"{model.source} [fp16]")


def _int4(model: Model, cfg: Int4WeightOnly) -> Model:
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", extra="core")
    onnx = require("onnx", extra="core")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    try:
        with _quiet():
            quantizer = nbits.MatMulNBitsQuantizer(proto, bits=4, block_size=cfg.block_size,
                                                   is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                                                   op_types_to_quantize=("MatMul",))
            quantizer.process()
        out = quantizer.model.model
    except Exception as exc:  # noqa: BLE001
        raise _unsupported(model, "quantize to INT4", exc) from exc
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise UnsupportedOperation(f"{model.source} has no MatMul with a constant 2-D weight to quantize to INT4 "
                                   "(INT4 weight-only is for MatMul-heavy models such as transformers; "
                                   "use --mode static for CNNs)")
    return Model.from_onnx(out, source=f"{model.source} [int4 weight-only]")


def _int8_weight_only(model: Model, cfg: Int8WeightOnly) -> Model:
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", extra="core")
    onnx = require("onnx", extra="core")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    try:
        with _quiet():
            algo = nbits.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=True,
                                                      accuracy_level=cfg.accuracy_level,
                                                      op_types_to_quantize=("MatMul",), bits=8)
            quantizer = nbits.MatMulNBitsQuantizer(proto, bits=8, block_size=cfg.block_size, is_symmetric=True,
                                                   accuracy_level=cfg.accuracy_level,
                                                   op_types_to_quantize=("MatMul",), algo_config=algo)
            quantizer.process()
        out = quantizer.model.model
    except Exception as exc:  # noqa: BLE001
        raise _unsupported(model, "quantize to INT8 weight-only", exc) from exc
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise UnsupportedOperation(f"{model.source} has no MatMul with a constant 2-D weight to quantize "
                                   "(INT8 weight-only is for MatMul-heavy models such as transformers)")
    if cfg.embeddings:
        _embeddings_int8_per_row(out)
    return Model.from_onnx(out, source=f"{model.source} [int8 weight-only]")


def _embeddings_int8_per_row(proto: Any) -> int:
    """Replace each Gather from a float 2-D table (an embedding) with an INT8 table and a per-row scale:
    Gather(int8) -> Cast -> Mul(Gather(scale)). Standard operators only. Returns how many were replaced."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for x in node.input:
            users[x] = users.get(x, 0) + 1
    nodes, done = [], 0
    for original in proto.graph.node:
        node = type(original)()
        node.CopyFrom(original)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or users.get(table.name, 0) != 1 \
                or table.data_type != TensorProto.FLOAT or table.dims[0] * table.dims[1] < 1024:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(table)
        scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        tag = f"{table.name}_int8"
        table.CopyFrom(numpy_helper.from_array(q, tag))
        proto.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32)[:, None], f"{tag}_scale"))
        out = node.output[0]
        nodes += [helper.make_node("Gather", [tag, node.input[1]], [f"{tag}_rows"], name=f"{tag}_gather", axis=0),
                  helper.make_node("Cast", [f"{tag}_rows"], [f"{tag}_float"], name=f"{tag}_cast",
                                   to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"{tag}_scale", node.input[1]], [f"{tag}_scales"],
                                   name=f"{tag}_gather_scale", axis=0),
                  helper.make_node("Mul", [f"{tag}_float", f"{tag}_scales"], [out], name=f"{tag}_dequant")]
        done += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return done
