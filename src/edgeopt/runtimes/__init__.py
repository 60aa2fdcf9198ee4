"""Runtimes by name, imported only when asked for (OpenVINO, LiteRT and ExecuTorch are optional extras)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgeopt.errors import BadInput
from edgeopt.runtimes.base import Runtime, Session

if TYPE_CHECKING:
    from edgeopt.model import Model

# name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime": ("edgeopt.runtimes.onnxruntime", "OnnxRuntime"),
    "openvino": ("edgeopt.runtimes.openvino", "OpenVinoRuntime"),
    "litert": ("edgeopt.runtimes.litert", "LiteRtRuntime"),
    "torch": ("edgeopt.runtimes.torch_eager", "TorchEager"),
    "executorch": ("edgeopt.runtimes.executorch", "ExecutorchRuntime"),
}
_DEFAULT_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert", "torch": "torch", "executorch": "executorch"}


def runtime_names() -> list[str]:
    return list(_REGISTRY)


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; BadInput listing the known names otherwise."""
    if name not in _REGISTRY:
        raise BadInput(f"unknown runtime {name!r}; known: {', '.join(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BadInput(f"runtime {name!r} is not built into this edgeopt version") from exc
        raise
    return getattr(module, class_name)()


def runtime_for(model: Model, requested: str | None = None, *, device_runtime: str | None = None) -> Runtime:
    """Pick the runtime: the one asked for, else the model's stored hint, else the format's default.

    A device profile's runtime applies only when the model format can run on it.
    """
    if requested:
        runtime = get_runtime(requested)
    else:
        name = model.runtime_hint()
        if name is None and device_runtime and model.format in get_runtime(device_runtime).formats:
            name = device_runtime
        runtime = get_runtime(name or _DEFAULT_FOR_FORMAT[model.format])
    if model.format not in runtime.formats:
        raise BadInput(f"runtime {runtime.name} cannot run {model.format} models "
                       f"(it runs {', '.join(runtime.formats)})")
    return runtime


__all__ = ["Runtime", "Session", "get_runtime", "runtime_for", "runtime_names"]
