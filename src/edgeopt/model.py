"""Model: one loaded artifact (ONNX, PyTorch, torch.export, TFLite, ExecuTorch) with what every command needs.

A Model knows its format, its inputs and outputs (name, shape, dtype), its size on disk and a
content hash (the search cache keys on it), and the ``edgeopt.*`` metadata that says which
runtime and settings it was chosen for. Transforms return new Models; nothing here mutates one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgeopt.deps import require
from edgeopt.errors import ModelError, first_line

if TYPE_CHECKING:
    import onnx

Format = Literal["onnx", "torch", "tflite", "executorch"]
# One sample of at most this many values (256 MB as float32); more is a typo or a hostile file.
MAX_SAMPLE_VALUES = 2**26
Dim = int | str | None
METADATA_PREFIX = "edgeopt."

_ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (an int, a symbolic name, or None per dimension) and numpy dtype name."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def fixed_shape(self, batch: int) -> tuple[int, ...] | None:
        """The concrete shape for a given batch, or None when another dimension is dynamic."""
        dims: list[int] = []
        for i, d in enumerate(self.shape):
            if i == 0 and not isinstance(d, int):
                dims.append(batch)
            elif isinstance(d, int) and d > 0:
                dims.append(d)
            else:
                return None
        return tuple(dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class Model:
    """A loaded model. Build with :func:`load_model` or the ``from_*`` constructors."""

    def __init__(
        self,
        *,
        format: Format,
        source: str,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        path: Path | None = None,
        onnx_proto: onnx.ModelProto | None = None,
        payload: bytes | None = None,
        module: Any = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.format: Format = format
        self.source = source
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.path = path
        self._proto = onnx_proto
        self._payload = payload
        self._module = module
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return f"Model(format={self.format!r}, source={self.source!r}, size_bytes={self.size_bytes})"

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, *, source: str, path: Path | None = None) -> Model:
        """Wrap an in-memory ONNX ModelProto (e.g. the output of a transform)."""
        inputs, outputs = _onnx_io(proto)
        metadata = {p.key: p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}
        return cls(format="onnx", source=source, inputs=inputs, outputs=outputs, path=path,
                   onnx_proto=proto, metadata=metadata)

    @classmethod
    def from_torch(cls, module: Any, *, source: str, input_shape: tuple[int, ...] | None = None,
                   path: Path | None = None) -> Model:
        """Wrap an nn.Module; ``input_shape`` (with batch) lets commands build example inputs."""
        inputs = [TensorSpec("input", ("batch", *input_shape[1:]), "float32")] if input_shape else []
        return cls(format="torch", source=source, inputs=inputs, outputs=[], path=path, module=module)

    @classmethod
    def from_tflite(cls, payload: bytes, *, source: str, path: Path | None = None) -> Model:
        inputs, outputs = _tflite_io(payload)
        return cls(format="tflite", source=source, inputs=inputs, outputs=outputs, path=path,
                   payload=payload)

    @classmethod
    def from_executorch(cls, payload: bytes, *, source: str, path: Path | None = None,
                        input_names: list[str] | None = None, output_names: list[str] | None = None) -> Model:
        """Wrap the bytes of an ExecuTorch ``.pte`` program; I/O shapes come from its ``forward`` method."""
        inputs, outputs = _executorch_io(payload, source, input_names, output_names)
        return cls(format="executorch", source=source, inputs=inputs, outputs=outputs, path=path,
                   payload=payload)

    # -- content ----------------------------------------------------------------------------
    @property
    def onnx(self) -> onnx.ModelProto:
        """The ONNX ModelProto; do not mutate it (copy with ``onnx.ModelProto.CopyFrom``)."""
        if self._proto is None:
            raise ModelError(f"{self.source} is a {self.format} model, not ONNX; export it first "
                             "with: edgeopt export MODEL --to onnx")
        return self._proto

    @property
    def module(self) -> Any:
        """The torch nn.Module for PyTorch models."""
        if self._module is None:
            raise ModelError(
                f"{self.source} is a {self.format} model; this needs a PyTorch model given as "
                "path/to/file.py:factory with --weights state_dict.pt (or a .pt2 torch.export archive)")
        return self._module

    def serialized(self) -> bytes:
        """The bytes a runtime loads (ONNX, TFLite flatbuffer or ExecuTorch program); cached."""
        if self._payload is None:
            if self._proto is not None:
                self._payload = self._proto.SerializeToString()
            elif self._module is not None:
                torch = require("torch", extra="torch")
                buf = io.BytesIO()
                torch.save(self._module.state_dict(), buf)
                self._payload = buf.getvalue()
            else:
                raise ModelError(f"{self.source} has no serializable content")
        return self._payload

    @property
    def size_bytes(self) -> int:
        """Bytes on disk when saved (for PyTorch: the state_dict's bytes)."""
        if self.format == "onnx" and self.path is not None and _has_external_data(self.onnx):
            return _onnx_size_with_external(self.path, self.onnx)
        return len(self.serialized())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.serialized()).hexdigest()

    def runtime_hint(self) -> str | None:
        """The runtime this model was chosen for (stored in metadata), if any."""
        return self.metadata.get(METADATA_PREFIX + "runtime")

    # -- derived models ---------------------------------------------------------------------
    def with_metadata(self, **values: str) -> Model:
        """A copy whose ONNX metadata_props carry ``edgeopt.<key>=<value>`` for each value."""
        onnx_mod = require("onnx", extra="core")
        proto = onnx_mod.ModelProto()
        proto.CopyFrom(self.onnx)
        keep = [(p.key, p.value) for p in proto.metadata_props]
        del proto.metadata_props[:]
        merged = dict(keep)
        merged.update({METADATA_PREFIX + k: str(v) for k, v in values.items()})
        for key, value in merged.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        return Model.from_onnx(proto, source=self.source, path=None)

    def save(self, path: str | os.PathLike[str]) -> Model:
        """Write atomically to ``path`` (.onnx, .tflite, .pte, or a state_dict .pt) and return the saved Model."""
        from edgeopt.fileio import write_bytes

        target = Path(path)
        write_bytes(target, self.serialized())
        saved = Model(format=self.format, source=str(target), inputs=self.inputs, outputs=self.outputs,
                      path=target, onnx_proto=self._proto, payload=self._payload, module=self._module,
                      metadata=self.metadata)
        return saved

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "metadata": dict(self.metadata),
        }


