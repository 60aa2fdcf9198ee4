"""MobileNetV2 -> .tflite FP32 / dynamic INT8 / full INT8 / FP16: fidelity, size and LiteRT latency.

torchvision MobileNetV2 with random weights (weights=None: nothing is downloaded). Random
weights give near-constant outputs, so BatchNorm statistics are first re-estimated (train mode,
no gradient) on fixed random calibration images; the outputs then vary with the input and cosine
is a meaningful fidelity measure. Each variant is exported with edgeopt's ``export_tflite``
(litert-torch + ai-edge-quantizer, verified on the calibration inputs), then checked again on
held-out random images with ``evaluate`` against PyTorch's outputs, and all variants are timed
interleaved in one process with ``measure.compare`` (LiteRT), with the ONNX export of the same
model timed alongside in ONNX Runtime. Writes benchmarks/results/export_tflite.json.

Run: .venv/bin/python benchmarks/export_tflite.py [--threads 1,2] [--seconds 3] [--calibration 64]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_peers import reestimate_batchnorm  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import evaluate  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.tflite import QUANTIZE_MODES, TfliteExport, export_tflite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "export_tflite.json"
FLOORS = {"none": 0.999, "fp16": 0.999, "dynamic": 0.98, "int8": 0.98}


def images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (upsampled noise), normalized like ImageNet inputs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 28, 28, generator=g)
    return torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear").numpy().astype(np.float32)


def build(calibration: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.mobilenet_v2(weights=None), calibration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to time")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per model")
    parser.add_argument("--calibration", type=int, default=64, help="calibration images")
    parser.add_argument("--heldout", type=int, default=32, help="held-out images for fidelity")
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibration, heldout = images(args.calibration, 0), images(args.heldout, 1)
    net = build(calibration)
    source = Model.from_torch(net, source="torchvision mobilenet_v2 (random weights, BN re-estimated)",
                              input_shape=(1, 3, 224, 224))
    cal = Dataset({"x": calibration}, None, "random images (calibration)")
    held = Dataset({"x": heldout}, None, "random images (held-out)")
    with torch.no_grad():
        ref = net(torch.from_numpy(heldout)).numpy()
    spread = float(np.std(ref, axis=0).mean())

    t0 = time.perf_counter()
    # min_cosine=0: record every variant's fidelity (judged against FLOORS below) instead of stopping
    # at the first one under its floor, as `edgeopt export` would.
    variants = export_tflite(source, [TfliteExport(quantize=m, min_cosine=0.0) for m in QUANTIZE_MODES],
                             data=cal)
    export_s = time.perf_counter() - t0
    onnx_model, onnx_check = to_onnx(source, OnnxExport(dynamic_batch=False), data=cal)

    rows = []
    for mode, (model, check) in zip(QUANTIZE_MODES, variants, strict=True):
        held_eval = evaluate(model, held, reference=ref, threads=1)
        rows.append({"quantize": mode, "size_bytes": model.size_bytes,
                     "size_vs_fp32": round(model.size_bytes / variants[0][0].size_bytes, 4),
                     "export_check": check.to_dict(),
                     "heldout_cosine": held_eval.cosine, "heldout_agreement": held_eval.agreement,
                     "cosine_floor": FLOORS[mode], "meets_floor": bool(held_eval.cosine >= FLOORS[mode])})

    timings = {}
    settings = BenchSettings(warmup=5, min_runs=20, min_seconds=args.seconds, max_seconds=60.0)
    models = [m for m, _ in variants] + [onnx_model]
    names = [f"tflite-{m}" for m in QUANTIZE_MODES] + ["onnx-fp32 (onnxruntime)"]
    for threads in [int(t) for t in args.threads.split(",")]:
        results = compare(models, settings=settings, threads=threads)
        base = results[0].latency_ms["p50"]
        timings[str(threads)] = [
            {"model": name, "runtime": r.runtime, "p50_ms": round(r.latency_ms["p50"], 3),
             "p90_ms": round(r.latency_ms["p90"], 3), "mean_ms": round(r.latency_ms["mean"], 3),
             "runs": r.runs, "speedup_vs_tflite_fp32": round(base / r.latency_ms["p50"], 3),
             "size_bytes": r.size_bytes}
            for name, r in zip(names, results, strict=True)]
        for row in timings[str(threads)]:
            print(f"threads={threads} {row['model']:<26} p50 {row['p50_ms']:8.3f} ms  "
                  f"x{row['speedup_vs_tflite_fp32']:.2f} vs tflite fp32")
    for row in rows:
        print(f"{row['quantize']:<8} size {row['size_bytes'] / 1e6:6.2f} MB ({row['size_vs_fp32']:.2f}x)  "
              f"held-out cosine {row['heldout_cosine']:.5f} (floor {row['cosine_floor']})")
    payload = {
        "benchmark": "export_tflite", "command": "python benchmarks/export_tflite.py "
        f"--threads {args.threads} --seconds {args.seconds} --calibration {args.calibration} --heldout {args.heldout}",
        "model": source.source, "output_std_across_inputs": spread,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "note": "2 shared CPU cores, loaded by other jobs: compare ratios, not absolute times"},
        "export_seconds_all_variants": round(export_s, 1), "onnx_export_check": onnx_check.to_dict(),
        "variants": rows, "latency_interleaved": timings,
    }
    write_json(OUT, payload)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
