"""Is a model run slower when runs are spaced out, as a lone client's requests space them in a server?

The c=1 target compares the server's p50 with the runtime alone, timed back to back. Inside the
server the runtime thread runs once per request and waits about 1 ms between runs (HTTP, decode,
encode). This times the same session in one process in blocks of runs back to back, with a 1 ms
sleep between runs (the thread blocks, as the runtime thread does on its queue), and with a 1 ms
busy-wait between runs (the core stays busy: is it the wake-up from idle, or the gap itself?),
interleaved ABC CBA, and reports each block's p50 and the paired differences.

Run:
  .venv/bin/python benchmarks/runtime_gap.py --onnx resnet18_64.onnx --blocks 12
Writes benchmarks/results/runtime_alone_gap_<model file stem>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("back_to_back", "sleep_1ms", "spin_1ms")


def block(session: Any, feeds: dict[str, np.ndarray], mode: str, n: int) -> float:
    """The p50 (ms) of ``n`` runs with ``mode`` between them."""
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        session.run(feeds)
        times.append((time.perf_counter_ns() - t) / 1e6)
        if mode == "sleep_1ms":
            time.sleep(0.001)
        elif mode == "spin_1ms":
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:
                pass
    return round(float(np.median(times)), 3)


def main() -> None:
    from edgeopt.fileio import write_json
    from edgeopt.measure.bench import example_feeds
    from edgeopt.model import load_model
    from edgeopt.runtimes.sessions import open_session, resolve_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the model file (as served)")
    parser.add_argument("--blocks", type=int, default=12, help="blocks per mode")
    parser.add_argument("--runs", type=int, default=100, help="runs per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = load_model(args.onnx)
    session = open_session(model, resolve_settings(model, threads=args.threads))  # as `edgeopt serve` opens it
    feeds = example_feeds(model, batch=1)
    block(session, feeds, "back_to_back", 20)
    load_start = os.getloadavg()
    per_block: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(args.blocks):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            per_block[mode].append(block(session, feeds, mode, args.runs))
    base = np.array(per_block["back_to_back"])
    summary = {m: {"p50_ms_median_of_blocks": round(float(np.median(v)), 3),
                   "minus_back_to_back_paired_median_ms": round(float(np.median(np.array(v) - base)), 3),
                   "blocks_slower_than_back_to_back": int(np.sum(np.array(v) > base))}
               for m, v in per_block.items()}
    for mode, s in summary.items():
        print(f"{mode:<14} p50 {s['p50_ms_median_of_blocks']:.3f} ms, paired vs back to back "
              f"{s['minus_back_to_back_paired_median_ms']:+.3f} ms, slower in {s['blocks_slower_than_back_to_back']} "
              f"of {args.blocks} blocks")
    out = args.out or ROOT / "benchmarks" / "results" / f"runtime_alone_gap_{Path(args.onnx).stem}.json"
    write_json(out, {"benchmark": "runtime_gap", "command": "python benchmarks/runtime_gap.py --onnx "
                     f"{args.onnx} --blocks {args.blocks} --runs {args.runs} --threads {args.threads}",
                     "per_block_p50_ms": per_block, "summary": summary,
                     "machine": {"cpus": os.cpu_count(), "loadavg_at_start": load_start,
                                 "loadavg_at_end": os.getloadavg(), "note": "shared 2-core machine"}})


if __name__ == "__main__":
    main()
