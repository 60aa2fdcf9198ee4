"""Interleaved A/B of two `edgeopt serve` source trees at one concurrency, beside the runtime alone.

For judging a server change on a shared, loaded machine: both servers run at once (same model,
flags and threads), and every round measures the runtime's own batch-1 p50 (measure.benchmark,
in this process), then A and B with the same separate-process load client as
benchmarks/serve_load.py, in ABBA order so drift in machine load hits both arms alike. Per round
it records each arm's p50 minus the runtime's p50 (the c=1 overhead of issue 20) and each
server's CPU time per request (from /proc: survives load better than wall time). The answer is
the median over rounds of the paired figures, and B - A per round.

Run:
  .venv/bin/python benchmarks/serve_ab.py --a /path/to/old/src --b src --rounds 10
Writes benchmarks/results/serve_ab.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load as sl  # noqa: E402  (the load client, requests and model builders are shared)

from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.model import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def start(src: Path, path: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """`edgeopt serve` from the source tree ``src`` (PYTHONPATH), ready to answer."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "edgeopt", "serve",
            *sl.serve_args(args.model, path, args.max_batch, args.max_delay_ms, args.threads)]
    proc, port = sl.launch(argv, env, what=f"server from {src}")
    sl.wait_ready(proc, port, what=f"server from {src}")
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="source tree of arm A (the folder holding edgeopt/)")
    parser.add_argument("--b", required=True, help="source tree of arm B")
    parser.add_argument("--model", default="resnet18_64", choices=sorted(sl.MODELS))
    parser.add_argument("--encoding", default="binary", choices=["binary", "json"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5, help="measured seconds per arm and round")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--onnx", help="use this exported model file instead of exporting --model again")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_ab.json"))
    args = parser.parse_args()

    arms = {"A": Path(args.a), "B": Path(args.b)}
    for arm, src in arms.items():
        if not (src / "edgeopt" / "__init__.py").is_file():
            parser.error(f"--{arm.lower()} {src}: no edgeopt/ package there")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.onnx) if args.onnx else sl.model_file(args.model, Path(tmp))
        model = load_model(path)
        x = np.random.default_rng(0).standard_normal((1, *sl.MODELS[args.model][1])).astype(np.float32)
        servers = {arm: start(src, path, args) for arm, src in arms.items()}
        rounds: list[dict[str, Any]] = []
        try:
            files = {}
            for arm, (_proc, port) in servers.items():
                files[arm] = Path(tmp) / f"{arm}.http"
                files[arm].write_bytes(sl.infer_request(port, args.model, x, binary=args.encoding == "binary"))
            for i in range(args.rounds):
                rt = sl.runtime_round(model, 1, args.threads, args.seconds)
                row: dict[str, Any] = {"runtime_p50_ms": round(rt["p50_ms"], 3), "loadavg": round(os.getloadavg()[0], 2)}
                for arm in ("AB" if i % 2 == 0 else "BA"):
                    proc, port = servers[arm]
                    r = sl.run_load(port, files[arm], args.concurrency, args.warmup, args.seconds, 100_000, proc.pid)
                    lat = np.array(r["latencies"]) * 1000.0
                    row[arm] = {"p50_ms": round(float(np.median(lat)), 3), "rps": round(lat.size / r["window_s"], 1),
                                "overhead_ms": round(float(np.median(lat)) - rt["p50_ms"], 3),
                                "cpu_ms_per_request": round(1000.0 * r["server_cpu_s"] / max(1, r["requests_total"]), 3),
                                "mean_batch": round(r["samples"] / r["calls"], 2) if r["calls"] else None}
                row["B_minus_A_p50_ms"] = round(row["B"]["p50_ms"] - row["A"]["p50_ms"], 3)
                rounds.append(row)
                print(f"round {i + 1}: runtime {row['runtime_p50_ms']} | " + " | ".join(
                    f"{arm} p50 {row[arm]['p50_ms']} rps {row[arm]['rps']} cpu {row[arm]['cpu_ms_per_request']} "
                    f"batch {row[arm]['mean_batch']}" for arm in "AB") + f" | load {row['loadavg']}", flush=True)
        finally:
            for proc, _port in servers.values():
                sl.stop_server(proc)

    def med(values: list[float]) -> float:
        return round(float(np.median(values)), 3)

    summary = {arm: {"overhead_ms_median_of_rounds": med([r[arm]["overhead_ms"] for r in rounds]),
                     "p50_ms_median_of_rounds": med([r[arm]["p50_ms"] for r in rounds]),
                     "rps_median_of_rounds": med([r[arm]["rps"] for r in rounds]),
                     "cpu_ms_per_request_median_of_rounds": med([r[arm]["cpu_ms_per_request"] for r in rounds])}
               for arm in arms}
    summary["B_minus_A_p50_ms_median"] = med([r["B_minus_A_p50_ms"] for r in rounds])
    summary["B_faster_in_rounds"] = sum(r["B_minus_A_p50_ms"] < 0 for r in rounds)
    summary["runtime_p50_ms_median"] = med([r["runtime_p50_ms"] for r in rounds])
    payload = {"benchmark": "serve_ab", "command": "python benchmarks/serve_ab.py " + " ".join(sys.argv[1:]),
               "arms": {arm: str(src) for arm, src in arms.items()},
               "settings": {k: v for k, v in vars(args).items() if k not in ("a", "b", "out")},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(),
                           "note": "shared 2-core machine; judge by the paired per-round figures"},
               "summary": summary, "rounds": rounds}
    write_json(args.out, payload)
    print(summary)


if __name__ == "__main__":
    main()