# -- loading ------------------------------------------------------------------------------------
def load_model(spec: str | os.PathLike[str] | Model, *, weights: str | os.PathLike[str] | None = None,
               trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None) -> Model:
    """Load a model from a path or a ``file.py:factory`` spec.

    Args:
        spec: ``model.onnx``, ``model.tflite``, ``model.pte`` (ExecuTorch), ``program.pt2`` (torch.export), or
            ``path/to/file.py:factory`` (a function or class returning an nn.Module).
        weights: a state_dict file (.pt/.pth) for a ``file.py:factory`` model; loaded with
            ``weights_only=True``.
        trust_pickle: allow loading a full pickled module (runs code from the file).
        input_shape: the input shape with batch for PyTorch models, e.g. ``(1, 3, 224, 224)``;
            by default taken from the factory file's ``INPUT_SHAPE`` when it defines one.

    Raises:
        ModelError: missing, corrupt or unsupported files, factories that raise, weights that
            do not match.

    Example:
        >>> m = load_model("examples/digits/digits_cnn.onnx")  # doctest: +SKIP
        >>> m.inputs[0].shape
        ('batch', 1, 32, 32)
    """
    if isinstance(spec, Model):
        return spec
    text = str(spec)
    factory_spec = _split_factory(text)
    if factory_spec is not None:
        return _load_torch_factory(*factory_spec, weights=weights, trust_pickle=trust_pickle,
                                   input_shape=input_shape)
    path = Path(text)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; give a model file (.onnx, .tflite, .pte, .pt2) or file.py:factory")
    suffix = path.suffix.lower()
    if weights is not None and suffix not in (".py",):
        raise ModelError(f"--weights only applies to a PyTorch model given as file.py:factory, not {path.name}")
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".tflite":
        return check_input_sizes(Model.from_tflite(path.read_bytes(), source=str(path), path=path))
    if suffix == ".pte":
        return check_input_sizes(Model.from_executorch(path.read_bytes(), source=str(path), path=path))
    if suffix == ".pt2":
        return check_input_sizes(_load_pt2(path, input_shape, trust_pickle=trust_pickle))
    if suffix in (".pt", ".pth"):
        if not trust_pickle:
            raise ModelError(
                f"{path.name} is a pickled PyTorch file; loading a full module runs code from it. "
                "Give the architecture as file.py:factory with --weights, or pass --trust-pickle if you trust the file")
        return _load_pickled_module(path, input_shape)
    if suffix == ".py":
        raise ModelError(f"name the factory in {path.name}: use {path}:function_name")
    if suffix in (".h5", ".keras"):
        raise ModelError(f"{path.name} is a Keras model: convert it with edgeopt export {path} --to tflite")
    raise ModelError(f"unsupported model file {path.name}: expected .onnx, .tflite, .pte, .pt2 or file.py:factory")


