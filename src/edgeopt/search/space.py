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


def static_recipe(name: str, **fields: Any) -> Recipe:
    from edgeopt.transforms.quantize import StaticInt8

    return Recipe(name, (StaticInt8(**fields),), needs=("calibration",))


def post_training_recipes(model: Model, device: DeviceProfile, *, runtimes: tuple[str, ...] | None = None
                          ) -> list[Recipe]:
    """Quantization and runtime variants of an ONNX model: INT8 formats x scales x signedness, dynamic,
    FP16, INT4 (MatMul-heavy models), OpenVINO f32/bf16/INT8; filtered by what the device executes.

    Used by both ``optimize`` and ``quantize --mode auto``, so the two search the same space.
    """
    from edgeopt.transforms.quantize import DynamicInt8, Fp16, Int4WeightOnly, StaticInt8

    precisions = set(device.precisions)
    allowed = set(runtimes) if runtimes else {"onnxruntime", "openvino"}
    if device.ssh:  # a remote device's runner runs ONNX Runtime only
        allowed &= {"onnxruntime"}
    recipes: list[Recipe] = []
    if "onnxruntime" in allowed:
        if "int8" in precisions:
            recipes += [
                static_recipe("int8-qdq-u8s8-perchannel", format="qdq", per_channel=True),
                static_recipe("int8-qdq-u8s8-pertensor", format="qdq", per_channel=False),
                static_recipe("int8-qdq-s8s8-perchannel", format="qdq", per_channel=True, activation_type="s8"),
                static_recipe("int8-qdq-s8s8-perchannel-symmetric", format="qdq", per_channel=True, activation_type="s8",
                              symmetric_activations=True),
                static_recipe("int8-qoperator-u8s8-perchannel", format="qoperator", per_channel=True),
                static_recipe("int8-qoperator-u8s8-pertensor", format="qoperator", per_channel=False),
                Recipe("int8-dynamic", (DynamicInt8(),)),
            ]
        if "fp16" in precisions:
            recipes.append(Recipe("fp16", (Fp16(),)))
        if "int4" in precisions and matmul_heavy(model):
            recipes.append(Recipe("int4-weight-only", (Int4WeightOnly(),)))
    if "openvino" in allowed and _module_exists("edgeopt.runtimes.openvino") and available("openvino"):
        recipes.append(Recipe("openvino-f32", (), runtime="openvino", runtime_options={"precision": "f32"}))
        if "bf16" in precisions:
            recipes.append(Recipe("openvino-bf16", (), runtime="openvino", runtime_options={"precision": "bf16"}))
        if "int8" in precisions:
            # OpenVINO fuses ORT's QDQ pairs into its own INT8 kernels, often faster than ORT's
            recipes.append(Recipe("int8-qdq-u8s8-perchannel-openvino", (StaticInt8(),), runtime="openvino",
                                  needs=("calibration",)))
            if _module_exists("edgeopt.transforms.nncf_quantize") and available("nncf"):
                from edgeopt.transforms.nncf_quantize import NncfInt8

                recipes.append(Recipe("openvino-nncf-int8", (NncfInt8(),), runtime="openvino",
                                      needs=("calibration",)))
    return recipes


def weights_per_tensor(recipes: list[Recipe]) -> list[Recipe]:
    """The recipes for a target without per-channel INT8 weight scales (many NPUs and DSPs): every
    per-channel step becomes per-tensor (renamed), duplicates go, and NNCF's INT8 (per-channel
    weights, not configurable here) is left out."""
    import dataclasses

    out: list[Recipe] = []
    seen: set[str] = set()
    for recipe in recipes:
        if any(type(s).__name__ in ("NncfInt8", "NncfWeightsInt8") for s in recipe.steps):
            continue
        steps = tuple(dataclasses.replace(s, per_channel=False) if getattr(s, "per_channel", False) else s
                      for s in recipe.steps)
        changed = dataclasses.replace(recipe, name=recipe.name.replace("perchannel", "pertensor"), steps=steps)
        if changed.key() not in seen:
            seen.add(changed.key())
            out.append(changed)
    return out


