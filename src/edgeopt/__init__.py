"""edgeopt: make models smaller and faster for edge devices, and prove it by measurement.

Every technique is a transform ``Model -> Model`` configured by a frozen dataclass; every claim
is a measurement from one harness. Heavy dependencies (torch, openvino, litert, fastapi, ray)
are imported only by the functions that need them, so ``import edgeopt`` stays light.

Example:
    >>> import edgeopt
    >>> model = edgeopt.load_model("examples/digits/digits_cnn.onnx")  # doctest: +SKIP
    >>> edgeopt.benchmark(model).latency_ms["p50"]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from edgeopt._version import __version__ as __version__

# public name -> module that defines it; resolved on first access (PEP 562).
_LAZY: dict[str, str] = {
    # foundation
    "BadInput": "edgeopt.errors",
    "BenchResult": "edgeopt.measure.bench",
    "BenchSettings": "edgeopt.measure.bench",
    "BudgetNotMet": "edgeopt.errors",
    "Dataset": "edgeopt.data",
    "DeviceProfile": "edgeopt.devices",
    "EdgeoptError": "edgeopt.errors",
    "EvalResult": "edgeopt.measure.evaluate",
    "Model": "edgeopt.model",
    "TensorSpec": "edgeopt.model",
    "TrainSettings": "edgeopt.training",
    "benchmark": "edgeopt.measure.bench",
    "compare": "edgeopt.measure.bench",
    "config_from_dict": "edgeopt.transforms.config",
    "config_to_dict": "edgeopt.transforms.config",
    "evaluate": "edgeopt.measure.evaluate",
    "get_device": "edgeopt.devices",
    "list_devices": "edgeopt.devices",
    "load_data": "edgeopt.data",
    "load_model": "edgeopt.model",
    # the search: optimize, budgets, recipes (issues 7, 16)
    "Budget": "edgeopt.search.budget",
    "CandidateResult": "edgeopt.search.engine",
    "OptimizeResult": "edgeopt.search.optimize",
    "Recipe": "edgeopt.search.recipe",
    "apply_recipe": "edgeopt.search.recipe",
    "optimize": "edgeopt.search.optimize",
    # onnxruntime quantization (issue 4)
    "AutoQuantizeResult": "edgeopt.search.auto_quantize",
    "Bf16": "edgeopt.transforms.quantize",
    "DynamicInt8": "edgeopt.transforms.quantize",
    "Fp16": "edgeopt.transforms.quantize",
    "Int4WeightOnly": "edgeopt.transforms.quantize",
    "LayerSensitivity": "edgeopt.transforms.sensitivity",
    "StaticInt8": "edgeopt.transforms.quantize",
    "analyze": "edgeopt.transforms.sensitivity",
    "auto_quantize": "edgeopt.search.auto_quantize",
    "mixed_precision": "edgeopt.search.mixed_precision",
    "quantize": "edgeopt.transforms.quantize",
    # openvino + nncf (issue 4)
    "NncfInt8": "edgeopt.transforms.nncf_quantize",
    "OpenVinoRuntime": "edgeopt.runtimes.openvino",
    "nncf_quantize": "edgeopt.transforms.nncf_quantize",
    # export: ONNX, TFLite/LiteRT, Keras (issue 11)
    "ExportCheck": "edgeopt.transforms.export",
    "LiteRtRuntime": "edgeopt.runtimes.litert",
    "OnnxExport": "edgeopt.transforms.export",
    "export": "edgeopt.transforms.export",
    "TfliteCheck": "edgeopt.transforms.tflite",
    "TfliteExport": "edgeopt.transforms.tflite",
    "export_tflite": "edgeopt.transforms.tflite",
    "keras_to_tflite": "edgeopt.transforms.keras",
    "load_keras": "edgeopt.transforms.keras",
    "to_onnx": "edgeopt.transforms.export",
    "to_tflite": "edgeopt.transforms.tflite",
    # ExecuTorch export/runtime and the deployability check (issue 18)
    "CheckReport": "edgeopt.check",
    "ExecutorchCheck": "edgeopt.transforms.executorch",
    "ExecutorchExport": "edgeopt.transforms.executorch",
    "ExecutorchRuntime": "edgeopt.runtimes.executorch",
    "check": "edgeopt.check",
    "to_executorch": "edgeopt.transforms.executorch",
    # distillation + architecture catalogue (issue 6)
    "Distill": "edgeopt.transforms.distill",
    "DistillResult": "edgeopt.transforms.distill",
    "DistillText": "edgeopt.transforms.distill_text",
    "WordVocab": "edgeopt.text_data",
    "ZooEntry": "edgeopt.transforms.architectures",
    "build_architecture": "edgeopt.transforms.architectures",
    "distill": "edgeopt.report.distill",
    "distill_text": "edgeopt.report.distill",
    "halve_bert": "edgeopt.transforms.distill_text",
    "list_architectures": "edgeopt.transforms.architectures",
    "load_jsonl": "edgeopt.text_data",
    "zoo": "edgeopt.transforms.architectures",
    # pruning (issue 5)
    "PruneResult": "edgeopt.report.prune",
    "StructuredPrune": "edgeopt.transforms.prune",
    "UnstructuredPrune": "edgeopt.transforms.prune",
    "prune": "edgeopt.report.prune",
    # serve: OIP v2 inference microservice (issue 8)
    "ServeConfig": "edgeopt.serve.app",
    "ServedModel": "edgeopt.serve.app",
    "load_served": "edgeopt.serve.app",
    "run_server": "edgeopt.serve.server",
    # split (issue 9)
    "Link": "edgeopt.split.planner",
    "PipelineError": "edgeopt.errors",
    "run_split": "edgeopt.split",
    "split_model": "edgeopt.split",
    # adapt: on-device training (issue 10)
    "AdaptConfig": "edgeopt.adapt",
    "AdaptResult": "edgeopt.adapt",
    "BiasLast": "edgeopt.adapt",
    "FullFinetune": "edgeopt.adapt",
    "LastLayer": "edgeopt.adapt",
    "MemoryMeasurement": "edgeopt.adapt",
    "SparseUpdate": "edgeopt.adapt",
    "adapt_model": "edgeopt.adapt",
    "measure_training_memory": "edgeopt.adapt",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
