"""MobileNetV2 -> .tflite FP32 / dynamic INT8 / full INT8 / FP16: size, LiteRT latency and fidelity.

Two cases, kept apart in the JSON (``cases``) and in the printed summary:

- ``random_weights``: torchvision MobileNetV2 at 224x224 with random weights (weights=None: nothing
  is downloaded) measures *speed* on the full-size network. Random weights give near-constant
  outputs, so BatchNorm statistics are first re-estimated (train mode, no gradient) on fixed random
  calibration images; even then the outputs are near-tied across 1000 classes, so this case's
  cosine and agreement say little about what a trained model loses to quantization.
- ``trained``: the same torchvision MobileNetV2 (width 1.0) built through edgeopt's catalogue for
  1x32x32 digits (first convolution for 1 channel, 10-class head), trained with ``edgeopt.training.fit`` on
  examples/digits/train.npz (seeded, one torch thread). Its *fidelity* is the one that means
  something: test accuracy, agreement and cosine of each variant against the FP32 ``.tflite``
  over the 539 test images; full INT8 is calibrated on training images only (128, as ``edgeopt
  export`` does by default; 32 and all 1258 are recorded too). A control runs the same network
  untrained (BatchNorm re-estimated, as above) through the same export. The catalogue's
  stock stem (stride 2) is kept: the stride-1 "small input" stem costs 4x the MACs and does not
  train within ~2 minutes on 2 shared cores.

Each variant is exported with edgeopt's ``export_tflite`` (litert-torch + ai-edge-quantizer,
verified on the export data), evaluated in LiteRT with ``evaluate``, and all variants of a case are
timed interleaved in one process with ``measure.compare`` (LiteRT; the random case also times its
ONNX export in ONNX Runtime). Writes benchmarks/results/export_tflite.json; ``--only`` reruns one
case and keeps the other's recorded results.

Run: .venv/bin/python benchmarks/export_tflite.py [--only random|trained] [--threads 1,2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_peers import reestimate_batchnorm  # noqa: E402

from edgeopt.data import Dataset, load_data  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchResult, BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import evaluate  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.training import (  # noqa: E402
    TrainConfig,
    TrainSettings,
    accuracy_torch,
    fit,
)
from edgeopt.transforms.architectures import build_architecture  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.tflite import (  # noqa: E402
    DEFAULT_MIN_COSINE,
    QUANTIZE_MODES,
    TfliteExport,
    export_tflite,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "export_tflite.json"
DIGITS = ROOT / "examples" / "digits"
MAX_DROP_PT = 1.0  # accuracy a quantized variant may lose against FP32, in points


def machine() -> dict[str, str]:
    return {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "note": "2 shared CPU cores, loaded by other jobs: compare ratios, not absolute times"}


def all_variants(source: Model, data: Dataset) -> list[tuple[Model, Any]]:
    # min_cosine=0: record every variant's fidelity (judged against the floors here) instead of
    # stopping at the first one under its floor, as `edgeopt export` would.
    return export_tflite(source, [TfliteExport(quantize=m, min_cosine=0.0) for m in QUANTIZE_MODES], data=data)


def timing_row(name: str, result: BenchResult, base: BenchResult) -> dict[str, Any]:
    return {"model": name, "runtime": result.runtime, "p50_ms": round(result.latency_ms["p50"], 3),
            "p90_ms": round(result.latency_ms["p90"], 3), "mean_ms": round(result.latency_ms["mean"], 3),
            "runs": result.runs, "speedup_vs_tflite_fp32": round(base.latency_ms["p50"] / result.latency_ms["p50"], 3),
            "size_bytes": result.size_bytes}


# -- random weights, 224x224: speed ----------------------------------------------------------------
def images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (upsampled noise), normalized like ImageNet inputs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 28, 28, generator=g)
    return torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear").numpy().astype(np.float32)


def random_weights_case(args: argparse.Namespace) -> dict[str, Any]:
    calibration, heldout = images(args.calibration, 0), images(args.heldout, 1)
    torch.manual_seed(0)
    net = reestimate_batchnorm(torchvision.models.mobilenet_v2(weights=None), calibration)
    source = Model.from_torch(net, source="torchvision mobilenet_v2 (random weights, BN re-estimated)",
                              input_shape=(1, 3, 224, 224))
    cal = Dataset({"x": calibration}, None, "random images (calibration)")
    held = Dataset({"x": heldout}, None, "random images (held-out)")
    with torch.no_grad():
        ref = net(torch.from_numpy(heldout)).numpy()

    t0 = time.perf_counter()
    variants = all_variants(source, cal)
    export_s = time.perf_counter() - t0
    onnx_model, onnx_check = to_onnx(source, OnnxExport(dynamic_batch=False), data=cal)
    rows = []
    for mode, (model, check) in zip(QUANTIZE_MODES, variants, strict=True):
        held_eval = evaluate(model, held, reference=ref, threads=1)
        floor = DEFAULT_MIN_COSINE[mode]
        rows.append({"quantize": mode, "size_bytes": model.size_bytes,
                     "size_vs_fp32": round(model.size_bytes / variants[0][0].size_bytes, 4),
                     "export_check": check.to_dict(),
                     "heldout_cosine": held_eval.cosine, "heldout_agreement": held_eval.agreement,
                     "cosine_floor": floor, "meets_floor": bool(held_eval.cosine >= floor)})

    timings = {}
    settings = BenchSettings(warmup=5, min_runs=20, min_seconds=args.seconds, max_seconds=60.0)
    models = [m for m, _ in variants] + [onnx_model]
    names = [f"tflite-{m}" for m in QUANTIZE_MODES] + ["onnx-fp32 (onnxruntime)"]
    for threads in [int(t) for t in args.threads.split(",")]:
        results = compare(models, settings=settings, threads=threads)
        timings[str(threads)] = [timing_row(n, r, results[0]) for n, r in zip(names, results, strict=True)]
    return {
        "what": "speed of the full 224x224 network; fidelity figures are not representative (random "
                "weights: outputs near-tied across 1000 classes), see cases.trained for fidelity",
        "command": "python benchmarks/export_tflite.py --only random "
        f"--threads {args.threads} --seconds {args.seconds} --calibration {args.calibration} --heldout {args.heldout}",
        "model": source.source, "output_std_across_inputs": float(np.std(ref, axis=0).mean()),
        "machine": machine(), "export_seconds_all_variants": round(export_s, 1),
        "onnx_export_check": onnx_check.to_dict(), "variants": rows, "latency_interleaved": timings,
    }


# -- trained on digits, 32x32: fidelity ------------------------------------------------------------
def train_mobilenet(train: Dataset, config: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Catalogue MobileNetV2 (width 1.0, stock stride-2 stem) for 1x32x32 digits, trained with ``fit``."""
    torch.manual_seed(config.seed)
    net = build_architecture("mobilenet_v2", input_size=(1, 32, 32), classes=10, small_input_stem=False)
    result = fit(net, train, config=config, description="mobilenet_v2 on digits")
    return net, {"architecture": "mobilenet_v2 (width 1.0, stock stride-2 stem)", "train_samples": len(train),
                 "config": {k: v for k, v in vars(config).items() if k in ("epochs", "lr", "batch_size", "seed",
                                                                           "augment_shift", "optimizer")},
                 "seconds": round(result.seconds, 1), "final_loss": round(result.history[-1]["loss"], 4)}