# SmoothQuant strengths auto builds for transformers; the judge on held-out data picks among them.
SMOOTHQUANT_ALPHAS = (0.5, 0.75)
# Block sizes of the INT8 weight-only MatMulNBits variants (weights and run-time activation scales per
# block along K): smaller is more faithful, larger is faster.
INT8_WEIGHT_BLOCKS = (32, 64)
# OpenVINO's run-time activation quantization of compressed-weight models: one scale per this many
# values (None: OpenVINO's default, 32 on x86 CPUs). Measured on all-MiniLM-L6-v2, 1 thread: 32 ->
# 0.59x FP32 p50, cosine 0.9994; 64 -> 0.56x, 0.9992; 128 -> 0.53x, 0.9989; 0 (off) -> 0.96x, 0.9997.
OPENVINO_DQ_GROUPS = (None, 64, 128)
# The same INT8 weights after SmoothQuant of the LayerNorm outputs (at SMOOTHQUANT_ALPHAS, folded into the
# LayerNorms: no op added in front of the MatMuls), timed with these groups: smoothing takes BERT's outlier
# channels out of the run-time groups. Measured on all-MiniLM-L6-v2 (held-out sentences, 1 thread): groups
# of 128: mean cosine 0.9989 -> 0.9995 (alpha 0.5) at the same p50 (OpenVINO runs as many ops as before).
OPENVINO_SMOOTH_DQ_GROUPS = (64, 128)
# The smoothed INT8 weights with Hessian-aware rounding (transforms/weight_rounding.py), at these SmoothQuant
# strengths and groups: the rounding halves the weights' error, smaller groups shrink the activations'. On
# all-MiniLM-L6-v2 (434 real sentences; expected plain nearest-neighbour agreement, mean of three sets):
# alpha 0.5 groups of 128 / 64 / 32: 0.980 / 0.983 / 0.985 (unrounded at 128: 0.977); alpha 0.6: 0.981 / 0.983;
# 0.3-0.4 lower. Groups of 64 timed 3-9 % behind 128 (within 5 % the speed tie goes to the more faithful),
# 32 about 20 % behind (0.45x FP32 p50 against 0.37x).
ROUNDED_SMOOTHQUANT_ALPHAS = (0.5, 0.6)
OPENVINO_ROUNDED_DQ_GROUPS = (32, 64, 128)


