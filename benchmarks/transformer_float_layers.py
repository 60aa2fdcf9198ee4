"""How much plain nearest-neighbour agreement a few float MatMuls buy in auto's INT8 sentence encoder.

all-MiniLM-L6-v2 (the sets of benchmarks/quantize_transformer.py, rotation 0): SmoothQuant (alpha 0.6,
folded into the LayerNorms) + NNCF INT8 weights re-rounded, OpenVINO activation groups of 128, the
variant auto chose in most runs. Each of its 36 compressed MatMuls is reverted to float alone and ranked
by how much of the pooled embeddings' cosine loss that removes on the judging set
(``transforms/float_layers.revert_losses``, as auto's recovery ranks them); then the top k (0, 3, 6, 12) are reverted together and judged on the
reported set (never used to build or rank), and all are timed interleaved with FP32 (batch 1, 1 thread).

Why: the counted NN agreement on 144 sentences is a lottery over a few near-ties; this shows whether the
expectation (measure/judge.py) follows the model's distance from FP32 while the count does not, and what
each point of it costs in speed.

    PYTHONPATH=src python benchmarks/transformer_float_layers.py   # -> results/transformer_float_layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from quantize_transformer import export_minilm, write_sets

from edgeopt.data import load_data
from edgeopt.fileio import write_json
from edgeopt.measure import BenchSettings, compare, evaluate
from edgeopt.model import load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "transformer_float_layers.json"
FIGURES = ("cosine", "embedding_cosine", "nn_agreement", "nn_expected_agreement", "nn_expected_margin",
           "nn_tie_agreement")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeopt-minilm"))
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ks", default="0,3,6,12")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from edgeopt.transforms.float_layers import revert_losses, revert_to_float
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8, nncf_compress_weights
    from edgeopt.transforms.smooth_quant import SmoothQuant, smooth_quant

    args.work.mkdir(parents=True, exist_ok=True)
    onnx_path, tokenizer = export_minilm(args.work)
    sets = {name: load_data(path) for name, path in write_sets(args.work, tokenizer).items()}
    fp32 = load_model(onnx_path)
    smoothed = smooth_quant(fp32, SmoothQuant(alpha=args.alpha, placement="layernorm"), data=sets["calibration"])
    start = nncf_compress_weights(smoothed, NncfWeightsInt8(mode="int8_asym", weight_rounding=True),
                                  data=sets["calibration"]).with_metadata(
        runtime="openvino", runtime_options=json.dumps({"precision": "f32", "dynamic_quantization_group_size": args.group}))

    def judged(model, data) -> dict[str, float]:
        ev = evaluate(model, data, reference=fp32, threads=1)
        return {k: round(float(getattr(ev, k)), 6) for k in FIGURES}

    began = time.perf_counter()
    base_loss = 1 - judged(start, sets["judging"])["embedding_cosine"]
    expected = evaluate(fp32, sets["judging"], threads=1, keep_outputs=True).outputs
    losses = revert_losses(start, smoothed, sets["judging"], expected, threads=1)  # what auto's recovery ranks by
    gains = {name: base_loss - loss for name, loss in losses.items()}
    order = sorted(losses, key=losses.__getitem__)
    rank_seconds = time.perf_counter() - began

    ks = [int(k) for k in args.ks.split(",")]
    variants = {k: revert_to_float(start, smoothed, order[:k]) if k else start for k in ks}
    rows = [{"float_layers": k, "layers": order[:k], **judged(variants[k], sets["reported"])} for k in ks]
    one = sets["reported"].take(np.arange(1))
    load_before = os.getloadavg()
    timed = compare([fp32, *variants.values()], data=one, threads=1,
                    settings=BenchSettings(warmup=10, min_runs=200, min_seconds=4.0, max_seconds=15.0))
    fp32_ms = timed[0].latency_ms["p50"]
    for row, bench in zip(rows, timed[1:], strict=True):
        row["p50_ms"] = round(bench.latency_ms["p50"], 3)
        row["p50_ratio_to_fp32"] = round(bench.latency_ms["p50"] / fp32_ms, 3)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    write_json(args.out, {
        "benchmark": "float MatMuls in auto's INT8 all-MiniLM-L6-v2 (OpenVINO)",
        "command": "python benchmarks/transformer_float_layers.py " + " ".join(sys.argv[1:]),
        "start": f"SmoothQuant {args.alpha} (LayerNorm) + NNCF INT8 weights re-rounded, OpenVINO groups of {args.group}",
        "ranked_on": f"judging set ({len(sets['judging'])} sentences), pooled-embedding cosine loss removed per layer",
        "reported_on": f"reported set ({len(sets['reported'])} sentences), never used to build or rank",
        "rank_seconds": round(rank_seconds, 1), "fp32_p50_ms": round(fp32_ms, 3),
        "timing": {"batch": 1, "threads": 1, "interleaved": True, "load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "gains": {n: round(g, 7) for n, g in gains.items()}, "variants": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
