"""PyTorch -> ONNX export with the torch.export-based exporter, verified against PyTorch.

An export that silently changes the outputs is worse than none, so every export runs the same
inputs through PyTorch and ONNX Runtime and fails beyond tolerance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation, first_line
from edgeopt.measure.evaluate import fidelity
from edgeopt.model import Model
from edgeopt.transforms.config import TransformContext, register_config, register_transform


@register_config
@dataclass(frozen=True)
class OnnxExport:
    """Export a PyTorch model to ONNX; ``opset`` None lets the exporter choose (18+)."""

    dynamic_batch: bool = True
    opset: int | None = None
    atol: float = 1e-4
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)


@dataclass
class ExportCheck:
    max_abs_diff: float
    cosine: float
    samples: int

    def to_dict(self) -> dict[str, float | int]:
        return {"max_abs_diff": self.max_abs_diff, "cosine": self.cosine, "samples": self.samples}


def example_inputs(model: Model, data: Dataset | None, *, batch: int = 2) -> dict[str, np.ndarray]:
    """Sample inputs for tracing/verification: data when given, else random of the model's input shape."""
    if data is not None:
        return {k: np.ascontiguousarray(v[:batch]) for k, v in data.inputs.items()}
    if not model.inputs:
        raise BadInput(f"{model.source}: input shape unknown; pass --data or define INPUT_SHAPE in the factory file")
    rng = np.random.default_rng(0)
    out = {}
    for spec in model.inputs:
        shape = spec.fixed_shape(batch)
        if shape is None:
            raise BadInput(f"input {spec.name} has dynamic dimensions; pass --data")
        out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return out


@dataclass
class ConverterCheck:
    """How a converted model's outputs (TFLite, ``.pte``) compare with its reference's on the same inputs."""

    quantize: str
    reference: str
    cosine: float
    min_cosine: float
    max_abs_diff: float
    agreement: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "reference": self.reference, "cosine": self.cosine,
                "min_cosine": self.min_cosine, "max_abs_diff": self.max_abs_diff,
                "agreement": self.agreement, "samples": self.samples}


def compare_converted(got: np.ndarray, ref: np.ndarray, *, floor: float, what: str, ref_label: str,
                      shape_ref: str, hint: str) -> tuple[float, float, float, float]:
    """Agreement, mean and min cosine, max abs diff of a converter's outputs against the reference's;
    BadInput when the mean cosine is below ``floor`` (``what``, ``ref_label``, ``shape_ref`` and ``hint``
    word the messages for the converter)."""
    if got.shape != ref.shape:
        raise ModelError(f"{what} outputs have shape {got.shape}, {shape_ref} {ref.shape}")
    agreement, cos, min_cos = fidelity(got, ref)
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    if not cos >= floor:
        raise BadInput(f"{what} export does not match {ref_label}: cosine {cos:.5f} < {floor:g} "
                       f"(max abs diff {diff:.3g}); {hint}")
    return agreement, cos, min_cos, diff


def torch_outputs(module: Any, inputs: list[np.ndarray]) -> np.ndarray:
    """The first output of ``module`` on ``inputs`` as float numpy (``.logits`` of a Hugging Face output)."""
    torch = require("torch", extra="torch")
    with torch.no_grad():
        out = module(*[torch.from_numpy(a) for a in inputs])
    out = out.logits if hasattr(out, "logits") else out
    out = out[0] if isinstance(out, list | tuple) else out
    return out.float().numpy()


def check_converter_fields(config: Any, *, modes: tuple[str, ...], flag: str = "--quantize") -> None:
    """The checks the converter configs (TfliteExport, ExecutorchExport) share: a known quantize mode, a
    cosine floor in [-1, 1] when given, and at least one calibration and one verification sample."""
    if config.quantize not in modes:
        raise BadInput(f"{flag} must be one of {', '.join(modes)}, got {config.quantize!r}")
    if config.min_cosine is not None and not -1.0 <= config.min_cosine <= 1.0:
        raise BadInput(f"min_cosine must be in [-1, 1], got {config.min_cosine}")
    if config.calibration_samples < 1:
        raise BadInput(f"calibration_samples must be >= 1, got {config.calibration_samples}")
    if config.verify_samples < 1:
        raise BadInput(f"verify_samples must be >= 1, got {config.verify_samples}")


def module_for_export(model: Model, *, target: str) -> Any:
    """The nn.Module a converter traces (TFLite, ExecuTorch): the PyTorch model itself, or an ONNX
    model through onnx2torch; ``target`` names the format in the one-line error."""
    if model.format == "torch":
        return model.module.eval()
    if model.format == "onnx":
        onnx2torch = require("onnx2torch", extra="litert")
        try:
            return onnx2torch.convert(model.onnx).eval()
        except Exception as exc:
            raise UnsupportedOperation(f"cannot convert ONNX {model.source} to PyTorch for {target} export "
                                       f"(onnx2torch): {first_line(exc)}") from exc
    raise ModelError(f"cannot export a {model.format} model to {target}; give a PyTorch or ONNX model")


def batch1_args(model: Model, data: Dataset | None) -> tuple[Any, ...]:
    """Batch-1 example inputs as tensors (TFLite and ``.pte`` files are exported for batch 1)."""
    torch = require("torch", extra="torch")
    if data is not None and model.inputs:
        data = data.feeds_for(model)
    feeds = example_inputs(model, data, batch=1)
    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())


