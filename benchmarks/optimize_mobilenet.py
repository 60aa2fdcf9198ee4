"""optimize vs quantize --mode auto on torchvision MobileNetV2 (ONNX), and the demo on the digits CNN.

MobileNetV2 has random weights (nothing is downloaded) with BatchNorm statistics re-estimated on
image-like inputs so its outputs are not flat. With random weights top-1 is a near-tie among 1000
classes (even FP16 flips a few percent), so the budget is on the outputs' cosine to FP32 (>= 0.99). Both searches get the same data; then FP32, auto's choice and optimize's choice are
timed interleaved in one run at 1 and 2 threads. Writes benchmarks/results/optimize_mobilenet.json.

Run: .venv/bin/python benchmarks/optimize_mobilenet.py [--size 224] [--samples 160]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_peers import smooth_images, torchvision_case  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import evaluate  # noqa: E402
from edgeopt.search.auto_quantize import auto_quantize  # noqa: E402
from edgeopt.search.optimize import optimize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--metric", default="cosine")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    case = torchvision_case("mobilenet_v2", size=args.size, n_calib=8, n_eval=8, n_heldout=64)
    data = Dataset({"input": smooth_images(args.samples, seed=7, size=args.size)}, None, source="mobilenet-data")
    fp32 = case.fp32
    search_bench = BenchSettings(warmup=5, min_runs=30, min_seconds=1.0, max_seconds=20.0)

    t0 = time.perf_counter()
    auto = auto_quantize(fp32, data, max_drop=args.max_drop, metric=args.metric, threads=args.threads,
                         bench=search_bench)
    auto_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        opt = optimize(fp32, data, out_dir=tmp, max_drop=args.max_drop, metric=args.metric, threads=args.threads,
                       bench=search_bench, progress=False, write_reports=False)
        opt_seconds = time.perf_counter() - t0
    rows = []
    models = [("fp32", fp32)]
    if auto.model is not None:
        models.append((f"auto: {auto.chosen.name}", auto.model))
    if opt.chosen is not None:
        models.append((f"optimize: {opt.chosen.name}", opt.chosen.model))
    for threads in (1, 2):
        timed = compare([m for _, m in models], settings=BenchSettings(min_seconds=3.0, min_runs=100),
                        threads=threads)
        base = timed[0].latency_ms["p50"]
        for (label, model), r in zip(models, timed, strict=True):
            fid = evaluate(model, case.heldout, reference=fp32) if label != "fp32" else None
            rows.append({"threads": threads, "model": label, "runtime": r.runtime, "p50_ms": round(r.latency_ms["p50"], 3),
                         "ratio_vs_fp32": round(r.latency_ms["p50"] / base, 3), "size_bytes": r.size_bytes,
                         "agreement_heldout": None if fid is None else round(fid.agreement, 4),
                         "cosine_heldout": None if fid is None else round(fid.cosine, 5)})
    opt_vs_auto = [(r["threads"], r["p50_ms"]) for r in rows if r["model"].startswith("optimize")]
    auto_rows = {r["threads"]: r["p50_ms"] for r in rows if r["model"].startswith("auto")}
    summary = {
        "auto_chosen": auto.chosen.name if auto.chosen else None,
        "optimize_chosen": opt.chosen.name if opt.chosen else None,
        "optimize_meets_budget": bool(opt.chosen and opt.chosen.meets_budget),
        "optimize_p50_over_auto_p50": {t: round(p / auto_rows[t], 3) for t, p in opt_vs_auto if t in auto_rows},
        "auto_seconds": round(auto_seconds, 1), "optimize_seconds": round(opt_seconds, 1),
    }
    payload = {"benchmark": "optimize_mobilenet", "size": args.size, "samples": args.samples,
               "budget": {"metric": args.metric, "max_drop": args.max_drop}, "search_threads": args.threads,
               "rows": rows, "summary": summary,
               "optimize_candidates": [{k: r.to_dict()[k] for k in ("name", "status", "speedup", "drop", "reason")}
                                       for r in opt.results]}
    write_json(ROOT / "benchmarks" / "results" / "optimize_mobilenet.json", payload)
    for r in rows:
        print(r)
    print(summary)



if __name__ == "__main__":
    main()
