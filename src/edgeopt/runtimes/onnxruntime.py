"""ONNX Runtime on the CPU: the default runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.deps import available, require
from edgeopt.errors import BadInput, ModelError, UnsupportedOperation, first_line
from edgeopt.measure.harness import ORT_OPT_LEVELS, ort_session_options

if TYPE_CHECKING:
    from edgeopt.model import Model



class OrtSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self.output_names, feeds)


class OnnxRuntime:
    """``options``: ``graph_optimization`` (disable|basic|extended|all, default all)."""

    name = "onnxruntime"
    formats = ("onnx",)

    def available(self) -> bool:
        return available("onnxruntime")

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> OrtSession:
        ort = require("onnxruntime", extra="core")
        opts = dict(options or {})
        if threads is not None and threads < 1:
            raise BadInput(f"threads must be >= 1, got {threads}")
        level = str(opts.pop("graph_optimization", "all"))
        if level not in ORT_OPT_LEVELS:
            raise BadInput(f"graph_optimization must be one of {list(ORT_OPT_LEVELS)}, got {level!r}")
        so = ort_session_options(ort, threads, level)  # the same options a remote device's runner uses
        if opts:
            raise BadInput(f"unknown onnxruntime option(s) {sorted(opts)}; known: graph_optimization")
        if model.format != "onnx":
            raise ModelError(f"onnxruntime runs ONNX models; {model.source} is {model.format}")
        try:
            session = ort.InferenceSession(model.serialized(), sess_options=so,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            text = first_line(exc)
            if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
                raise UnsupportedOperation(f"ONNX Runtime cannot run {model.source}: {text}") from exc
            raise ModelError(f"ONNX Runtime cannot load {model.source}: {text}") from exc
        return OrtSession(session)