def trained_case(args: argparse.Namespace) -> dict[str, Any]:
    train, test = load_data(DIGITS / "train.npz"), load_data(DIGITS / "test.npz")
    config = TrainConfig(augment_shift=2, train=TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=64, seed=0))
    net, training = train_mobilenet(train, config)
    training["pytorch_test_accuracy"] = accuracy_torch(net, test)
    source = Model.from_torch(net, source="mobilenet_v2 trained on digits (1x32x32, 10 classes)",
                              input_shape=(1, 1, 32, 32))
    with torch.no_grad():
        torch_out = net(torch.from_numpy(test.inputs["x"])).numpy()

    t0 = time.perf_counter()
    variants = all_variants(source, train)  # int8 calibrates on the first 128 training images
    export_s = time.perf_counter() - t0
    fp32 = evaluate(variants[0][0], test, reference=torch_out, threads=1, keep_outputs=True)
    results = compare([m for m, _ in variants], data=test, threads=1,
                      settings=BenchSettings(warmup=5, min_runs=50, min_seconds=args.seconds, max_seconds=60.0))
    rows = []
    for mode, (model, check), bench in zip(QUANTIZE_MODES, variants, results, strict=True):
        ev = evaluate(model, test, reference=fp32.outputs, threads=1)
        floor = DEFAULT_MIN_COSINE[mode]
        drop_pt = round(100 * (fp32.accuracy - ev.accuracy), 2)
        rows.append({"quantize": mode, "size_bytes": model.size_bytes,
                     "size_vs_fp32": round(model.size_bytes / variants[0][0].size_bytes, 4),
                     **{k: v for k, v in timing_row(f"tflite-{mode}", bench, results[0]).items()
                        if k not in ("model", "size_bytes")},
                     "test_accuracy": ev.accuracy, "accuracy_drop_pt": drop_pt,
                     "agreement_vs_fp32": ev.agreement, "cosine_vs_fp32": ev.cosine,
                     "min_cosine_vs_fp32": ev.min_cosine, "cosine_floor": floor,
                     "meets_floor": bool(ev.cosine >= floor), "within_1pt": bool(drop_pt <= MAX_DROP_PT),
                     "export_check": check.to_dict()})

    int8_sweep = calibration_sweep(source, train, test, fp32, sorted({32, len(train)}))
    control = untrained_control(train, test, config.seed)
    int8 = next(r for r in rows if r["quantize"] == "int8")
    ok = int8["meets_floor"] and int8["within_1pt"]
    return {
        "what": "fidelity on a trained network: test accuracy, and agreement/cosine vs the FP32 .tflite, "
                f"over the {len(test)} digits test images",
        "command": f"python benchmarks/export_tflite.py --only trained --epochs {args.epochs} --lr {args.lr} "
                   f"--seconds {args.seconds}",
        "model": source.source, "training": training, "machine": machine(),
        "data": {"train_and_calibration": "examples/digits/train.npz", "test": "examples/digits/test.npz",
                 "test_samples": len(test), "one_test_image_pt": round(100 / len(test), 3),
                 "int8_calibration": f"first {TfliteExport().calibration_samples} training images"},
        "fp32_tflite_vs_pytorch": {"agreement": fp32.agreement, "cosine": fp32.cosine},
        "export_seconds_all_variants": round(export_s, 1),
        "latency": "batch 1, 1 thread, LiteRT, all four variants interleaved (measure.compare), a test image",
        "variants": rows, "int8_calibration_sweep": int8_sweep, "untrained_control": control,
        "shows": {
            "int8_cosine_ge_0.98": int8["meets_floor"], "int8_within_1pt_of_fp32": int8["within_1pt"],
            "every_variant_meets_floor_and_1pt": all(r["meets_floor"] and r["within_1pt"] for r in rows),
            "conclusion": (
                f"trained: full INT8 keeps cosine {int8['cosine_vs_fp32']:.4f} vs FP32 and loses "
                f"{int8['accuracy_drop_pt']:.2f} pt ({int8['test_accuracy']:.2%} vs {fp32.accuracy:.2%}) "
                + ("(the 0.98 / 1 pt targets are met)" if ok else "(below the 0.98 / 1 pt targets)")
                + f"; the same network untrained, through the same export: INT8 cosine "
                f"{control['int8_cosine_vs_fp32']:.4f}, agreement {control['int8_agreement_vs_fp32']:.2%}"),
        },
    }


