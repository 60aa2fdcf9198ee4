"""Does edgeopt's harness add overhead? edgeopt bench's p50 vs a bare ONNX Runtime loop, interleaved.

Rounds alternate between a bare `session.run` loop and edgeopt's `benchmark()` (the function
`edgeopt bench` calls) on the same model, threads and input, so both see the same machine load.
Writes benchmarks/results/bench_overhead.json.

Run: .venv/bin/python benchmarks/bench_overhead.py [--rounds 20] [--runs 200]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeopt.fileio import write_json
from edgeopt.measure.bench import BenchSettings, benchmark, example_feeds
from edgeopt.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    names = [o.name for o in session.get_outputs()]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(names, feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure(model_path: Path, threads: int, rounds: int, runs: int) -> dict[str, object]:
    model = load_model(model_path)
    feeds = example_feeds(model, batch=1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    bare_loop(session, feeds, 50)
    bare: list[float] = []
    harness: list[float] = []
    settings = BenchSettings(warmup=10, min_runs=runs, min_seconds=0.0, max_seconds=30.0, round_seconds=0.0)
    for _ in range(rounds):
        bare += bare_loop(session, feeds, runs)
        harness += benchmark(model, settings=settings, threads=threads).times_ms[:runs]
    p50_bare, p50_harness = float(np.median(bare)), float(np.median(harness))
    return {"model": str(model_path.relative_to(ROOT)), "threads": threads, "runs_each": len(bare),
            "bare_ort_p50_ms": round(p50_bare, 5), "edgeopt_bench_p50_ms": round(p50_harness, 5),
            "ratio": round(p50_harness / p50_bare, 4),
            "within_5_percent": abs(p50_harness / p50_bare - 1.0) <= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    model = ROOT / "examples" / "digits" / "digits_cnn.onnx"
    results = [measure(model, t, args.rounds, args.runs) for t in (1, 2)]
    payload = {"benchmark": "bench_overhead", "machine": platform.processor() or platform.machine(),
               "onnxruntime": ort.__version__, "results": results}
    write_json(ROOT / "benchmarks" / "results" / "bench_overhead.json", payload)
    for r in results:
        print(f"threads={r['threads']}: bare ORT p50 {r['bare_ort_p50_ms']:.4f} ms, edgeopt bench p50 "
              f"{r['edgeopt_bench_p50_ms']:.4f} ms, ratio {r['ratio']:.3f} (within 5%: {r['within_5_percent']})")


if __name__ == "__main__":
    main()
