"""Which recipes to try for a model on a device: the search space, in one place.

Post-training recipes (quantization variants, runtime and precision choices) apply to any
ONNX model. Recipes that train (structured pruning + fine-tuning, distillation) are added only
when the model is PyTorch and torch is installed. Precisions the device profile does not
execute are left out, and so are runtimes that are not installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from edgeopt.deps import available
from edgeopt.devices import DeviceProfile
from edgeopt.model import Model
from edgeopt.search.recipe import Recipe


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def matmul_heavy(model: Model) -> bool:
    """True when most weights feed MatMul/Gemm (transformers): where INT4 weight-only pays off."""
    if model.format != "onnx":
        return False
    proto = model.onnx
    sizes = {init.name: max(1, _numel(init)) for init in proto.graph.initializer}
    matmul = sum(sizes.get(i, 0) for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input)
    total = sum(sizes.values()) or 1
    return matmul / total > 0.5 and any(n.op_type == "MatMul" for n in proto.graph.node)


def _numel(init: Any) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


def post_training_recipes(model: Model, device: DeviceProfile, *, runtimes: tuple[str, ...] | None = None
                          ) -> list[Recipe]:
    """Quantization and runtime variants for an ONNX model, filtered by what the device executes."""
    from edgeopt.transforms.quantize import DynamicInt8, Fp16, StaticInt8

    precisions = set(device.precisions)
    allowed = set(runtimes) if runtimes else {"onnxruntime", "openvino"}
    recipes: list[Recipe] = []
    if "int8" in precisions:
        recipes += [
            Recipe("int8-static-qdq-u8s8-perchannel",
                   (StaticInt8(format="qdq", per_channel=True, activation_type="u8", weight_type="s8"),),
                   needs=("calibration",)),
            Recipe("int8-static-qdq-s8s8-perchannel",
                   (StaticInt8(format="qdq", per_channel=True, activation_type="s8", weight_type="s8"),),
                   needs=("calibration",)),
            Recipe("int8-static-qoperator-u8s8-perchannel",
                   (StaticInt8(format="qoperator", per_channel=True, activation_type="u8", weight_type="s8"),),
                   needs=("calibration",)),
            Recipe("int8-static-qdq-u8s8-pertensor",
                   (StaticInt8(format="qdq", per_channel=False, activation_type="u8", weight_type="s8"),),
                   needs=("calibration",)),
            Recipe("int8-static-qdq-u8s8-perchannel-percentile",
                   (StaticInt8(format="qdq", per_channel=True, activation_type="u8", weight_type="s8",
                               calibration="percentile"),),
                   needs=("calibration",)),
            Recipe("int8-dynamic", (DynamicInt8(),)),
        ]
    if "fp16" in precisions:
        recipes.append(Recipe("fp16", (Fp16(),)))
    if "int4" in precisions and matmul_heavy(model):
        from edgeopt.transforms.quantize import Int4WeightOnly

        recipes.append(Recipe("int4-weight-only", (Int4WeightOnly(),)))
    if "openvino" in allowed and _module_exists("edgeopt.runtimes.openvino") and available("openvino"):
        recipes.append(Recipe("openvino-f32", (), runtime="openvino", runtime_options={"precision": "f32"}))
        if "bf16" in precisions:
            recipes.append(Recipe("openvino-bf16", (), runtime="openvino", runtime_options={"precision": "bf16"}))
        if "int8" in precisions and _module_exists("edgeopt.transforms.nncf_quantize") and available("nncf"):
            from edgeopt.transforms.nncf_quantize import NncfInt8

            recipes.append(Recipe("openvino-nncf-int8", (NncfInt8(),), runtime="openvino", needs=("calibration",)))
    if "onnxruntime" not in allowed:
        recipes = [r for r in recipes if r.runtime != "onnxruntime"]
    return recipes


def training_recipes(model: Model, device: DeviceProfile) -> list[Recipe]:
    """Recipes that train (pruning + fine-tuning, then INT8), for PyTorch models with torch installed."""
    if model.format != "torch" or not available("torch") or not _module_exists("edgeopt.transforms.prune"):
        return []
    from edgeopt.transforms.export import OnnxExport
    from edgeopt.transforms.quantize import StaticInt8

    prune_mod = importlib.import_module("edgeopt.transforms.prune")
    structured = getattr(prune_mod, "StructuredPrune", None)
    if structured is None:
        return []
    recipes: list[Recipe] = []
    int8 = "int8" in device.precisions
    for ratio in (0.3, 0.5):
        steps: tuple[Any, ...] = (structured(ratio=ratio), OnnxExport())
        recipes.append(Recipe(f"prune-{int(ratio * 100)}-finetune", steps, needs=("torch", "train")))
        if int8:
            recipes.append(Recipe(f"prune-{int(ratio * 100)}-finetune-int8", (*steps, StaticInt8()),
                                  needs=("torch", "train", "calibration")))
    return recipes


def default_recipes(model: Model, device: DeviceProfile, *, runtimes: tuple[str, ...] | None = None
                    ) -> list[Recipe]:
    """The recipes ``optimize`` tries for ``model`` on ``device``."""
    return training_recipes(model, device) + post_training_recipes(model, device, runtimes=runtimes)