def _split_factory(text: str) -> tuple[Path, str] | None:
    if ".py:" not in text:
        return None
    file_part, _, factory = text.rpartition(":")
    if not file_part.endswith(".py") or not factory.isidentifier():
        raise ModelError(f"bad PyTorch model spec {text!r}: expected path/to/file.py:factory")
    return Path(file_part), factory


def _load_onnx(path: Path) -> Model:
    onnx = require("onnx", extra="core")
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{path} is not a valid ONNX file ({type(exc).__name__}: {first_line(exc)}); "
                         "re-export it") from exc
    except MemoryError:
        raise ModelError(f"{path} does not fit in this machine's memory") from None
    except Exception as exc:  # onnx.checker.ValidationError: external data outside the folder, missing, a symlink
        raise ModelError(f"{path}: its external data cannot be loaded safely: {first_line(exc)}") from exc
    try:
        onnx.checker.check_model(proto, full_check=False)
    except Exception as exc:  # onnx raises several checker error types
        raise ModelError(f"{path} is not a valid ONNX model: {first_line(exc)}; re-export it") from exc
    if len(proto.graph.node) == 0:
        raise ModelError(f"{path} is an ONNX file with an empty graph; re-export the model")
    return check_input_sizes(Model.from_onnx(proto, source=str(path), path=path))


def check_input_sizes(model: Model) -> Model:
    """Refuse inputs that declare more values per sample than any edge model takes (a 3x60000x60000 image)."""
    for spec in model.inputs:
        fixed = [d for d in spec.shape[1:] if isinstance(d, int) and d > 0]
        values = math.prod(fixed)
        if values > MAX_SAMPLE_VALUES:
            dims = "x".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            raise ModelError(f"{model.source}: input {spec.name!r} declares {dims}, {values:,} values per sample; "
                             f"edgeopt handles at most {MAX_SAMPLE_VALUES:,} (e.g. 3x4096x4096)")
    return model


def _onnx_io(proto: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    initializers = {init.name for init in proto.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        dims: list[Dim] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return TensorSpec(value.name, tuple(dims), _ONNX_DTYPES.get(ttype.elem_type, f"onnx:{ttype.elem_type}"))

    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in proto.graph.output]
    return inputs, outputs


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(init.data_location == 1 for init in proto.graph.initializer)


def _onnx_size_with_external(path: Path, proto: onnx.ModelProto) -> int:
    files = {path}
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.exists())


def _tflite_io(payload: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import numpy as np

    litert = require("ai_edge_litert.interpreter", extra="litert")
    try:
        interp = litert.Interpreter(model_content=payload)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"not a valid TFLite model: {first_line(exc)}") from exc

    def spec(detail: dict[str, Any]) -> TensorSpec:
        shape = tuple(int(d) for d in detail["shape"])
        # Quantized int8/uint8/int16 IO is fed and read as float32: the LiteRT session (de)quantizes.
        scale = detail.get("quantization", (0.0, 0))[0]
        dtype = "float32" if scale and detail["dtype"] in (np.int8, np.uint8, np.int16) else detail["dtype"].__name__
        return TensorSpec(detail["name"], shape, str(dtype))

    return ([spec(d) for d in interp.get_input_details()], [spec(d) for d in interp.get_output_details()])