def untrained_control(train: Dataset, test: Dataset, seed: int) -> dict[str, Any]:
    """The same network before training (same initial weights, BatchNorm re-estimated on the
    calibration images, as in the random-weight case) through the same FP32 and full INT8 export."""
    torch.manual_seed(seed)
    net = build_architecture("mobilenet_v2", input_size=(1, 32, 32), classes=10, small_input_stem=False)
    limit = TfliteExport().calibration_samples
    net = reestimate_batchnorm(net, train.inputs["x"][:limit])
    source = Model.from_torch(net, source="mobilenet_v2 untrained (BN re-estimated)", input_shape=(1, 1, 32, 32))
    (fp32, _), (int8, _) = export_tflite(source, [TfliteExport(quantize=m, min_cosine=0.0) for m in ("none", "int8")],
                                         data=train)
    ref = evaluate(fp32, test, threads=1, keep_outputs=True)
    ev = evaluate(int8, test, reference=ref.outputs, threads=1)
    return {"model": source.source, "fp32_test_accuracy": ref.accuracy, "int8_agreement_vs_fp32": ev.agreement,
            "int8_cosine_vs_fp32": ev.cosine,
            "output_std_across_inputs": float(np.std(ref.outputs, axis=0).mean())}


def calibration_sweep(source: Model, train: Dataset, test: Dataset, fp32: Any, counts: list[int]
                      ) -> list[dict[str, Any]]:
    """Full INT8 with other numbers of calibration (training) images: is 128 enough?"""
    configs = [TfliteExport(quantize="int8", min_cosine=0.0, calibration_samples=n) for n in counts]
    out = []
    for n, (model, _) in zip(counts, export_tflite(source, configs, data=train), strict=True):
        ev = evaluate(model, test, reference=fp32.outputs, threads=1)
        out.append({"calibration_samples": n, "test_accuracy": ev.accuracy,
                    "accuracy_drop_pt": round(100 * (fp32.accuracy - ev.accuracy), 2),
                    "agreement_vs_fp32": ev.agreement, "cosine_vs_fp32": ev.cosine})
    return out


