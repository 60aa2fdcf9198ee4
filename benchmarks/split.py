"""Model segmentation on MobileNetV2 and ResNet18 (torchvision, weights=None): fidelity, prediction, speed-up.

Three measurements, all on this host (127.0.0.1), stage processes at 1 intra-op thread each:

1. fidelity: each model split into 2 and 3 stages (throughput objective); the multi-process
   pipeline's outputs vs the whole model (max abs diff, must be <= 1e-5).
2. prediction: (a) one profile planned at 7 bandwidths: where the cut goes; (b) a slow "board" (relative_speed 0.5, simulated by slowing its stage) and a
   host-speed "gateway", latency objective, at several link bandwidths with the link simulated:
   the planner's predicted end-to-end latency vs the measured p50, and the cut chosen per
   bandwidth. Each split is profiled right before its run, and the whole model is timed before
   and after (load_drift), since the other jobs' load moves between profile and run.
3. throughput: the unsplit model on one core vs two stages on two cores, in alternating rounds
   (in-process harness at 1 thread, the unsplit model as a 1-stage pipeline, the 2-stage pipeline).

4. oip (only with --only oip): the same 2-stage split run by the local socket pipeline and by
   `split run --stage-urls` against two `edgeopt serve` processes (one stage each, 1 thread,
   --max-batch 1), interleaved in each round: latency p50, throughput, their ratios.

The machine is shared with other jobs: absolute times move with their load; ratios within a
round are the figures to trust. Writes benchmarks/results/split.json.

Run: .venv/bin/python benchmarks/split.py [--items 16] [--rounds 3] [--models mobilenet_v2,resnet18]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeopt.fileio import write_json
from edgeopt.measure.bench import BenchSettings, benchmark
from edgeopt.model import Model, load_model
from edgeopt.split import split_model
from edgeopt.split.pipeline import run_pipeline
from edgeopt.split.remote import run_remote

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTHS_MBPS = (5.0, 20.0, 100.0, 1000.0)
LINK_LATENCY_MS = 1.0


def export(name: str, folder: Path) -> Path:
    import torch
    import torchvision

    from edgeopt.transforms.export import to_onnx

    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None).eval()
    onnx_model, check = to_onnx(Model.from_torch(module, source=name, input_shape=(1, 3, 224, 224)))
    path = folder / f"{name}.onnx"
    onnx_model.save(path)
    print(f"exported {name}: {len(onnx_model.onnx.graph.node)} nodes, export check max abs diff {check.max_abs_diff:.2g}")
    return path


def fidelity(path: Path, folder: Path, items: int) -> list[dict[str, Any]]:
    rows = []
    for k in (2, 3):
        out = folder / f"{path.stem}_fid{k}"
        plan = split_model(path, ["host-1t"] * k, out_dir=out, link_mbps=1000, objective="throughput")
        result = run_pipeline(out, items=items)
        rows.append({"model": path.stem, "stages": k, "cuts": plan.cuts,
                     "cut_tensors_bytes": [s.out_bytes for s in plan.stages[:-1]],
                     "max_abs_diff": result.max_abs_diff, "items": 2 * items,
                     "ok": result.max_abs_diff is not None and result.max_abs_diff <= 1e-5})
        print(f"  fidelity {path.stem} x{k}: cuts {plan.cuts}, max abs diff {result.max_abs_diff:.3g}")
    return rows


def devices(folder: Path) -> list[str]:
    board = folder / "board.yaml"
    board.write_text("name: board\ndescription: camera board at half this host's speed\nruntime: onnxruntime\n"
                     "threads: 1\nrelative_speed: 0.5\n")
    return [str(board), "host-1t"]


def cut_by_bandwidth(path: Path, folder: Path) -> dict[str, Any]:
    """One profile, many bandwidths: where the latency-optimal cut goes as the link gets thinner."""
    import onnx

    from edgeopt.devices import get_device
    from edgeopt.split.graph import GraphCuts
    from edgeopt.split.planner import Link, plan_cuts
    from edgeopt.split.profile import profile_segments

    graph = GraphCuts(onnx.load(str(path)))
    profile = profile_segments(graph, graph.valid(), threads=1)
    profiles = [get_device(d) for d in devices(folder)]
    rows = []
    for mbps in (1.0, 5.0, 20.0, 100.0, 300.0, 1000.0, 10000.0):
        plan = plan_cuts(profile, profiles, Link(mbps, LINK_LATENCY_MS), objective="latency",
                         n_nodes=len(graph.nodes), inputs=graph.input_names, outputs=graph.output_names)
        rows.append({"link_mbps": mbps, "cut_after_node": plan.cuts[0], "cut_bytes": plan.stages[0].out_bytes,
                     "board_ms": round(plan.stages[0].compute_ms, 2), "transfer_ms": round(plan.stages[0].transfer_ms, 2),
                     "gateway_ms": round(plan.stages[1].compute_ms, 2),
                     "predicted_latency_ms": round(plan.predicted_latency_ms, 2)})
        print(f"  {path.stem} plan @ {mbps:g} Mbit/s: cut after node {plan.cuts[0]} ({plan.stages[0].out_bytes} B), "
              f"predicted {plan.predicted_latency_ms:.1f} ms")
    return {"model": path.stem, "profile": {k: round(v, 3) for k, v in profile.details.items()}, "plans": rows}


def prediction(path: Path, folder: Path, items: int) -> list[dict[str, Any]]:
    model = load_model(path)
    quick = BenchSettings(warmup=2, min_runs=10, min_seconds=0.3, max_seconds=5.0)
    rows = []
    for mbps in BANDWIDTHS_MBPS:
        out = folder / f"{path.stem}_bw{int(mbps)}"
        before = benchmark(model, settings=quick, runtime="onnxruntime", threads=1).latency_ms["p50"]
        plan = split_model(path, devices(folder), out_dir=out, link_mbps=mbps,
                           link_latency_ms=LINK_LATENCY_MS, objective="latency")
        result = run_pipeline(out, items=items, simulate_link=True, simulate_devices=True)
        after = benchmark(model, settings=quick, runtime="onnxruntime", threads=1).latency_ms["p50"]
        stage0, stage1 = plan.stages
        rows.append({"model": path.stem, "link_mbps": mbps, "link_latency_ms": LINK_LATENCY_MS,
                     "cut_after_node": plan.cuts[0], "cut_tensor": stage0.outputs[0], "cut_bytes": stage0.out_bytes,
                     "board_compute_ms": round(stage0.compute_ms, 3), "transfer_ms": round(stage0.transfer_ms, 3),
                     "gateway_compute_ms": round(stage1.compute_ms, 3),
                     "predicted_latency_ms": round(result.predicted_latency_ms, 3),
                     "measured_latency_p50_ms": round(result.latency_ms["p50"], 3),
                     "measured_latency_mean_ms": round(result.latency_ms["mean"], 3),
                     "error": round(result.latency_error, 4), "within_25_percent": abs(result.latency_error) <= 0.25,
                     "max_abs_diff": result.max_abs_diff,
                     "whole_model_p50_ms_before_after": [round(before, 3), round(after, 3)],
                     "load_drift": round(after / before, 3)})
        print(f"  {path.stem} @ {mbps:g} Mbit/s: cut after node {plan.cuts[0]} ({stage0.out_bytes} B), predicted "
              f"{result.predicted_latency_ms:.1f} ms, measured p50 {result.latency_ms['p50']:.1f} ms "
              f"({100 * result.latency_error:+.1f}%)")
    return rows


def throughput(path: Path, folder: Path, items: int, rounds: int) -> dict[str, Any]:
    one = folder / f"{path.stem}_one"
    two = folder / f"{path.stem}_two"
    split_model(path, ["host-1t"], out_dir=one, link_mbps=1000)
    plan = split_model(path, ["host-1t", "host-1t"], out_dir=two, link_mbps=1000, objective="throughput")
    model = load_model(path)
    settings = BenchSettings(warmup=3, min_runs=items, min_seconds=1.0, max_seconds=10.0)
    per_round = []
    for r in range(rounds):
        seq = benchmark(model, settings=settings, runtime="onnxruntime", threads=1).throughput_ips
        single = run_pipeline(one, items=items).throughput_ips
        pipe = run_pipeline(two, items=items).throughput_ips
        per_round.append({"round": r, "unsplit_in_process_ips": round(seq, 2), "unsplit_1_stage_pipeline_ips":
                          round(single, 2), "two_stage_pipeline_ips": round(pipe, 2),
                          "speedup_vs_in_process": round(pipe / seq, 3), "speedup_vs_1_stage": round(pipe / single, 3)})
        print(f"  {path.stem} round {r}: unsplit {seq:.1f}/s (1-stage pipeline {single:.1f}/s), "
              f"2 stages {pipe:.1f}/s -> {pipe / seq:.2f}x")
    speedups = sorted(row["speedup_vs_in_process"] for row in per_round)
    return {"model": path.stem, "cut": plan.cuts, "stage_host_ms": [round(s.host_ms, 3) for s in plan.stages],
            "rounds": per_round, "median_speedup": speedups[len(speedups) // 2],
            "meets_1_5x": speedups[len(speedups) // 2] >= 1.5}


def start_server(stage: Path) -> tuple[subprocess.Popen[str], str]:
    """``edgeopt serve STAGE --port 0`` at 1 thread, batching off; returns the process and its URL once ready."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "edgeopt", "serve", str(stage), "--port", "0", "--threads", "1",
                             "--max-batch", "1", "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"edgeopt serve {stage} did not start: {line!r}")
    url = line.split("listening on ")[1].split()[0]
    for _ in range(600):
        try:
            if httpx.get(url + "/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"edgeopt serve {stage} never became ready")


def oip(path: Path, folder: Path, items: int, rounds: int) -> dict[str, Any]:
    out = folder / f"{path.stem}_oip"
    plan = split_model(path, ["host-1t", "host-1t"], out_dir=out, link_mbps=1000, objective="throughput")
    servers = []
    try:
        for stage in plan.stages:
            servers.append(start_server(out / stage.path))
        urls = ",".join(url for _, url in servers)
        per_round = []
        for r in range(rounds):
            local = run_pipeline(out, items=items)
            remote = run_remote(out, urls, items=items)
            row = {"round": r,
                   "local_latency_p50_ms": round(local.latency_ms["p50"], 3),
                   "oip_latency_p50_ms": round(remote.latency_ms["p50"], 3),
                   "latency_ratio_oip_over_local": round(remote.latency_ms["p50"] / local.latency_ms["p50"], 3),
                   "local_throughput_ips": round(local.throughput_ips, 2),
                   "oip_throughput_ips": round(remote.throughput_ips, 2),
                   "throughput_ratio_oip_over_local": round(remote.throughput_ips / local.throughput_ips, 3),
                   "oip_stage_round_trip_p50_ms": [round(s["round_trip_ms"]["p50"], 3) for s in remote.remote or []],
                   "oip_stage_server_mean_ms": [None if s["server_mean_ms"] is None else round(s["server_mean_ms"], 3)
                                                for s in remote.remote or []],
                   "max_abs_diff": {"local": local.max_abs_diff, "oip": remote.max_abs_diff}}
            per_round.append(row)
            print(f"  {path.stem} round {r}: p50 local {row['local_latency_p50_ms']:.1f} ms, OIP "
                  f"{row['oip_latency_p50_ms']:.1f} ms ({row['latency_ratio_oip_over_local']:.2f}x); throughput local "
                  f"{row['local_throughput_ips']:.1f}/s, OIP {row['oip_throughput_ips']:.1f}/s "
                  f"({row['throughput_ratio_oip_over_local']:.2f}x)")
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)

    def median(key: str) -> float:
        values = sorted(row[key] for row in per_round)
        return values[len(values) // 2]

    return {"model": path.stem, "cut": plan.cuts, "cut_bytes": plan.stages[0].out_bytes,
            "in_flight": len(plan.stages) + 1, "server": "edgeopt serve, 1 thread, --max-batch 1, 127.0.0.1",
            "rounds": per_round, "median_latency_ratio": median("latency_ratio_oip_over_local"),
            "median_throughput_ratio": median("throughput_ratio_oip_over_local")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--only", default="fidelity,cut_by_bandwidth,prediction,throughput",
                        help="sections to run (oip too); a partial run writes split_<sections>.json instead of split.json")
    args = parser.parse_args()
    sections = args.only.split(",")
    started = time.time()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"fidelity": [], "cut_by_bandwidth": [], "prediction": [], "throughput": [], "oip": []}
    with tempfile.TemporaryDirectory(prefix="edgeopt-split-bench-") as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            path = export(name, folder)
            if "fidelity" in sections:
                results["fidelity"] += fidelity(path, folder, args.items)
            if "cut_by_bandwidth" in sections:
                results["cut_by_bandwidth"].append(cut_by_bandwidth(path, folder))
            if "prediction" in sections:
                results["prediction"] += prediction(path, folder, args.items)
            if "throughput" in sections:
                results["throughput"].append(throughput(path, folder, args.items, args.rounds))
            if "oip" in sections:
                results["oip"].append(oip(path, folder, args.items, args.rounds))
    by_model: dict[str, list[int]] = {}
    for row in results["prediction"]:
        by_model.setdefault(row["model"], []).append(row["cut_after_node"])
    payload = {
        "command": "python benchmarks/split.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg(),
                    "note": "shared machine under load from other jobs; ratios within a round are what to trust"},
        "summary": {
            "all_outputs_within_1e-5": all(r["ok"] for r in results["fidelity"]) if results["fidelity"] else None,
            "predictions_within_25_percent": sum(r["within_25_percent"] for r in results["prediction"]),
            "predictions": len(results["prediction"]),
            "measured_cut_by_bandwidth": {m: dict(zip([f"{b:g}" for b in BANDWIDTHS_MBPS], cuts, strict=True))
                                          for m, cuts in by_model.items()},
            "planned_cut_by_bandwidth": {c["model"]: {f"{p['link_mbps']:g}": p["cut_after_node"] for p in c["plans"]}
                                         for c in results["cut_by_bandwidth"]},
            "throughput_median_speedup": {t["model"]: t["median_speedup"] for t in results["throughput"]},
            "oip_over_local_median": {o["model"]: {"latency": o["median_latency_ratio"],
                                                   "throughput": o["median_throughput_ratio"]} for o in results["oip"]},
        },
        **results,
        "seconds": round(time.time() - started, 1),
    }
    full = len(sections) == 4 and args.models == "mobilenet_v2,resnet18"
    name = "split" if full else "split_" + "_".join(sections + args.models.split(","))
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    write_json(out, payload)
    print(f"wrote {out.relative_to(ROOT)} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