def to_onnx(model: Model, config: OnnxExport | None = None, *, data: Dataset | None = None
            ) -> tuple[Model, ExportCheck]:
    """Export ``model`` (PyTorch) to ONNX and verify the outputs match.

    Raises:
        UnsupportedOperation: the exporter cannot handle an operator (named in the message).
        BadInput: outputs differ beyond ``config.atol``.

    Example:
        >>> onnx_model, check = to_onnx(load_model("net.py:build", weights="w.pt"))  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    cfg = config or OnnxExport()
    module = model.module.eval()
    # A dynamic batch needs a traced batch > 1 (torch.export specializes size-1 dims); a static one is 1.
    # A .pt2 exported with a fixed batch keeps it (its graph cannot take another).
    dynamic = cfg.dynamic_batch and not any(s.shape and isinstance(s.shape[0], int) for s in model.inputs)
    feeds = example_inputs(model, data, batch=2 if dynamic else 1)
    names = list(feeds)
    input_names = list(cfg.input_names) if len(cfg.input_names) == len(names) else names
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    try:
        with torch.no_grad():
            module(*args)
    except Exception as exc:  # the data does not fit the network: say so before the exporter's noise
        shapes = ", ".join("x".join(map(str, v.shape[1:])) for v in feeds.values())
        raise DataError(f"{data.source if data is not None else model.source}: samples of shape {shapes} do not "
                        f"fit {model.source} ({first_line(exc)})") from exc
    dynamic_shapes = None
    if dynamic:
        batch_dim = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: batch_dim} for _ in args)
    try:
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=list(cfg.output_names),
                                    opset_version=cfg.opset, verbose=False, optimize=True)
    except Exception as exc:
        raise UnsupportedOperation(f"ONNX export of {model.source} failed: {onnx_failure(exc)}") from exc
    proto = program.model_proto
    exported = Model.from_onnx(proto, source=f"{model.source} (onnx)")
    check = verify_export(model, exported, feeds, atol=cfg.atol)
    return exported, check


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_NODE = re.compile(r"Error when translating node %(\w+)")


def onnx_failure(exc: BaseException) -> str:
    """The operator (and node) the torch.onnx exporter had no function for, else the message's first line.

    The exporter's first line is a generic "Failed to convert"; the op is named further down.
    """
    text = str(exc)
    match = _NO_FUNCTION.search(text)
    if match is None:
        return first_line(exc)
    node = _NODE.search(text)
    where = f" (node {node.group(1)})" if node else ""
    return (f"no ONNX function for operator {match.group(1)}.{match.group(2)}{where}; replace it in the "
            "model or choose another target")


def verify_export(torch_model: Model, onnx_model: Model, feeds: dict[str, np.ndarray], *, atol: float) -> ExportCheck:
    torch = require("torch", extra="torch")
    from edgeopt.runtimes.sessions import open_session, resolve_settings

    with torch.no_grad():
        ref = torch_model.module(*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref.logits if hasattr(ref, "logits") else ref
    ref = (ref[0] if isinstance(ref, list | tuple) else ref).numpy()
    session = open_session(onnx_model, resolve_settings(onnx_model, threads=1))
    got = session.run(dict(zip(session.input_names, feeds.values(), strict=True)))[0]
    diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
    _, cos, _ = fidelity(got, ref) if got.shape == ref.shape else (0.0, 0.0, 0.0)
    check = ExportCheck(max_abs_diff=diff, cosine=cos, samples=len(next(iter(feeds.values()))))
    if not diff <= atol:
        raise BadInput(f"ONNX export does not match PyTorch: max abs diff {diff:.3g} > tolerance {atol:g} "
                       f"(cosine {cos:.6f})")
    return check


@register_transform(OnnxExport)
def _apply(model: Model, config: OnnxExport, ctx: TransformContext) -> Model:
    if model.format == "onnx":
        return model
    return to_onnx(model, config, data=ctx.calibration or ctx.train)[0]


EXPORT_TARGETS = ("onnx", "tflite")


def export(model: Model, *, to: str = "onnx", quantize: str = "none", data: Dataset | None = None
           ) -> tuple[Model, Any]:
    """Export ``model`` to a deployable format, verified against the source (the API of ``edgeopt export``).

    Args:
        model: a PyTorch Model (``file.py:factory``, ``.pt2``); for ``tflite`` also a float ONNX or ``.tflite``.
        to: ``onnx`` or ``tflite``.
        quantize: ``none`` for ONNX (quantize ONNX with :func:`edgeopt.quantize`); for TFLite
            ``none | dynamic | int8 | fp16``.
        data: inputs for tracing, verification and INT8 calibration; random inputs of the model's
            input shape otherwise.

    Returns:
        The exported Model (in memory; ``model.save(path)`` writes it) and its verification check.

    Example:
        >>> onnx_model, check = export(load_model("net.py:build", weights="w.pt"), to="onnx")  # doctest: +SKIP
        >>> check.max_abs_diff < 1e-4  # doctest: +SKIP
    """
    if to == "onnx":
        if quantize != "none":
            raise BadInput("export to ONNX writes FP32; quantize the ONNX model with edgeopt.quantize")
        return to_onnx(model, OnnxExport(), data=data)
    if to == "tflite":
        from edgeopt.transforms.tflite import TfliteExport, to_tflite

        return to_tflite(model, TfliteExport(quantize=quantize), data=data)
    raise BadInput(f"export target must be one of {', '.join(EXPORT_TARGETS)}, got {to!r}")