# Recipes whose outputs are those of another recipe (a float-exact graph rewrite, e.g. ORT's transformer
# fusions, before the same quantization): auto builds them only when that recipe meets the budget.
SAME_OUTPUTS_AS = {"int8-dynamic-perchannel-fused": "int8-dynamic-perchannel"}


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def transformer_recipes(model: Model, device: DeviceProfile, *, runtimes: tuple[str, ...] | None = None
                        ) -> list[Recipe]:
    """Quantization variants for transformer graphs (see :mod:`edgeopt.transforms.transformer`).

    The CNN space (static INT8 of every operator, per-tensor activations) destroys transformers, so
    these keep Softmax, LayerNorm, GELU and the residual stream in float: ONNX Runtime's dynamic
    INT8 with its defaults (the peer baseline) and with per-channel weights; the same after
    SmoothQuant at a few strengths; after ONNX Runtime's transformer fusions; static INT8 of the
    MatMul inputs only (U8 activations; S8 too off x86, where ONNX Runtime's S8S8 MatMul was
    measured 2.4x slower than FP32); INT8 block-wise weights with block-wise run-time activation
    quantization (MatMulNBits) and INT8 embeddings; INT4 weight-only; NNCF's transformer mode
    (SmoothQuant inside) and NNCF's INT8 weight compression for OpenVINO, with a few group sizes of
    OpenVINO's run-time activation quantization (built once, timed with each setting), alone and after
    SmoothQuant of the LayerNorm outputs (folded into the LayerNorms; it moves the outlier channels
    that coarsen those run-time groups into the per-channel INT8 weights).
    """
    from edgeopt.transforms.quantize import DynamicInt8, Int4WeightOnly, Int8WeightOnly
    from edgeopt.transforms.smooth_quant import SmoothQuant
    from edgeopt.transforms.transformer import TransformerFusion

    precisions = set(device.precisions)
    allowed = set(runtimes) if runtimes else {"onnxruntime", "openvino"}
    recipes: list[Recipe] = []
    if "onnxruntime" in allowed:
        if "int8" in precisions:
            recipes += [
                Recipe("int8-dynamic", (DynamicInt8(),)),
                Recipe("int8-dynamic-perchannel", (DynamicInt8(per_channel=True),)),
                *[Recipe(f"int8-dynamic-perchannel-smoothquant-{a:g}", (SmoothQuant(alpha=a),
                                                                         DynamicInt8(per_channel=True)),
                         needs=("calibration",)) for a in SMOOTHQUANT_ALPHAS],
                Recipe("int8-dynamic-perchannel-fused", (TransformerFusion(), DynamicInt8(per_channel=True))),
                static_recipe("int8-qdq-u8s8-perchannel-matmul", per_channel=True, op_types=("MatMul",)),
                *([] if _x86() else [static_recipe("int8-qdq-s8s8-perchannel-matmul", per_channel=True,
                                                   activation_type="s8", op_types=("MatMul",))]),
                *[Recipe(f"int8-weight-only-block{b}", (Int8WeightOnly(block_size=b),)) for b in INT8_WEIGHT_BLOCKS],
            ]
        if "int4" in precisions:
            recipes.append(Recipe("int4-weight-only", (Int4WeightOnly(),)))
    if "openvino" in allowed and "int8" in precisions and _module_exists("edgeopt.runtimes.openvino") \
            and available("openvino") and available("nncf"):
        from edgeopt.transforms.nncf_quantize import NncfInt8, NncfWeightsInt8

        recipes.append(Recipe("openvino-f32", (), runtime="openvino", runtime_options={"precision": "f32"}))
        recipes.append(Recipe("openvino-nncf-int8-transformer", (NncfInt8(model_type="transformer", subset_size=64),),
                              runtime="openvino", needs=("calibration",)))
        for group in OPENVINO_DQ_GROUPS:
            options: dict[str, Any] = {"precision": "f32"}
            if group is not None:
                options["dynamic_quantization_group_size"] = group
            recipes.append(Recipe("openvino-nncf-int8-weights" + (f"-dq{group}" if group is not None else ""),
                                  (NncfWeightsInt8(mode="int8_asym"),), runtime="openvino", runtime_options=options))
        for alpha in SMOOTHQUANT_ALPHAS:
            for group in OPENVINO_SMOOTH_DQ_GROUPS:
                recipes.append(Recipe(f"openvino-nncf-int8-weights-smoothquant-{alpha:g}-dq{group}",
                                      (SmoothQuant(alpha=alpha, placement="layernorm"),
                                       NncfWeightsInt8(mode="int8_asym")),
                                      runtime="openvino", needs=("calibration",),
                                      runtime_options={"precision": "f32", "dynamic_quantization_group_size": group}))
        for alpha in ROUNDED_SMOOTHQUANT_ALPHAS:
            for group in OPENVINO_ROUNDED_DQ_GROUPS:
                recipes.append(Recipe(f"openvino-nncf-int8-weights-smoothquant-{alpha:g}-rounded-dq{group}",
                                      (SmoothQuant(alpha=alpha, placement="layernorm"),
                                       NncfWeightsInt8(mode="int8_asym", weight_rounding=True)),
                                      runtime="openvino", needs=("calibration",),
                                      runtime_options={"precision": "f32", "dynamic_quantization_group_size": group}))
    return recipes


def training_recipes(model: Model, device: DeviceProfile, *, epochs: int = 15) -> list[Recipe]:
    """Recipes that train, for PyTorch models with torch installed: structured pruning + fine-tuning
    (distilling from the original), and distillation into a catalogue student at least 2x smaller;
    each also followed by static INT8 when the device runs INT8.

    A distill step chooses as ``edgeopt distill`` does (:mod:`edgeopt.search.distill_choice`): the
    labels-only student, the temperature x alpha grid (and a teacher assistant for a 10x gap),
    best on the validation split; it is trained once and reused by its INT8 variant."""
    if model.format != "torch" or not available("torch") or not _module_exists("edgeopt.transforms.prune"):
        return []
    from edgeopt.training import TrainSettings
    from edgeopt.transforms.export import OnnxExport
    from edgeopt.transforms.prune import StructuredPrune
    from edgeopt.transforms.quantize import StaticInt8

    int8 = "int8" in device.precisions
    recipes: list[Recipe] = []
    for ratio in (0.3, 0.5):
        prune = StructuredPrune(ratio=ratio, train=TrainSettings(epochs=epochs), distill=True)
        steps: tuple[Any, ...] = (prune, OnnxExport())
        name = f"prune-{int(ratio * 100)}-finetune"
        recipes.append(Recipe(name, steps, needs=("torch", "train")))
        if int8:
            recipes.append(Recipe(f"{name}-int8", (*steps, StaticInt8()), needs=("torch", "train", "calibration")))
    for student in smaller_students(model):
        from edgeopt.transforms.distill import Distill

        steps = (Distill(student=student, train=TrainSettings(epochs=2 * epochs, patience=5)),)
        recipes.append(Recipe(f"distill-{student}", steps, needs=("torch", "train")))
        if int8:
            recipes.append(Recipe(f"distill-{student}-int8", (*steps, StaticInt8()),
                                  needs=("torch", "train", "calibration")))
    return recipes


