"""PyTorch (or ONNX, or float TFLite) -> ``.tflite`` for LiteRT, optionally quantized, verified.

The field's tools do the work: ``litert-torch`` converts a PyTorch module (ONNX goes through
``onnx2torch`` first), and ``ai-edge-quantizer`` applies the same choices TFLite's converter
offers: dynamic range (``Optimize.DEFAULT``: int8 weights of the larger tensors, activations quantized on the fly),
full integer with a representative (calibration) dataset, and float16 weights. Every variant is run
in LiteRT and compared with the reference outputs (PyTorch, or the float model): a variant whose
cosine falls below the tolerance is an error, not a file.

Which variant is *faster* is a measurement, not a name: on x86 CPUs LiteRT often runs dynamic range
INT8 slower than FP32. ``edgeopt export`` times every variant asked for, interleaved.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation, first_line
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, register_config, register_transform
from edgeopt.transforms.export import (
    ConverterCheck,
    batch1_args,
    check_converter_fields,
    compare_converted,
    module_for_export,
    torch_outputs,
)

QUANTIZE_MODES = ("none", "dynamic", "int8", "fp16")
# Default fidelity floor (mean cosine vs the reference) per mode.
DEFAULT_MIN_COSINE = {"none": 0.999, "fp16": 0.999, "dynamic": 0.98, "int8": 0.98}
_LOWERING = re.compile(r"Lowering not found: (?:aten\.)?([\w.]+)")


@register_config
@dataclass(frozen=True)
class TfliteExport:
    """Export to ``.tflite``; ``quantize`` is none | dynamic | int8 (full integer, needs data) | fp16.

    ``min_cosine`` None uses :data:`DEFAULT_MIN_COSINE` (0.999 float, 0.98 INT8);
    ``calibration_samples`` caps the representative dataset; ``verify_samples`` inputs are compared.
    """

    quantize: str = "none"
    min_cosine: float | None = None
    calibration_samples: int = 128
    verify_samples: int = 16

    def __post_init__(self) -> None:
        check_converter_fields(self, modes=QUANTIZE_MODES)

    @property
    def cosine_floor(self) -> float:
        return DEFAULT_MIN_COSINE[self.quantize] if self.min_cosine is None else self.min_cosine


@dataclass
class TfliteCheck(ConverterCheck):
    """How a ``.tflite`` variant's LiteRT outputs compare with the reference's on the same inputs."""


def to_tflite(model: Model, config: TfliteExport | None = None, *, data: Dataset | None = None
              ) -> tuple[Model, TfliteCheck]:
    """Convert ``model`` to ``.tflite`` (quantized as ``config.quantize`` says) and verify it in LiteRT.

    Args:
        model: PyTorch (``file.py:factory`` / ``.pt2``), ONNX (converted through onnx2torch) or a
            float ``.tflite`` (quantized directly; the float model is then the reference).
        config: what to produce; default FP32.
        data: inputs for tracing, verification and (``int8``) calibration; random inputs of the
            model's input shape otherwise (not allowed for ``int8``).

    Returns:
        The ``.tflite`` Model and its :class:`TfliteCheck`.

    Raises:
        UnsupportedOperation: the converter has no lowering for an operator (named in the message).
        BadInput: ``int8`` without data, or outputs below the cosine floor.
        MissingDependency: the ``[litert]`` extra is not installed.

    Example:
        >>> tfl, check = to_tflite(load_model("net.py:build", weights="w.pt"), TfliteExport("int8"),
        ...                        data=load_data("cal.npz"))  # doctest: +SKIP
        >>> check.cosine > 0.98  # doctest: +SKIP
    """
    cfg = config or TfliteExport()
    return export_tflite(model, [cfg], data=data)[0]


def export_tflite(model: Model, configs: list[TfliteExport], *, data: Dataset | None = None
                  ) -> list[tuple[Model, TfliteCheck]]:
    """Several variants of one model: converted to float once, then quantized and verified each.

    Same arguments and errors as :func:`to_tflite`, with one config per variant.

    Example:
        >>> variants = export_tflite(m, [TfliteExport("none"), TfliteExport("dynamic")])  # doctest: +SKIP
    """
    if not configs:
        raise BadInput("no TFLite variant asked for")
    if any(c.quantize == "int8" for c in configs) and data is None:
        raise BadInput("--quantize int8 (full integer) needs calibration data: pass --data CAL.npz "
                       "(a few hundred representative inputs)")
    source = model.source
    float_model = model if model.format == "tflite" else _convert(module_for_export(model, target="TFLite"), model, data)
    verify = _verify_inputs(float_model, data, max(c.verify_samples for c in configs))
    ref_out = _reference_outputs(model, float_model, verify)
    ref_name = {"torch": "pytorch", "onnx": "onnxruntime"}.get(model.format, "float tflite")
    results = []
    for cfg in configs:
        payload = float_model.serialized() if cfg.quantize == "none" else _quantize(
            float_model, cfg, data)
        out = Model.from_tflite(bytes(payload), source=f"{source} (tflite {cfg.quantize})")
        check = _check(out, cfg, verify, ref_out, ref_name)
        results.append((out, check))
    return results


# -- conversion ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_litert_torch() -> Iterator[None]:
    """litert-torch prints a progress tree on its own rich console; keep the CLI's output clean."""
    try:
        from litert_torch import progress
    except ImportError:  # older litert-torch without the progress console
        yield
        return
    before = progress.console.quiet
    progress.console.quiet = True
    try:
        yield
    finally:
        progress.console.quiet = before


