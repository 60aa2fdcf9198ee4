"""QAT vs PTQ where PTQ breaks: FP32, per-tensor PTQ (every calibration), QAT; accuracy, p50, size.

The model is tests/transforms/qat_net.py's depthwise-separable CNN (stem Conv + ReLU, two
depthwise-separable blocks with BatchNorm), here at width 64 on real scikit-learn digits resized to
16x16 (at 8x8 ONNX Runtime's INT8 is slower than FP32: the convolutions are too small), trained
with SGD + one-cycle at a high learning rate: some stem channels die, and BatchNorm folding makes
the next depthwise conv's weight range span hundreds of times. The named constraint is a target
without per-channel INT8 weight scales (``--per-tensor``): per-channel PTQ is shown beside it.

Accuracy on the 597 held-out digits (never used to train, calibrate or choose); the net and QAT train
on the other 1,200 (QAT: 3 epochs, the FP32 net as teacher), calibration on 128 of them. Latency:
batch 1, 1 thread, FP32 / PTQ per-tensor / PTQ per-channel / QAT timed interleaved in one compare
(a shared, loaded machine: read the ratios). "clip only" is QAT with a learning rate of 1e-9: the
per-tensor weight range QAT starts from, without training, to show what the training adds.
Then ``auto_quantize`` as ``edgeopt quantize net.py:SeparableNet --weights w.pt --mode auto
--per-tensor --runtime onnxruntime --threads 1`` runs: its recovery steps and its choice.

Run: PYTHONPATH=src .venv/bin/python benchmarks/qat.py [--seeds 0,1] [--width 64] [--size 16] [--no-auto]
Writes benchmarks/results/qat.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "qat.json"

import numpy as np  # noqa: E402
from tests.transforms import qat_net  # noqa: E402

from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import accuracy_of, predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.qat import QatConfig, qat_int8  # noqa: E402
from edgeopt.transforms.quantize import StaticInt8, quantize  # noqa: E402

BENCH = BenchSettings(warmup=20, min_runs=300, min_seconds=3.0, max_seconds=30.0)
PER_TENSOR = StaticInt8(per_channel=False)


def _weight_bytes(model: Model) -> int:
    return sum(len(i.raw_data) for i in model.onnx.graph.initializer)


def run_seed(seed: int, *, width: int, size: int, epochs: int, qat_epochs: int, with_auto: bool) -> dict[str, Any]:
    started = time.perf_counter()
    train, test = qat_net.digits(size=size)
    t0 = time.perf_counter()
    net = qat_net.train_net(train, epochs=epochs, seed=seed, width=width)
    train_s = time.perf_counter() - t0
    shape = (1, 1, size, size)
    cal = train.take(np.arange(128))
    model = Model.from_torch(net, source=f"separable-net-w{width}-{size}px-seed{seed}", input_shape=shape)
    fp32, _ = to_onnx(model, OnnxExport(atol=1e-3), data=cal)

    def acc(m: Model) -> float:
        return round(accuracy_of(predict(m, test), test.labels), 6)

    ptq = {f"ptq-pertensor-{c}": quantize(fp32, replace(PER_TENSOR, calibration=c), data=cal)
           for c in ("minmax", "percentile", "entropy")}
    ptq["ptq-pertensor-bias-corrected"] = quantize(fp32, replace(PER_TENSOR, bias_correction=True), data=cal)
    per_channel = quantize(fp32, StaticInt8(), data=cal)
    t0 = time.perf_counter()
    qat = qat_int8(model, train, cal, int8=PER_TENSOR, config=QatConfig(train=TrainSettings(epochs=qat_epochs, seed=seed)))
    qat_s = time.perf_counter() - t0
    clip_only = qat_int8(model, train, cal, int8=PER_TENSOR, config=QatConfig(train=TrainSettings(epochs=1, lr=1e-9, seed=seed)))
    timed = compare([fp32, ptq["ptq-pertensor-minmax"], per_channel, qat], settings=BENCH, threads=1, data=test)
    p50 = [t.latency_ms["p50"] for t in timed]
    ops = {name: sum(Counter(n.op_type for n in m.onnx.graph.node).values())
           for name, m in (("ptq-pertensor-minmax", ptq["ptq-pertensor-minmax"]), ("qat", qat))}
    row: dict[str, Any] = {
        "seed": seed, "train_seconds": round(train_s, 1), "qat_seconds": round(qat_s, 1),
        "dead_stem_channels": qat_net.dead_stem_channels(net, train),
        "heldout_samples": len(test), "train_samples": len(train), "calibration_samples": len(cal),
        "accuracy": {"fp32": acc(fp32), **{k: acc(v) for k, v in ptq.items()}, "ptq-perchannel": acc(per_channel),
                     "clip-only-pertensor": acc(clip_only), f"qat-{qat_epochs}ep-pertensor": acc(qat)},
        "p50_ms_1thread": {"fp32": p50[0], "ptq-pertensor-minmax": p50[1], "ptq-perchannel": p50[2], "qat": p50[3]},
        "p50_over_fp32": {"ptq-pertensor-minmax": round(p50[1] / p50[0], 3), "ptq-perchannel": round(p50[2] / p50[0], 3),
                          "qat": round(p50[3] / p50[0], 3)},
        "qat_p50_over_ptq_p50": round(p50[3] / p50[1], 3),
        "size_bytes": {"fp32": fp32.size_bytes, "ptq-pertensor-minmax": ptq["ptq-pertensor-minmax"].size_bytes,
                       "qat": qat.size_bytes},
        "weight_bytes": {"ptq-pertensor-minmax": _weight_bytes(ptq["ptq-pertensor-minmax"]), "qat": _weight_bytes(qat)},
        "onnx_nodes": ops,
        "same_op_types": Counter(n.op_type for n in qat.onnx.graph.node)
        == Counter(n.op_type for n in ptq["ptq-pertensor-minmax"].onnx.graph.node),
    }
    a = row["accuracy"]
    row["best_ptq_pertensor_drop_pt"] = round(100 * (a["fp32"] - max(a[k] for k in ptq)), 2)
    row["qat_drop_pt"] = round(100 * (a["fp32"] - a[f"qat-{qat_epochs}ep-pertensor"]), 2)
    if with_auto:
        from edgeopt.search.auto_quantize import auto_quantize

        t0 = time.perf_counter()
        r = auto_quantize(model, train.take(np.arange(600)), eval_data=test, max_drop=0.01, runtimes=("onnxruntime",),
                          threads=1, per_channel=False, qat_epochs=qat_epochs)
        row["auto"] = {"seconds": round(time.perf_counter() - t0, 1), "chosen": r.chosen.name if r.chosen else None,
                       "chosen_p50_over_fp32": round(r.chosen.latency_ms["p50"] / r.baseline.latency_ms["p50"], 3)
                       if r.chosen and r.chosen.latency_ms else None,
                       "chosen_accuracy": r.chosen.accuracy if r.chosen else None, "fp32_accuracy": r.baseline.accuracy,
                       "steps": [{k: s.get(k) for k in ("step", "variant", "status", "accuracy", "drop", "float_layers")}
                                 for s in r.steps],
                       "variants": [{"name": v.name, "status": v.status, "accuracy": v.accuracy,
                                     "p50_ms": v.latency_ms["p50"] if v.latency_ms else None, "reason": v.reason}
                                    for v in r.results]}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--no-auto", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, width=args.width, size=args.size, epochs=args.epochs, qat_epochs=args.qat_epochs,
                             with_auto=not args.no_auto))
        print(rows[-1]["accuracy"], rows[-1]["p50_over_fp32"], rows[-1].get("auto", {}).get("chosen"), flush=True)
    import onnxruntime
    import torch

    write_json(args.out, {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/qat.py " + " ".join(sys.argv[1:]),
        "settings": {"width": args.width, "input": f"1x{args.size}x{args.size}", "epochs": args.epochs,
                     "qat_epochs": args.qat_epochs, "bench": BENCH.__dict__, "threads": 1,
                     "constraint": "per-tensor INT8 weights (a target without per-channel scales)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "notes": ["accuracy on held-out digits never used to train, calibrate or choose",
                  "latency batch 1, 1 thread, FP32 / PTQ / QAT interleaved in one compare on a shared machine"],
        "seeds": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