STUDENTS = ("mobilenet_v3_small", "squeezenet1_1")


def smaller_students(model: Model, *, factor: float = 2.0) -> list[str]:
    """Catalogue students with at least ``factor`` times fewer parameters than ``model`` (for its input/classes)."""
    if not model.inputs or not _module_exists("edgeopt.transforms.distill"):
        return []
    import numpy as np

    from edgeopt.transforms.architectures import build_architecture

    torch = importlib.import_module("torch")
    module = model.module
    shape = tuple(d if isinstance(d, int) else 1 for d in model.inputs[0].shape)
    with torch.no_grad():
        classes = int(np.prod(module(torch.zeros(shape)).shape[1:]))
    teacher_params = sum(p.numel() for p in module.parameters())
    chosen = []
    for name in STUDENTS:
        try:
            student = build_architecture(name, input_size=shape[1:], classes=classes)
        except Exception:  # noqa: BLE001 - a student that cannot take this input is simply not offered
            continue
        if teacher_params >= factor * sum(p.numel() for p in student.parameters()):
            chosen.append(name)
    return chosen


def default_recipes(model: Model, device: DeviceProfile, *, runtimes: tuple[str, ...] | None = None
                    ) -> list[Recipe]:
    """The recipes ``optimize`` tries for ``model`` on ``device`` (the transformer space for ONNX transformers)."""
    from edgeopt.transforms.transformer import is_transformer

    if model.format == "onnx" and is_transformer(model):
        return transformer_recipes(model, device, runtimes=runtimes)
    return training_recipes(model, device) + post_training_recipes(model, device, runtimes=runtimes)


def target_recipes(model: Model, device: DeviceProfile, target: str = "onnx", *, epochs: int = 15) -> list[Recipe]:
    """The recipes for ``optimize --target``: every one ends in that format (ONNX: :func:`default_recipes`).

    ExecuTorch: XNNPACK INT8 with per-channel and per-tensor weights; TFLite: dynamic range INT8, full
    INT8 and FP16. For PyTorch models, structured pruning + fine-tuning followed by the FP32 and INT8
    export too. All start from the original model ("torch" in ``needs``), not the ONNX baseline.
    """
    if target == "onnx":
        return default_recipes(model, device)
    precisions = set(device.precisions)
    exports: list[tuple[str, Any]] = []
    if target == "executorch":
        from edgeopt.transforms.executorch import ExecutorchExport

        runtime = "executorch"
        if "int8" in precisions:
            exports += [("int8-perchannel", ExecutorchExport("int8")),
                        ("int8-pertensor", ExecutorchExport("int8", per_channel=False))]
        fp32: Any = ExecutorchExport()
    elif target == "tflite":
        from edgeopt.transforms.tflite import TfliteExport

        runtime = "litert"
        if "int8" in precisions:
            exports += [("int8-dynamic", TfliteExport("dynamic")), ("int8", TfliteExport("int8"))]
        if "fp16" in precisions:
            exports.append(("fp16", TfliteExport("fp16")))
        fp32 = TfliteExport()
    else:
        raise ValueError(f"unknown optimize target {target!r}")
    recipes = [Recipe(f"{target}-{name}", (cfg,), runtime=runtime, needs=("torch", "calibration"))
               for name, cfg in exports]
    if model.format == "torch" and available("torch") and _module_exists("edgeopt.transforms.prune"):
        from edgeopt.training import TrainSettings
        from edgeopt.transforms.prune import StructuredPrune

        for ratio in (0.3, 0.5):
            prune = StructuredPrune(ratio=ratio, train=TrainSettings(epochs=epochs), distill=True)
            name = f"prune-{int(ratio * 100)}-finetune-{target}"
            recipes.append(Recipe(name, (prune, fp32), runtime=runtime, needs=("torch", "train")))
            if exports:
                recipes.append(Recipe(f"{name}-{exports[0][0]}", (prune, exports[0][1]), runtime=runtime,
                                      needs=("torch", "train", "calibration")))
    return recipes