@contextlib.contextmanager
def _quiet_calibration() -> Iterator[None]:
    """The quantizer opens its interpreters in a debugging mode that warns on every use, and draws
    its own tqdm bar ("Running Calibration") on stderr beside ours; neither is a user problem."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        try:
            from ai_edge_quantizer.utils import progress_utils
        except ImportError:
            yield
            return
        original = progress_utils.ProgressBar

        def silent(total_steps: int, description: str = "", disappear_on_finish: bool = False,
                   enable: bool | None = None) -> Any:
            return original(total_steps, description, disappear_on_finish, enable=False)

        progress_utils.ProgressBar = silent
        try:
            yield
        finally:
            progress_utils.ProgressBar = original


def _convert(module: Any, model: Model, data: Dataset | None) -> Model:
    litert_torch = require("litert_torch", extra="litert")
    args = batch1_args(model, data)
    with _quiet_litert_torch():
        try:
            edge = litert_torch.convert(module, args)
            payload = bytes(edge.model_content())
        except Exception as exc:
            text = str(exc)
            match = _LOWERING.search(text)
            if match:
                raise UnsupportedOperation(
                    f"TFLite export of {model.source}: the converter has no lowering for operator "
                    f"{match.group(1)}; replace it in the model or export to ONNX instead") from exc
            raise UnsupportedOperation(f"TFLite export of {model.source} failed: {first_line(exc)}") from exc
    return Model.from_tflite(payload, source=f"{model.source} (tflite none)")


# -- quantization -------------------------------------------------------------------------------
def _quantize(float_model: Model, cfg: TfliteExport, data: Dataset | None) -> bytes:
    require("ai_edge_quantizer", extra="litert")
    from ai_edge_quantizer import qtyping, quantizer, recipe

    q = quantizer.Quantizer(bytearray(float_model.serialized()))
    calibration = None
    if cfg.quantize == "dynamic":
        # TFLite's Optimize.DEFAULT: int8 weights only for tensors of >= 1024 elements (small
        # depthwise kernels stay float, which is what keeps MobileNet-style models accurate).
        q.load_quantization_recipe(recipe.dynamic_legacy_wi8_afp32())
    elif cfg.quantize == "fp16":
        q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                 num_bits=16, algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
    else:
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        samples = _calibration_set(float_model, data, cfg.calibration_samples)
        with _quiet_calibration():
            calibration = q.calibrate(samples, num_threads=1)
    try:
        with _quiet_calibration():
            result = q.quantize(calibration, enable_progress_report=False)
    except (ValueError, RuntimeError) as exc:
        raise UnsupportedOperation(f"ai-edge-quantizer cannot apply {cfg.quantize} to "
                                   f"{float_model.source}: {first_line(exc)}") from exc
    return bytes(result.quantized_model)


def _calibration_set(float_model: Model, data: Dataset | None, limit: int) -> dict[str, list[dict[str, Any]]]:
    """The representative dataset, one sample per entry, keyed as the model's signature wants."""
    if data is None:
        raise BadInput("--quantize int8 needs calibration data (--data CAL.npz)")
    litert = require("ai_edge_litert.interpreter", extra="litert")
    interp = litert.Interpreter(model_content=float_model.serialized())
    signatures = interp.get_signature_list()
    if len(signatures) != 1:
        raise ModelError(f"{float_model.source} has {len(signatures)} signatures; int8 export needs one")
    key, sig = next(iter(signatures.items()))
    feeds = data.feeds_for(float_model).take(slice(0, limit))
    arrays = list(feeds.inputs.values())
    if len(arrays) != len(sig["inputs"]):
        raise DataError(f"{data.source} has {len(arrays)} input arrays; the model takes {len(sig['inputs'])}")
    n = len(arrays[0])
    if n == 0:
        raise DataError(f"{data.source} is empty; int8 calibration needs samples")
    return {key: [{name: np.ascontiguousarray(a[i:i + 1], dtype=np.float32)
                   for name, a in zip(sig["inputs"], arrays, strict=True)} for i in range(n)]}


