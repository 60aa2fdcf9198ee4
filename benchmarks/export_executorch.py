"""MobileNetV2 and ResNet18 -> ExecuTorch .pte (XNNPACK) FP32 and INT8, beside ONNX Runtime, OpenVINO and LiteRT.

For each torchvision factory model (weights=None: nothing is downloaded):

- BatchNorm statistics are re-estimated on real photos (scikit-image's bundled images: random crops,
  flips and scales at 224x224, ImageNet normalisation), so activations look like a real network's;
  random-weight outputs are still near-ties across 1000 classes, so agreement says little and cosine
  is the fidelity figure.
- The photos are split by *image*: BN re-estimation and INT8 calibration crops come from one group
  of photos, the judged crops from the others (never seen by any step that built a variant).
- Variants: ExecuTorch FP32 and INT8 (``edgeopt.to_executorch``: PT2E + XNNPACK quantizer, per-channel
  weights, 64 calibration crops), ONNX FP32 and static INT8 QDQ (``edgeopt.quantize``), the same two
  ONNX files in OpenVINO, LiteRT FP32 and full INT8 (``export_tflite``). Fidelity is cosine (mean,
  min) and top-1 agreement against PyTorch eager on the judged crops.
- All variants of a model are timed interleaved in one process (``measure.compare``, batch 1, one
  thread): ratios are what to read on a loaded machine; the load average is recorded.
- ``edgeopt bench`` on each .pte (a subprocess, as a user runs it) is compared with a bare
  ``executorch.runtime`` loop (another subprocess: load, warm up, time ``execute`` alone), alternating
  the two three times; the ratio of their medians must be within 5 %.

Writes benchmarks/results/export_executorch.json (``--only NAME`` reruns one model, keeps the other).

Run: .venv/bin/python benchmarks/export_executorch.py [--only mobilenet_v2|resnet18] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize_peers import reestimate_batchnorm  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare, speedup_interval  # noqa: E402
from edgeopt.measure.evaluate import fidelity, predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.runtimes.sessions import resolve_settings  # noqa: E402
from edgeopt.training import TrainSettings
from edgeopt.transforms.executorch import ExecutorchExport, to_executorch  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.quantize import StaticInt8, quantize  # noqa: E402
from edgeopt.transforms.tflite import TfliteExport, export_tflite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "export_executorch.json"
MODELS = ("mobilenet_v2", "resnet18")
SIZE = 224
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "camera", "brick")
JUDGED_PHOTOS = ("rocket", "cat", "hubble_deep_field", "retina", "coins", "grass", "moon")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
FLOORS = {"fp32": 0.999, "int8": 0.98}
CACHE = Path(os.environ.get("EDGEOPT_BENCH_CACHE", "/tmp/edgeopt-bench-cache")) / "export_executorch"

BARE_LOOP = r'''
import sys, time, numpy as np, torch
from executorch.runtime import Runtime
from executorch.extension.pybindings import portable_lib
path, seconds, runs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
portable_lib._unsafe_reset_threadpool(1)
program = Runtime.get().load_program(open(path, "rb").read())
method = program.load_method("forward")
meta = program.metadata("forward").input_tensor_meta(0)
x = torch.from_numpy(np.random.default_rng(0).standard_normal(tuple(meta.sizes())).astype(np.float32))
for _ in range(10):
    method.execute([x])
times = []
start = time.perf_counter()
while len(times) < runs or time.perf_counter() - start < seconds:
    t = time.perf_counter()
    method.execute([x])
    times.append((time.perf_counter() - t) * 1000)
print(float(np.percentile(times, 50)))
'''


def photos(names: tuple[str, ...]) -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out.append(image[..., :3].astype(np.float32) / 255.0)
    return out


def crops(images: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``n`` random crops (30-100 % of the short side), random flips, resized to 224, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    batch = []
    for i in range(n):
        image = images[i % len(images)]
        h, w = image.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side].transpose(2, 0, 1)))
        patch = torch.nn.functional.interpolate(patch[None], size=(SIZE, SIZE), mode="bilinear",
                                                align_corners=False, antialias=True)[0].numpy()
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        batch.append((patch - MEAN) / STD)
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def build_variants(name: str, module: Any, calibration: Dataset, judged: Dataset) -> tuple[list[tuple[str, Model, str]],
                                                                                          dict[str, Any]]:
    """(label, model, runtime) for every variant, and each variant's export record."""
    source = Model.from_torch(module, source=name, input_shape=(1, 3, SIZE, SIZE))
    records: dict[str, Any] = {}
    variants: list[tuple[str, Model, str]] = []

    cache = CACHE / name

    def timed(label: str, suffix: str, fn: Any) -> Model:
        """Build (or reuse from a crashed/earlier run of the same seeded network) one variant."""
        from edgeopt.model import load_model

        path, record = cache / f"{label}{suffix}", cache / f"{label}.json"
        if path.exists() and record.exists():
            records[label] = json.loads(record.read_text()) | {"reused_from_cache": True}
            print(f"  {label}: reused {path}", file=sys.stderr)
            return load_model(path)
        start = time.perf_counter()
        model, check = fn()
        records[label] = {"export_seconds": round(time.perf_counter() - start, 1),
                          "load_average_after": load_average(),
                          "export_check": check.to_dict() if check is not None else None}
        print(f"  {label}: built in {records[label]['export_seconds']} s", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        model.save(path)
        write_json(record, records[label])
        return load_model(path)

    for mode in ("none", "int8"):
        label = f"executorch-{'fp32' if mode == 'none' else 'int8'}"
        pte = timed(label, ".pte", lambda m=mode: to_executorch(
            source, ExecutorchExport(quantize=m, min_cosine=0.0), data=calibration))
        variants.append((label, pte, "executorch"))
    onnx_fp32 = timed("onnxruntime-fp32", ".onnx", lambda: to_onnx(source, OnnxExport(atol=1e-3), data=calibration))
    onnx_int8 = timed("onnxruntime-int8", ".onnx", lambda: (quantize(onnx_fp32, StaticInt8(), data=calibration), None))
    variants += [("onnxruntime-fp32", onnx_fp32, "onnxruntime"), ("onnxruntime-int8", onnx_int8, "onnxruntime"),
                 ("openvino-fp32", onnx_fp32, "openvino"), ("openvino-int8 (ORT QDQ)", onnx_int8, "openvino")]
    for mode in ("none", "int8"):
        label = f"litert-{'fp32' if mode == 'none' else 'int8'}"
        tfl = timed(label, ".tflite", lambda m=mode: export_tflite(
            source, [TfliteExport(m, min_cosine=0.0, calibration_samples=64)], data=calibration)[0])
        variants.append((label, tfl, "litert"))
    del judged
    return variants, records


def bench_agreement(paths: dict[str, Path], seconds: float) -> list[dict[str, Any]]:
    """`edgeopt bench` (CLI subprocess) vs a bare executorch.runtime loop (subprocess), alternated 3 times."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    rows = []
    for label, path in paths.items():
        cli_p50, bare_p50 = [], []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-m", "edgeopt", "bench", str(path), "--threads", "1", "--runs", "100",
                                  "--seconds", str(seconds), "--json", "-"], capture_output=True, text=True,
                                 check=True, env=env)
            cli_p50.append(json.loads(out.stdout)["latency_ms"]["p50"])
            out = subprocess.run([sys.executable, "-c", BARE_LOOP, str(path), str(seconds), "100"],
                                 capture_output=True, text=True, check=True, env=env)
            bare_p50.append(float(out.stdout.strip().splitlines()[-1]))
        ratio = float(np.median(cli_p50) / np.median(bare_p50))
        rows.append({"model": label, "edgeopt_bench_p50_ms": [round(v, 3) for v in cli_p50],
                     "bare_loop_p50_ms": [round(v, 3) for v in bare_p50], "ratio_of_medians": round(ratio, 4),
                     "within_5pct": abs(ratio - 1) <= 0.05, "load_average": load_average()})
        print(f"  bench vs bare loop {label}: {ratio:.3f}", file=sys.stderr)
    return rows


def run_model(name: str, seconds: float) -> dict[str, Any]:
    print(f"{name}:", file=sys.stderr)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    calib_photos, judged_photos = photos(CALIBRATION_PHOTOS), photos(JUDGED_PHOTOS)
    net = getattr(torchvision.models, name)(weights=None)
    reestimate_batchnorm(net, crops(calib_photos, 96, seed=10))
    calibration = Dataset({"x": crops(calib_photos, 64, seed=11)}, None, source="calibration crops")
    judged = Dataset({"x": crops(judged_photos, 64, seed=12)}, None, source="judged crops")
    with torch.no_grad():
        reference = net(torch.from_numpy(judged.inputs["x"])).numpy()
    variants, records = build_variants(name, net, calibration, judged)
    rows: list[dict[str, Any]] = []
    for label, model, runtime in variants:
        out = predict(model, judged, settings=resolve_settings(model, runtime=runtime, threads=1))
        agreement, cos, min_cos = fidelity(out, reference)
        rows.append({"variant": label, "runtime": runtime, "size_bytes": model.size_bytes,
                     "cosine_vs_pytorch": round(cos, 6), "min_cosine_vs_pytorch": round(min_cos, 6),
                     "agreement_vs_pytorch": round(agreement, 4)})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, model, _ in variants:
            if model.format == "executorch":
                paths[label] = model.save(Path(tmp) / f"{label}.pte").path
        load_before = load_average()
        settings = BenchSettings(warmup=10, min_runs=50, min_seconds=seconds, max_seconds=max(30.0, seconds))
        timings = compare([m for _, m, _ in variants], settings=settings,
                          run_settings=[resolve_settings(m, runtime=r, threads=1) for _, m, r in variants])
        load_after = load_average()
        agreement_rows = bench_agreement(paths, seconds)
    base = timings[0]
    fp32_size = {"executorch": rows[0]["size_bytes"], "onnxruntime": rows[2]["size_bytes"],
                 "openvino": rows[4]["size_bytes"], "litert": rows[6]["size_bytes"]}
    for row, t in zip(rows, timings, strict=True):
        row["p50_ms"] = round(t.latency_ms["p50"], 3)
        row["p90_ms"] = round(t.latency_ms["p90"], 3)
        row["speedup_vs_executorch_fp32"] = round(base.latency_ms["p50"] / t.latency_ms["p50"], 3)
        interval = speedup_interval(base, t) if t is not base else None
        row["speedup_interval_90"] = [round(v, 3) for v in interval] if interval else None
        row["size_vs_own_fp32"] = round(fp32_size[row["runtime"]] / row["size_bytes"], 2)
        row["meets_floor"] = row["cosine_vs_pytorch"] >= FLOORS["int8" if "int8" in row["variant"] else "fp32"]
        row["runtime_details"] = t.runtime_details if row["runtime"] == "executorch" else None
    et_fp32, et_int8 = rows[0], rows[1]
    return {"model": f"torchvision {name} (random weights, BN re-estimated on real photos)",
            "inputs": f"{len(judged)} judged crops of {', '.join(JUDGED_PHOTOS)} (scikit-image); calibration and BN "
                      f"crops from {', '.join(CALIBRATION_PHOTOS)}",
            "reference_output_std": float(reference.std()),
            "variants": rows, "exports": records,
            "timing": {"threads": 1, "batch": 1, "interleaved": True, "seconds_per_model": seconds,
                       "load_average_before": load_before, "load_average_after": load_after},
            "bench_vs_bare_executorch_loop": agreement_rows,
            "summary": {"fp32_cosine": et_fp32["cosine_vs_pytorch"], "int8_cosine": et_int8["cosine_vs_pytorch"],
                        "int8_size_ratio": round(et_fp32["size_bytes"] / et_int8["size_bytes"], 2),
                        "int8_speedup_vs_fp32": round(et_fp32["p50_ms"] / et_int8["p50_ms"], 2)}}


def run_trained(seconds: float) -> dict[str, Any]:
    """MobileNetV2 (torchvision, via the catalogue) trained on real digits: INT8 fidelity with trained weights."""
    from edgeopt.data import load_data
    from edgeopt.measure.evaluate import accuracy_of
    from edgeopt.training import TrainConfig, accuracy_torch, fit
    from edgeopt.transforms.architectures import build_architecture

    digits = ROOT / "examples" / "digits"
    train, test = load_data(digits / "train.npz"), load_data(digits / "test.npz")
    config = TrainConfig(augment_shift=2, train=TrainSettings(epochs=12, lr=3e-3, batch_size=64, seed=0))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build_architecture("mobilenet_v2", input_size=(1, 32, 32), classes=10, small_input_stem=False)
    start = time.perf_counter()
    fit(net, train, config=config, description="mobilenet_v2 on digits")
    train_seconds = time.perf_counter() - start
    net.eval()
    source = Model.from_torch(net, source="mobilenet_v2 trained on digits", input_shape=(1, 1, 32, 32))
    with torch.no_grad():
        reference = net(torch.from_numpy(test.inputs["x"])).numpy()
    rows, models = [], []
    for mode in ("none", "int8"):
        start = time.perf_counter()
        pte, check = to_executorch(source, ExecutorchExport(quantize=mode, min_cosine=0.0), data=train)
        out = predict(pte, test, settings=resolve_settings(pte, threads=1))
        agreement, cos, min_cos = fidelity(out, reference)
        rows.append({"variant": f"executorch-{'fp32' if mode == 'none' else 'int8'}", "size_bytes": pte.size_bytes,
                     "export_seconds": round(time.perf_counter() - start, 1),
                     "test_accuracy": round(accuracy_of(out, test.labels), 4),
                     "cosine_vs_pytorch": round(cos, 6), "min_cosine_vs_pytorch": round(min_cos, 6),
                     "agreement_vs_pytorch": round(agreement, 4),
                     "meets_floor": cos >= FLOORS["int8" if mode == "int8" else "fp32"],
                     "delegation": check.delegation.to_dict() | {"delegated_ops": None}})
        models.append(pte)
    load_before = load_average()
    timings = compare(models, settings=BenchSettings(warmup=10, min_runs=100, min_seconds=seconds), threads=1)
    for row, t in zip(rows, timings, strict=True):
        row["p50_ms"] = round(t.latency_ms["p50"], 3)
        row["speedup_vs_fp32"] = round(timings[0].latency_ms["p50"] / t.latency_ms["p50"], 3)
    return {"model": "torchvision MobileNetV2 (catalogue, 1x32x32, 10 classes) trained 12 epochs on "
                     "examples/digits/train.npz; INT8 calibrated on 128 training images",
            "pytorch_test_accuracy": round(accuracy_torch(net, test), 4), "train_seconds": round(train_seconds, 1),
            "judged_on": f"{len(test)} test images (examples/digits/test.npz)", "variants": rows,
            "timing": {"threads": 1, "interleaved": True, "load_average_before": load_before,
                       "load_average_after": load_average()},
            "summary": {"int8_cosine": rows[1]["cosine_vs_pytorch"],
                        "int8_size_ratio": round(rows[0]["size_bytes"] / rows[1]["size_bytes"], 2),
                        "int8_speedup_vs_fp32": rows[1]["speedup_vs_fp32"]}}


def bench_overhead(seconds: float) -> dict[str, Any]:
    """The same .pte timed by edgeopt's session (what `edgeopt bench` runs) and by a bare ``execute`` loop,
    interleaved in one process (paired rounds, one thread): the subprocess comparison above is at the
    mercy of the machine's load between runs; this one is not."""
    from edgeopt.measure import harness
    from edgeopt.measure.bench import example_feeds
    from edgeopt.model import load_model
    from edgeopt.runtimes.executorch import ExecutorchRuntime, native_stderr_quiet, pool_threads

    et_runtime = __import__("executorch.runtime", fromlist=["Runtime"])
    rows = []
    for name in MODELS:
        for label in ("executorch-fp32", "executorch-int8"):
            path = CACHE / name / f"{label}.pte"
            model = load_model(path)
            session = ExecutorchRuntime().load(model, threads=1)
            pool_threads(1)
            program = et_runtime.Runtime.get().load_program(path.read_bytes())
            with native_stderr_quiet():
                method = program.load_method("forward")
            feeds = example_feeds(model, batch=1)
            x = torch.from_numpy(feeds["input"])
            for _ in range(10):
                session.run(feeds)
                method.execute([x])
            _, rounds = harness.interleaved([lambda s=session, f=feeds: s.run(f), lambda m=method, t=x: m.execute([t])],
                                            min_runs=50, min_seconds=seconds, max_seconds=max(30.0, seconds),
                                            round_seconds=0.25)
            paired = np.asarray(rounds[0]) / np.asarray(rounds[1])
            rows.append({"model": f"{name} {label}", "edgeopt_session_round_p50_ms": round(float(np.median(rounds[0])), 3),
                         "bare_execute_round_p50_ms": round(float(np.median(rounds[1])), 3),
                         "rounds": len(paired), "median_paired_ratio": round(float(np.median(paired)), 4),
                         "within_5pct": bool(abs(float(np.median(paired)) - 1) <= 0.05), "load_average": load_average()})
            print(f"  {rows[-1]}", file=sys.stderr)
            del session, method, program
    return {"what": "edgeopt's ExecuTorch session (the harness `edgeopt bench` uses) vs a bare executorch.runtime "
                    "execute loop on the same .pte, interleaved in one process, 1 thread; ratio = median of "
                    "paired per-round medians (> 1: edgeopt slower)", "rows": rows}


def print_table(name: str, case: dict[str, Any]) -> None:
    print(f"\n{name} (batch 1, 1 thread, interleaved; load average {case['timing']['load_average_before']} -> "
          f"{case['timing']['load_average_after']} on 2 shared cores: read the ratios)")
    print(f"{'variant':28} {'size MB':>8} {'x smaller':>9} {'cosine':>9} {'min cos':>9} {'agree':>6} "
          f"{'p50 ms':>8} {'vs ET fp32':>10}")
    for r in case["variants"]:
        print(f"{r['variant']:28} {r['size_bytes'] / 1e6:8.2f} {r['size_vs_own_fp32']:9.2f} {r['cosine_vs_pytorch']:9.5f} "
              f"{r['min_cosine_vs_pytorch']:9.5f} {r['agreement_vs_pytorch']:6.2f} {r['p50_ms']:8.2f} "
              f"{r['speedup_vs_executorch_fp32']:9.2f}x")
    for r in case["bench_vs_bare_executorch_loop"]:
        print(f"edgeopt bench vs bare executorch.runtime loop, {r['model']}: {r['ratio_of_medians']:.3f} "
              f"({'within' if r['within_5pct'] else 'NOT within'} 5 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=(*MODELS, "mobilenet_v2_digits", "bench_overhead"))
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    cases = dict(previous.get("cases", {}))
    start = time.perf_counter()
    for name in ([args.only] if args.only else (*MODELS, "mobilenet_v2_digits")):
        if name == "mobilenet_v2_digits":
            cases[name] = run_trained(args.seconds)
            print(json.dumps(cases[name]["summary"]))
        elif name == "bench_overhead":
            cases[name] = bench_overhead(args.seconds)
        else:
            cases[name] = run_model(name, args.seconds)
            print_table(name, cases[name])
        cases[name]["command"] = f"python benchmarks/export_executorch.py --only {name} --seconds {args.seconds}"
        latest = json.loads(OUT.read_text()).get("cases", {}) if OUT.exists() else {}  # another --only run
        cases = {**latest, name: cases[name]}
        write_json(OUT, _payload(cases, args))
    print(f"\nwrote {OUT} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def _payload(cases: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import executorch

    return {"benchmark": "export_executorch",
            "command": "python benchmarks/export_executorch.py" + (f" --only {args.only}" if args.only else "")
                       + f" --seconds {args.seconds}",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(),
                        "note": "2 CPU cores shared with other engineers' jobs: compare ratios, not absolute times"},
            "versions": {"executorch": getattr(executorch, "__version__", "1.5.1"), "torch": torch.__version__},
            "cases": cases}


if __name__ == "__main__":
    main()