def _executorch_io(payload: bytes, source: str, input_names: list[str] | None,
                   output_names: list[str] | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from edgeopt.runtimes.executorch import load_program, method_io

    in_specs, out_specs = method_io(load_program(payload, source))
    in_names = input_names if input_names and len(input_names) == len(in_specs) else (
        ["input"] if len(in_specs) == 1 else [f"input_{i}" for i in range(len(in_specs))])
    out_names = output_names if output_names and len(output_names) == len(out_specs) else (
        ["output"] if len(out_specs) == 1 else [f"output_{i}" for i in range(len(out_specs))])
    return ([TensorSpec(n, s, d) for n, (s, d) in zip(in_names, in_specs, strict=True)],
            [TensorSpec(n, s, d) for n, (s, d) in zip(out_names, out_specs, strict=True)])


def _import_file(path: Path) -> Any:
    if not path.exists():
        raise ModelError(f"model definition file not found: {path}")
    name = f"edgeopt_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _load_torch_factory(path: Path, factory: str, *, weights: str | os.PathLike[str] | None,
                        trust_pickle: bool, input_shape: tuple[int, ...] | None) -> Model:
    torch = require("torch", extra="torch")
    user_module = _import_file(path)
    build = getattr(user_module, factory, None)
    if build is None or not callable(build):
        raise ModelError(f"{path} has no callable named {factory!r}")
    try:
        module = build()
    except Exception as exc:
        raise ModelError(f"factory {path.name}:{factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"factory {path.name}:{factory} returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = load_state_dict(weights, trust_pickle=trust_pickle)
        apply_state_dict(module, state, source=str(weights))
    module.eval()
    shape = input_shape or getattr(user_module, "INPUT_SHAPE", None)
    source = f"{path}:{factory}"
    return Model.from_torch(module, source=source, input_shape=tuple(shape) if shape else None)


def load_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Any]:
    """Read a state_dict with ``weights_only=True`` (or full unpickling when trusted)."""
    torch = require("torch", extra="torch")
    p = Path(path)
    if not p.exists():
        raise ModelError(f"weights file not found: {p}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        if not trust_pickle and "weights_only" in str(exc):
            raise ModelError(f"{p.name} holds pickled Python objects, not a plain state_dict; save "
                             "model.state_dict() instead, or pass --trust-pickle if you trust the file") from exc
        raise ModelError(f"cannot read weights {p}: {type(exc).__name__}: {first_line(exc)}") from exc
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise ModelError(f"{p.name} holds a {type(obj).__name__}, not a state_dict")


def apply_state_dict(module: Any, state: Mapping[str, Any], *, source: str) -> None:
    """Load ``state`` strictly into ``module``, turning mismatches into one readable line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)} (e.g. {mismatched[0]})")
        raise ModelError(f"weights {source} do not match the model: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def _load_pt2(path: Path, input_shape: tuple[int, ...] | None, *, trust_pickle: bool = False) -> Model:
    from edgeopt.pt2 import input_specs, load_exported_program, program_module

    program = load_exported_program(path, trust_pickle=trust_pickle)
    module = program_module(program)
    if input_shape is not None:
        return Model.from_torch(module, source=str(path), input_shape=input_shape, path=path)
    return Model(format="torch", source=str(path), inputs=input_specs(program), outputs=[], path=path,
                 module=module)


def _load_pickled_module(path: Path, input_shape: tuple[int, ...] | None) -> Model:
    torch = require("torch", extra="torch")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, torch.nn.Module):
        raise ModelError(f"{path.name} holds a {type(obj).__name__}, not a full nn.Module; "
                         "give the architecture as file.py:factory with --weights")
    obj.eval()
    return Model.from_torch(obj, source=str(path), input_shape=input_shape, path=path)