# -- verification -------------------------------------------------------------------------------
def _verify_inputs(float_model: Model, data: Dataset | None, n: int) -> list[np.ndarray]:
    if data is not None:
        arrays = list(data.feeds_for(float_model).inputs.values())
        return [np.ascontiguousarray(a[:n]) for a in arrays]
    rng = np.random.default_rng(0)
    out = []
    for spec in float_model.inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:])
        out.append(rng.standard_normal((n, *shape)).astype(np.float32))
    return out


def _run_litert(model: Model, inputs: list[np.ndarray]) -> np.ndarray:
    from edgeopt.runtimes.litert import LiteRtRuntime

    session = LiteRtRuntime().load(model, threads=1)
    rows = []
    for i in range(len(inputs[0])):
        feeds = {name: a[i:i + 1] for name, a in zip(session.input_names, inputs, strict=True)}
        rows.append(session.run(feeds)[0])
    return np.concatenate(rows)


def _reference_outputs(model: Model, float_model: Model, inputs: list[np.ndarray]) -> np.ndarray:
    """What the variants must match: PyTorch, ONNX Runtime for an ONNX source, else the float .tflite."""
    if model.format == "tflite":
        return _run_litert(float_model, inputs)
    if model.format == "onnx":
        from edgeopt.runtimes.sessions import open_session, resolve_settings

        session = open_session(model, resolve_settings(model, runtime="onnxruntime", threads=1))
        return session.run(dict(zip(session.input_names, inputs, strict=True)))[0]
    return torch_outputs(model.module, inputs)


def _check(model: Model, cfg: TfliteExport, inputs: list[np.ndarray], ref: np.ndarray,
           ref_name: str) -> TfliteCheck:
    got = _run_litert(model, inputs)
    agreement, cos, min_cos, diff = compare_converted(
        got, ref, floor=cfg.cosine_floor, what=f"TFLite {cfg.quantize}", ref_label=ref_name,
        shape_ref="the reference's", hint="try another --quantize mode or more representative --data")
    return TfliteCheck(quantize=cfg.quantize, reference=ref_name, cosine=cos, min_cosine=min_cos,
                       max_abs_diff=diff, agreement=agreement, samples=len(got))


@register_transform(TfliteExport)
def _apply(model: Model, config: TfliteExport, ctx: TransformContext) -> Model:
    return to_tflite(model, config, data=ctx.calibration or ctx.train)[0]
