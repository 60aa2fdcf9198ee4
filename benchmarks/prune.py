"""Pruning benchmark: the issue-5 done-when figures, measured with edgeopt.prune.

Sections (all by default; name some to run only those, results are merged into the JSON):
- digits_unstructured: bundled digits CNN, 40% L1 unstructured, fine-tuned with distillation on
  examples/digits/train.npz, judged on test.npz (never tuned on).
- digits_structured: the same CNN, 50% channels removed in 2 prune-and-tune steps (25%, 50%),
  6 epochs after each; digits_structured_one_shot: one 50% step, then 15 epochs.
- resnet18, mobilenet_v2: torchvision (weights=None, random init), 50% structured channel pruning
  with L1 importance; MACs, batch-1 ONNX Runtime latency of original and pruned timed
  interleaved in one run (measure.compare), and the export check (ONNX vs pruned PyTorch).
- resnet18_latency_target: the same ResNet18, ``target_latency_ms`` = 50 % of its unpruned batch-1
  ONNX Runtime 1-thread p50 (timed alone first), at most 50 % channels: every timing of the search
  (interleaved with the original), the latency reached, MACs and the channel fraction it took.

Run: ``.venv/bin/python benchmarks/prune.py [section ...]`` -> benchmarks/results/prune.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from edgeopt.training import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULT = ROOT / "benchmarks" / "results" / "prune.json"


def _digits(config: Any, threads: int) -> dict[str, Any]:
    from edgeopt.data import load_data
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import load_model
    from edgeopt.report.prune import prune

    model = load_model(f"{DIGITS / 'digits_cnn.py'}:DigitsCNN", weights=DIGITS / "digits_cnn.pt")
    train, test = load_data(DIGITS / "train.npz"), load_data(DIGITS / "test.npz")
    result = prune(model, config, data=train, eval_data=test, threads=threads,
                   bench_settings=BenchSettings(min_runs=200, min_seconds=2.0), progress=False)
    return result.report


def _torchvision(name: str, ratio: float, threads: int) -> dict[str, Any]:
    import torch
    import torchvision

    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import Model
    from edgeopt.report.prune import prune
    from edgeopt.transforms.prune import StructuredPrune

    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None).eval()
    model = Model.from_torch(module, source=f"torchvision.{name}(weights=None)", input_shape=(1, 3, 224, 224))
    result = prune(model, StructuredPrune(ratio=ratio, importance="l1"), threads=threads,
                   bench_settings=BenchSettings(min_runs=60, min_seconds=4.0, max_seconds=60.0), progress=False)
    return {k: v for k, v in result.report.items() if k != "layers"}


def _latency_target(name: str, fraction: float, ceiling: float, threads: int) -> dict[str, Any]:
    import torch
    import torchvision

    from edgeopt.measure.bench import BenchSettings, benchmark
    from edgeopt.model import Model
    from edgeopt.report.prune import prune
    from edgeopt.transforms.export import to_onnx
    from edgeopt.transforms.prune import StructuredPrune

    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None).eval()
    model = Model.from_torch(module, source=f"torchvision.{name}(weights=None)", input_shape=(1, 3, 224, 224))
    settings = BenchSettings(min_runs=40, min_seconds=3.0, max_seconds=40.0)
    unpruned = benchmark(to_onnx(model)[0], settings=settings, runtime="onnxruntime", threads=threads)
    target = round(fraction * unpruned.latency_ms["p50"], 3)
    result = prune(model, StructuredPrune(ratio=ceiling, target_latency_ms=target), threads=threads,
                   bench_settings=settings, progress=False)
    report = {k: v for k, v in result.report.items() if k != "layers"}
    search = report["target_latency"]
    chosen = next(t for t in search["timings"] if t["ratio"] == search["ratio"])
    report["summary"] = {
        "target_ms": target, "target_fraction_of_unpruned": fraction, "unpruned_p50_ms": unpruned.latency_ms["p50"],
        "met": search["met"], "reached_ms": search["reached_ms"],
        "reached_p50_ms_raw": chosen["p50_ms"], "original_p50_ms_same_run": chosen["original_p50_ms"],
        "timings_ratio_macs_ms": [[t["ratio"], t["macs"], round(t["latency_ms"], 2)] for t in search["timings"]],
        "channel_fraction_removed": search["ratio"], "ceiling": ceiling,
        "macs_before": report["macs"]["before"], "macs_after": report["macs"]["after"],
        "final_interleaved_speedup_p50": report["latency"]["speedup_p50"]}
    return report


def main(sections: list[str]) -> None:
    import torch

    from edgeopt.fileio import write_json
    from edgeopt.transforms.prune import StructuredPrune, UnstructuredPrune

    threads = 1
    torch.set_num_threads(2)
    runs = {
        "digits_unstructured": lambda: _digits(UnstructuredPrune(sparsity=0.4, distill=True, train=TrainSettings(epochs=3, lr=5e-4)),
                                               threads),
        "digits_structured": lambda: _digits(StructuredPrune(ratio=0.5, iterative_steps=2, distill=True, train=TrainSettings(epochs=6, lr=1e-3)), threads),
        "digits_structured_one_shot": lambda: _digits(StructuredPrune(ratio=0.5, distill=True, train=TrainSettings(epochs=15, lr=1e-3)),
                                                      threads),
        "resnet18": lambda: _torchvision("resnet18", 0.5, threads),
        "mobilenet_v2": lambda: _torchvision("mobilenet_v2", 0.5, threads),
        "resnet18_latency_target": lambda: _latency_target("resnet18", 0.5, 0.5, threads),
    }
    unknown = [s for s in sections if s not in runs]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(runs)}")
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    for name in sections or list(runs):
        start = time.perf_counter()
        print(f"[prune benchmark] {name} ...", flush=True)
        report = runs[name]()
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                          "note": "shared 2-core machine under load from other jobs; ratios are from "
                                  "interleaved runs, absolute times are noisy",
                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        results = json.loads(RESULT.read_text()) if RESULT.exists() else results
        results[name] = report
        write_json(RESULT, results)
        summary = {"macs_reduction_pct": report["macs"]["reduction_pct"],
                   "speedup_p50": report.get("latency", {}).get("speedup_p50"),
                   "export_max_abs_diff": report["export_check"]["max_abs_diff"],
                   "accuracy": report.get("accuracy"), "seconds": report["seconds"]}
        if "sparsity" in report:
            summary["sparsity_pct"] = {r["layer"]: r["sparsity_pct"] for r in report["sparsity"]}
        if "summary" in report:
            summary["target"] = report["summary"]
        print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
