"""edgeopt quantize on the digits CNN, MobileNetV2 and ResNet18: sizes, fidelity, and --mode auto at 1 thread.

For each model: static INT8 (U8S8 per-channel QDQ, MinMax) file size vs FP32 and accuracy/agreement
on held-out data; FP32 and that INT8 timed interleaved (measure.compare, batch 1, 1 thread); then
``auto_quantize(threads=1)`` — every variant it tries is timed interleaved with FP32 by the search
engine — and the chosen model's p50 as a ratio of FP32's (the issue's target: <= 0.45x).
torchvision models use random weights with BatchNorm statistics re-estimated on structured random
images (``quantize_peers.torchvision_case``), or their outputs are flat.

Run: .venv/bin/python benchmarks/quantize_digits.py [--models digits,mobilenet_v2,resnet18] [--no-auto]
Writes benchmarks/results/quantize_digits.json. Figures come from a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quantize_digits.json"

from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import evaluate  # noqa: E402
from edgeopt.search.auto_quantize import auto_quantize  # noqa: E402
from edgeopt.transforms.quantize import StaticInt8, quantize  # noqa: E402

BENCH = BenchSettings(warmup=10, min_runs=100, min_seconds=1.0, max_seconds=20.0)


def load_case(name: str) -> Any:
    import quantize_peers as peers  # the BatchNorm re-estimation and data the peer benchmark uses

    if name == "digits":
        return peers.digits_case()
    return peers.torchvision_case(name, size=224, n_calib=64, n_eval=100, n_heldout=100)


def run_case(name: str, *, with_auto: bool, max_drop: float) -> dict[str, Any]:
    start = time.perf_counter()
    case = load_case(name)
    fp32 = case.fp32
    int8 = quantize(fp32, StaticInt8(), data=case.calibration)
    base = evaluate(fp32, case.heldout, threads=1)
    q = evaluate(int8, case.heldout, reference=fp32, threads=1)
    timed = compare([fp32, int8], settings=BENCH, threads=1, data=case.heldout)
    row: dict[str, Any] = {
        "fp32_size_bytes": fp32.size_bytes, "int8_size_bytes": int8.size_bytes,
        "int8_size_ratio": round(fp32.size_bytes / int8.size_bytes, 3),
        "fp32_accuracy": base.accuracy, "int8_accuracy": q.accuracy,
        "int8_accuracy_drop": None if base.accuracy is None else round(base.accuracy - q.accuracy, 6),
        "int8_agreement": q.agreement, "int8_cosine": round(q.cosine, 6), "heldout_samples": q.n,
        "static_int8_vs_fp32_1thread": {
            "fp32_p50_ms": timed[0].latency_ms["p50"], "int8_p50_ms": timed[1].latency_ms["p50"],
            "int8_over_fp32": round(timed[1].latency_ms["p50"] / timed[0].latency_ms["p50"], 3)},
    }
    if with_auto:
        auto = auto_quantize(fp32, case.calibration, eval_data=case.auto_eval, max_drop=max_drop, threads=1, bench=BENCH)
        entry: dict[str, Any] = {"max_drop": max_drop, "budget_metric": auto.budget.metric,
                                 "chosen": auto.chosen.name if auto.chosen else None,
                                 "fp32_p50_ms": auto.baseline.latency_ms["p50"],
                                 "variants": [{"name": r.name, "status": r.status, "runtime": r.runtime,
                                               "p50_ms": r.latency_ms.get("p50"), "speedup": r.speedup,
                                               "size_ratio": r.size_ratio, "accuracy": r.accuracy,
                                               "agreement": r.agreement, "reason": r.reason}
                                              for r in auto.results]}
        if auto.chosen is not None and auto.model is not None:
            entry["chosen_p50_ms"] = auto.chosen.latency_ms["p50"]
            entry["chosen_over_fp32"] = round(auto.chosen.latency_ms["p50"] / auto.baseline.latency_ms["p50"], 3)
            entry["chosen_runtime"] = auto.chosen.runtime
            held = evaluate(auto.model, case.heldout, reference=fp32, threads=1)
            entry["chosen_heldout_agreement"] = held.agreement
            entry["chosen_heldout_accuracy"] = held.accuracy
        row["auto_1thread"] = entry
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,mobilenet_v2,resnet18")
    parser.add_argument("--no-auto", action="store_true", help="skip --mode auto (sizes and fidelity only)")
    parser.add_argument("--max-drop", type=float, default=0.01, help="auto's budget (agreement when unlabelled)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        results[name] = run_case(name, with_auto=not args.no_auto and name != "resnet18", max_drop=args.max_drop)
        print({k: v for k, v in results[name].items() if k != "auto_1thread"}, file=sys.stderr, flush=True)
        if "auto_1thread" in results[name]:
            a = results[name]["auto_1thread"]
            print(f"   auto: {a['chosen']} {a.get('chosen_over_fp32')}x FP32", file=sys.stderr, flush=True)
    write_json(args.out, {"benchmark": "quantize_digits", "command": "benchmarks/quantize_digits.py " + " ".join(sys.argv[1:]),
                     "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                 "note": "shared machine under load from other jobs; ratios are from interleaved runs"},
                     "bench": BENCH.__dict__, "results": results})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
