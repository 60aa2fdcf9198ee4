"""LiteRT (TensorFlow Lite) on the CPU: ``.tflite`` models through ``ai_edge_litert``'s Interpreter.

Why a session does more than call ``invoke``: a fully integer-quantized model takes and returns
int8 tensors. Callers (bench, eval, serve) pass and receive float32 everywhere else, so the session
quantizes inputs and dequantizes outputs with the tensors' own scale and zero point. The
interpreter's tensors are allocated once and re-allocated only when the batch size changes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.deps import available, require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation, first_line

if TYPE_CHECKING:
    from edgeopt.model import Model

KNOWN_OPTIONS = ("use_xnnpack",)
_INTEGER_IO = (np.int8, np.uint8, np.int16)


def quantization_of(detail: dict[str, Any]) -> tuple[float, int] | None:
    """(scale, zero_point) of an integer IO tensor that carries quantization, else None."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if detail["dtype"] in _INTEGER_IO and scale:
        return float(scale), int(zero_point)
    return None


class LiteRtSession:
    """One LiteRT Interpreter with tensors allocated once; float32 in and out for quantized IO.

    ``run`` holds a lock: an Interpreter is not thread-safe.
    """

    def __init__(self, interpreter: Any, source: str) -> None:
        self._interp = interpreter
        self._source = source
        self._inputs = interpreter.get_input_details()
        self._outputs = interpreter.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._in_quant = [quantization_of(d) for d in self._inputs]
        self._out_quant = [quantization_of(d) for d in self._outputs]
        self._exported = [tuple(int(s) for s in d["shape"]) for d in self._inputs]
        self._shapes = list(self._exported)
        self._unresizable: set[tuple[tuple[int, ...], ...]] = set()
        self._lock = threading.Lock()
        self.details = {"quantized_inputs": sum(q is not None for q in self._in_quant),
                        "quantized_outputs": sum(q is not None for q in self._out_quant)}

    def _to_input(self, i: int, array: np.ndarray) -> np.ndarray:
        detail, quant = self._inputs[i], self._in_quant[i]
        dtype = np.dtype(detail["dtype"])
        if quant is not None and array.dtype != dtype:
            scale, zero_point = quant
            info = np.iinfo(dtype)
            q = np.round(np.asarray(array, dtype=np.float32) / scale) + zero_point
            return np.clip(q, info.min, info.max).astype(dtype)
        return np.ascontiguousarray(array, dtype=dtype)

    def _resize(self, arrays: list[np.ndarray]) -> bool:
        """Fit the interpreter to the feed shapes; False when the graph is fixed to batch 1 (split then)."""
        shapes = [tuple(a.shape) for a in arrays]
        if shapes == self._shapes:
            return True
        if tuple(shapes) in self._unresizable:
            return False
        try:
            for detail, shape in zip(self._inputs, shapes, strict=True):
                self._interp.resize_tensor_input(detail["index"], list(shape), strict=False)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            # e.g. a Reshape with the batch baked in: go back to the exported shapes.
            for detail, shape in zip(self._inputs, self._exported, strict=True):
                self._interp.resize_tensor_input(detail["index"], list(shape), strict=False)
            self._interp.allocate_tensors()
            self._shapes = list(self._exported)
            if not all(s[0] == 1 and len(s) == len(g) and s[1:] == g[1:]
                       for s, g in zip(self._exported, shapes, strict=True)):
                raise DataError(f"LiteRT cannot run {self._source} with input shapes {shapes}: "
                                f"{first_line(exc)}") from exc
            self._unresizable.add(tuple(shapes))
            return False
        self._shapes = shapes
        return True

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self._inputs, arrays, strict=True):
            self._interp.set_tensor(detail["index"], array)
        try:
            self._interp.invoke()
        except RuntimeError as exc:
            raise ModelError(f"LiteRT failed to run {self._source}: {first_line(exc)}") from exc
        return [self._interp.get_tensor(d["index"]) for d in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            arrays = [self._to_input(i, feeds[name]) for i, name in enumerate(self.input_names)]
        except KeyError as exc:
            raise DataError(f"missing input {exc.args[0]!r}; the model takes {self.input_names}") from exc
        with self._lock:
            if self._resize(arrays):
                raw = self._invoke(arrays)
            else:  # a graph fixed to batch 1 runs a batch one sample at a time
                rows = [self._invoke([a[i:i + 1] for a in arrays]) for i in range(len(arrays[0]))]
                raw = [np.concatenate(parts) for parts in zip(*rows, strict=True)]
        out = []
        for array, quant in zip(raw, self._out_quant, strict=True):
            if quant is not None:
                scale, zero_point = quant
                array = (array.astype(np.float32) - zero_point) * np.float32(scale)
            out.append(array)
        return out


class LiteRtRuntime:
    """LiteRT CPU runtime for ``.tflite`` models.

    ``options``: ``use_xnnpack`` (bool, default True: LiteRT's default CPU delegate; False runs the
    reference kernels, e.g. to check a delegate problem).

    Example:
        >>> session = LiteRtRuntime().load(load_model("m.tflite"), threads=1)  # doctest: +SKIP
        >>> session.run({session.input_names[0]: x})[0].shape  # doctest: +SKIP
    """

    name = "litert"
    formats = ("tflite",)

    def available(self) -> bool:
        return available("ai_edge_litert")

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> LiteRtSession:
        litert = require("ai_edge_litert.interpreter", extra="litert")
        opts = dict(options or {})
        if threads is not None and threads < 1:
            raise BadInput(f"threads must be >= 1, got {threads}")
        use_xnnpack = opts.pop("use_xnnpack", True)
        if not isinstance(use_xnnpack, bool):
            raise BadInput(f"litert option use_xnnpack must be true or false, got {use_xnnpack!r}")
        if opts:
            raise BadInput(f"unknown litert option(s) {sorted(opts)}; known: {', '.join(KNOWN_OPTIONS)}")
        if model.format != "tflite":
            raise ModelError(f"LiteRT runs .tflite models; {model.source} is {model.format}")
        kwargs: dict[str, Any] = {"model_content": model.serialized(), "num_threads": threads or 1}
        if not use_xnnpack:
            kwargs["experimental_op_resolver_type"] = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interpreter = litert.Interpreter(**kwargs)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            text = first_line(exc)
            if "op" in text.lower() and ("unsupported" in text.lower() or "didn't find" in text.lower()
                                         or "not supported" in text.lower()):
                raise UnsupportedOperation(f"LiteRT cannot run {model.source}: {text}") from exc
            raise ModelError(f"LiteRT cannot load {model.source}: {text}") from exc
        return LiteRtSession(interpreter, model.source)