# -- summary ---------------------------------------------------------------------------------------
def print_summary(cases: dict[str, Any]) -> None:
    if "random_weights" in cases:
        case = cases["random_weights"]
        print(f"\n== random weights, 224x224: speed ({case['command']})")
        print("   fidelity below is NOT representative of a trained model")
        for threads, timing in case["latency_interleaved"].items():
            for row in timing:
                print(f"   threads={threads} {row['model']:<26} p50 {row['p50_ms']:8.3f} ms  "
                      f"x{row['speedup_vs_tflite_fp32']:.2f} vs tflite fp32")
        for row in case["variants"]:
            print(f"   {row['quantize']:<8} size {row['size_bytes'] / 1e6:6.2f} MB ({row['size_vs_fp32']:.2f}x)  "
                  f"held-out cosine vs PyTorch {row['heldout_cosine']:.5f}")
    if "trained" in cases:
        case = cases["trained"]
        print(f"\n== trained on digits, 1x32x32: fidelity ({case['command']})")
        print(f"   PyTorch test accuracy {case['training']['pytorch_test_accuracy']:.2%}, "
              f"trained in {case['training']['seconds']} s")
        print(f"   {'variant':<8} {'size MB':>8} {'p50 ms':>8} {'speed':>6} {'accuracy':>9} {'drop pt':>8} "
              f"{'agree':>7} {'cosine':>8}")
        for r in case["variants"]:
            print(f"   {r['quantize']:<8} {r['size_bytes'] / 1e6:8.2f} {r['p50_ms']:8.3f} "
                  f"{r['speedup_vs_tflite_fp32']:5.2f}x {r['test_accuracy']:9.2%} {r['accuracy_drop_pt']:8.2f} "
                  f"{r['agreement_vs_fp32']:7.2%} {r['cosine_vs_fp32']:8.5f}")
        for r in case["int8_calibration_sweep"]:
            print(f"   int8 calibrated on {r['calibration_samples']:>4} images: accuracy {r['test_accuracy']:.2%}, "
                  f"cosine {r['cosine_vs_fp32']:.5f}")
        control = case["untrained_control"]
        print(f"   untrained control (same export): int8 cosine {control['int8_cosine_vs_fp32']:.5f}, "
              f"agreement {control['int8_agreement_vs_fp32']:.2%}")
        print(f"   {case['shows']['conclusion']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["random", "trained"], help="run one case, keep the other's results")
    parser.add_argument("--threads", default="1,2", help="random case: comma-separated thread counts to time")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per model")
    parser.add_argument("--calibration", type=int, default=64, help="random case: calibration images")
    parser.add_argument("--heldout", type=int, default=32, help="random case: held-out images for fidelity")
    parser.add_argument("--epochs", type=int, default=12, help="trained case: training epochs")
    parser.add_argument("--lr", type=float, default=3e-3, help="trained case: learning rate")
    args = parser.parse_args()
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    cases = dict(previous.get("cases", {}))
    if args.only in (None, "random"):
        torch.set_num_threads(2)
        cases["random_weights"] = random_weights_case(args)
    if args.only in (None, "trained"):
        torch.set_num_threads(1)  # reproducible training that does not fight the other jobs for cores
        cases["trained"] = trained_case(args)
    write_json(OUT, {"benchmark": "export_tflite", "cases": cases})
    print_summary(cases)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
