"""The same INT8 idea, measured across formats and runtimes: ORT, OpenVINO, NNCF and edgeopt auto.

For each model (torchvision MobileNetV2 and ResNet18 with random weights, the bundled digits
CNN) this builds the peer configurations a user would reach for and times them INTERLEAVED in
one ``measure.compare`` run per thread count (1 and 2), batch 1:

- ``ort-fp32``: the FP32 ONNX model in ONNX Runtime (the baseline every ratio is against);
- ``ort-static-default``: ``onnxruntime.quantization.quantize_static`` with its defaults
  (QDQ, S8 activations, S8 weights, per-tensor, MinMax) in ONNX Runtime;
- ``ort-static-u8s8-perchannel``: ``quantize_static`` QDQ, U8 activations, S8 per-channel weights;
- ``openvino-f32``: the FP32 model in OpenVINO with an explicit f32 precision hint;
- ``openvino-default``: OpenVINO with no hint (BF16 on CPUs with AVX-512 BF16/AMX);
- ``openvino-nncf-int8``: ``nncf.quantize`` on the ONNX model (QDQ), run in OpenVINO;
- ``ort-u8s8-perchannel-in-openvino`` (extra): that same QDQ file executed by OpenVINO;
- ``ort-dynamic`` (extra): ``quantize_dynamic`` with its defaults, in ONNX Runtime;
- ``edgeopt-auto``: ``edgeopt.search.auto_quantize`` (``edgeopt quantize --mode auto``), chosen
  for the same thread count; reported as missing when that module is not in this checkout.

Every row reports p50 (and p90) latency, its ratio to ORT FP32 in the same interleaved run,
file size, and agreement/cosine with the FP32 model on held-out inputs not used for
calibration or for auto's choice. Torchvision models have random weights (no downloads); their
BatchNorm statistics are re-estimated in train mode on fixed random "images" first so the
outputs are not flat. Writes benchmarks/results/quantize_peers.json.

Run: .venv/bin/python benchmarks/quantize_peers.py [--models digits,mobilenet_v2,resnet18] [--quick]
The machine is shared: absolute times are noisy, the interleaved ratios are what to compare.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset, load_data
from edgeopt.fileio import write_json
from edgeopt.measure import BenchSettings, RunSettings, compare, evaluate, predict, resolve_settings
from edgeopt.model import Model, load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quantize_peers.json"
THREADS = (1, 2)
PEERS = ("ort-static-default", "ort-static-u8s8-perchannel", "ort-u8s8-perchannel-in-openvino", "ort-dynamic",
         "openvino-f32", "openvino-default", "openvino-nncf-int8")


@dataclass
class Case:
    name: str
    fp32: Model
    calibration: Dataset
    auto_eval: Dataset
    heldout: Dataset
    input_shape: tuple[int, ...]
    labelled: bool = False


@dataclass
class Variant:
    label: str
    model: Model | None
    runtime: str
    options: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    error: str | None = None
    note: str = ""
    threads: int | None = None  # set for variants built for one thread count (auto)
    tried: list[dict[str, Any]] = field(default_factory=list)  # auto: every variant it measured, as it saw them


# -- models and data ---------------------------------------------------------------------------
def smooth_images(n: int, seed: int, size: int) -> np.ndarray:
    """Random images with image-like structure: low-frequency colour blobs plus pixel noise."""
    torch = importlib.import_module("torch")
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn((n, 3, 7, 7), generator=gen) * (0.5 + torch.rand((n, 1, 1, 1), generator=gen))
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(x.shape, generator=gen)
    return x.numpy().astype(np.float32)


def reestimate_batchnorm(net: Any, images: np.ndarray, *, batch: int = 16) -> Any:
    """Reset every BatchNorm's running statistics and re-estimate them on ``images``; return ``net`` in eval mode.

    Random weights give flat outputs until BatchNorm statistics match real activations. The forward
    passes run in train mode without gradients; no weight changes.
    """
    torch = importlib.import_module("torch")
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the re-estimation batches
    net.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            net(torch.from_numpy(images[start:start + batch]))
    return net.eval()


def torchvision_case(name: str, *, size: int, n_calib: int, n_eval: int, n_heldout: int) -> Case:
    torch = importlib.import_module("torch")
    torchvision = importlib.import_module("torchvision")
    from edgeopt.transforms.export import OnnxExport, to_onnx

    torch.manual_seed(0)
    net = reestimate_batchnorm(getattr(torchvision.models, name)(weights=None),
                               smooth_images(64, seed=100, size=size))
    torch_model = Model.from_torch(net, source=name, input_shape=(1, 3, size, size))
    sample = Dataset({"input": smooth_images(2, seed=101, size=size)}, None, source="export-sample")
    fp32, _ = to_onnx(torch_model, OnnxExport(atol=1e-3), data=sample)
    fp32 = Model.from_onnx(fp32.onnx, source=name)

    def data(n: int, seed: int, tag: str) -> Dataset:
        return Dataset({"input": smooth_images(n, seed=seed, size=size)}, None, source=f"{name}-{tag}")

    return Case(name, fp32, data(n_calib, 1, "calibration"), data(n_eval, 2, "auto-eval"),
                data(n_heldout, 3, "heldout"), (1, 3, size, size))


def digits_case() -> Case:
    digits = ROOT / "examples" / "digits"
    fp32 = load_model(digits / "digits_cnn.onnx")
    fp32 = Model.from_onnx(fp32.onnx, source="digits_cnn")
    train = load_data(digits / "train.npz")
    return Case("digits_cnn", fp32, train.take(slice(0, 300)), train.take(slice(300, 600)),
                load_data(digits / "test.npz"), (1, 1, 32, 32), labelled=True)


# -- variants -----------------------------------------------------------------------------------
class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a Dataset, one sample a batch."""

    def __init__(self, data: Dataset, model: Model) -> None:
        self._items = [{k: v for k, v in feeds.items()} for feeds, _ in data.feeds_for(model).batches(1)]
        self._iter = iter(self._items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._items)


def ort_static(case: Case, *, defaults: bool) -> Model:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    kwargs: dict[str, Any] = {} if defaults else {
        "quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8, "per_channel": True}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(case.fp32.serialized())  # quantize_static moves a ModelProto's weights out in place
        quantize_static(src, out, _Reader(case.calibration, case.fp32), **kwargs)
        model = load_model(out)
        return Model.from_onnx(model.onnx, source=f"{case.name} [ort-static]")


def ort_dynamic(case: Case) -> Model:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(case.fp32.serialized())
        quantize_dynamic(src, out)
        return Model.from_onnx(load_model(out).onnx, source=f"{case.name} [ort-dynamic]")


def build(label: str, fn: Any, runtime: str, options: dict[str, Any] | None = None, note: str = "") -> Variant:
    start = time.perf_counter()
    try:
        model = fn()
    except Exception as exc:  # a peer that fails is a result to report, not a crash
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"  {label}: FAILED {text}", file=sys.stderr)
        return Variant(label, None, runtime, dict(options or {}), time.perf_counter() - start, error=text)
    return Variant(label, model, runtime, dict(options or {}), time.perf_counter() - start, note=note)


def peer_variants(case: Case) -> list[Variant]:
    from edgeopt.transforms.nncf_quantize import NncfInt8, nncf_quantize

    u8s8 = build("ort-static-u8s8-perchannel", lambda: ort_static(case, defaults=False), "onnxruntime",
                 note="quantize_static QDQ, U8 activations, S8 per-channel weights, MinMax")
    return [
        build("ort-fp32", lambda: case.fp32, "onnxruntime"),
        build("ort-static-default", lambda: ort_static(case, defaults=True), "onnxruntime",
              note="quantize_static defaults: QDQ, S8 activations, S8 weights, per-tensor, MinMax"),
        u8s8,
        Variant("ort-u8s8-perchannel-in-openvino", u8s8.model, "openvino", {}, error=u8s8.error,
                note="extra: the same ORT U8S8 per-channel QDQ file, executed by OpenVINO"),
        build("ort-dynamic", lambda: ort_dynamic(case), "onnxruntime",
              note="extra: quantize_dynamic defaults (INT8 weights, activations quantized at run time)"),
        build("openvino-f32", lambda: case.fp32, "openvino", {"precision": "f32"}),
        build("openvino-default", lambda: case.fp32, "openvino", {},
              note="no precision hint: OpenVINO's own CPU default"),
        build("openvino-nncf-int8", lambda: nncf_quantize(case.fp32, NncfInt8(), data=case.calibration),
              "openvino", note="nncf.quantize (ONNX backend, preset performance) -> QDQ ONNX"),
    ]


AUTO_BENCH = BenchSettings(warmup=5, min_runs=30, min_seconds=0.5, max_seconds=5.0)


def auto_variant(case: Case, threads: int) -> Variant:
    """edgeopt --mode auto for this thread count, or a 'missing' row when it is not built yet."""
    label = "edgeopt-auto"
    if importlib.util.find_spec("edgeopt.search.auto_quantize") is None:
        return Variant(label, None, "", error="missing: edgeopt.search.auto_quantize is not in this checkout",
                       threads=threads)
    module = importlib.import_module("edgeopt.search.auto_quantize")
    start = time.perf_counter()
    try:
        result = module.auto_quantize(case.fp32, case.calibration, eval_data=case.auto_eval, max_drop=0.01,
                                      threads=threads, bench=AUTO_BENCH)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"  {label} (threads {threads}): {type(exc).__name__}: {text}", file=sys.stderr)
        if not hasattr(exc, "exit_code"):
            traceback.print_exc()
        return Variant(label, None, "", error=f"{type(exc).__name__}: {text}", threads=threads,
                       build_seconds=time.perf_counter() - start)
    tried = [{k: r.to_dict().get(k) for k in ("name", "status", "speedup", "agreement", "drop", "reason")}
             for r in getattr(result, "results", [])]
    model = result if isinstance(result, Model) else getattr(result, "model", None)
    if model is None:
        return Variant(label, None, "", error="auto chose nothing: no variant was faster than FP32 within the budget",
                       threads=threads, build_seconds=time.perf_counter() - start, tried=tried)
    settings = resolve_settings(model, threads=threads)
    chosen = getattr(getattr(result, "chosen", None), "name", None) or model.metadata.get("edgeopt.recipe", "")
    return Variant(label, model, settings.runtime, dict(settings.options), time.perf_counter() - start,
                   note=f"chosen: {chosen}", threads=threads, tried=tried)


# -- measuring ----------------------------------------------------------------------------------
def effective_precision(variant: Variant, threads: int) -> dict[str, Any] | None:
    """What OpenVINO compiled (precision hint, per-layer compute precisions); None for ORT."""
    if variant.model is None or variant.runtime != "openvino":
        return None
    from edgeopt.runtimes import get_runtime

    session = get_runtime("openvino").load(variant.model, threads=threads, options=variant.options)
    details = dict(session.details)
    return {"inference_precision": details["inference_precision"],
            "compute_precisions": details["compute_precisions"]}


def fidelity_row(case: Case, variant: Variant, reference: np.ndarray) -> dict[str, Any]:
    if variant.model is None:
        return {}
    settings = RunSettings(variant.runtime, 2, dict(variant.options))
    result = evaluate(variant.model, case.heldout, reference=reference, settings=settings)
    row = {"agreement": result.agreement, "cosine": result.cosine, "min_cosine": result.min_cosine}
    if case.labelled:
        row["accuracy"] = result.accuracy
    return row


def run_case(case: Case, bench: BenchSettings, *, auto_threads: tuple[int, ...]) -> dict[str, Any]:
    print(f"[{case.name}] building variants", file=sys.stderr)
    variants = peer_variants(case)
    reference = predict(case.fp32, case.heldout, settings=RunSettings("onnxruntime", 2, {}))
    base_size = case.fp32.size_bytes
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        rows[v.label] = {"variant": v.label, "runtime": v.runtime, "runtime_options": v.options, "note": v.note,
                         "build_seconds": round(v.build_seconds, 2), "error": v.error, "latency": {}}
        if v.model is not None:
            rows[v.label].update({
                "size_bytes": v.model.size_bytes, "size_ratio_vs_fp32": round(base_size / v.model.size_bytes, 3),
                "effective": effective_precision(v, 1), **fidelity_row(case, v, reference)})
    auto_rows: list[dict[str, Any]] = []
    load: dict[str, dict[str, float]] = {}  # 1-minute load average around each timing run (2 cores)
    for threads in THREADS:
        timed = [v for v in variants if v.model is not None]
        auto = auto_variant(case, threads) if threads in auto_threads else Variant(
            "edgeopt-auto", None, "", threads=threads,
            error="not run for this model/thread count in this run (see --auto-models/--auto-threads)")
        auto_row = {"variant": "edgeopt-auto", "threads": threads, "runtime": auto.runtime,
                    "runtime_options": auto.options, "note": auto.note, "error": auto.error,
                    "build_seconds": round(auto.build_seconds, 2), "auto_tried": auto.tried}
        if auto.model is not None:
            timed.append(auto)
            auto_row.update({"size_bytes": auto.model.size_bytes,
                             "size_ratio_vs_fp32": round(base_size / auto.model.size_bytes, 3),
                             "effective": effective_precision(auto, threads),
                             **fidelity_row(case, auto, reference)})
        print(f"[{case.name}] timing {len(timed)} configurations interleaved at {threads} thread(s)",
              file=sys.stderr)
        load_before = os.getloadavg()[0]
        results = compare([v.model for v in timed], settings=bench, batch=1,
                          run_settings=[RunSettings(v.runtime, threads, dict(v.options)) for v in timed])
        load[str(threads)] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        base_p50 = results[0].latency_ms["p50"]
        for v, r in zip(timed, results, strict=True):
            entry = {"p50_ms": round(r.latency_ms["p50"], 4), "p90_ms": round(r.latency_ms["p90"], 4),
                     "mean_ms": round(r.latency_ms["mean"], 4), "runs": r.runs,
                     "ratio_vs_ort_fp32": round(r.latency_ms["p50"] / base_p50, 3),
                     "speedup_vs_ort_fp32": round(base_p50 / r.latency_ms["p50"], 3)}
            if v is auto:
                auto_row["latency"] = entry
            else:
                rows[v.label]["latency"][str(threads)] = entry
        auto_rows.append(auto_row)
    return {"model": case.name, "input_shape": list(case.input_shape), "fp32_size_bytes": base_size,
            "calibration_samples": len(case.calibration), "heldout_samples": len(case.heldout),
            "rows": list(rows.values()), "auto": auto_rows, "load_average": load,
            "summary": summarize(rows, auto_rows)}


def summarize(rows: dict[str, dict[str, Any]], auto_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's questions, answered from the figures above (no thresholds are assumed true)."""
    out: dict[str, Any] = {}
    int8 = [k for k in ("ort-static-default", "ort-static-u8s8-perchannel", "ort-u8s8-perchannel-in-openvino",
                        "ort-dynamic", "openvino-nncf-int8")
            if rows.get(k, {}).get("latency")]
    for threads in THREADS:
        key = str(threads)
        ratios = {k: rows[k]["latency"][key]["ratio_vs_ort_fp32"] for k in int8 if key in rows[k]["latency"]}
        peers = {k: rows[k]["latency"][key]["p50_ms"] for k in PEERS if key in rows.get(k, {}).get("latency", {})}
        fastest = min(peers, key=peers.get) if peers else None
        info: dict[str, Any] = {
            "int8_ratio_vs_fp32_range": [min(ratios.values()), max(ratios.values())] if ratios else None,
            "int8_ratios": ratios, "fastest_peer": fastest,
            "fastest_peer_p50_ms": peers.get(fastest) if fastest else None,
            "fastest_peer_agreement": rows[fastest].get("agreement") if fastest else None}
        auto = next((a for a in auto_rows if a["threads"] == threads), None)
        if auto is not None and auto.get("latency"):
            info["auto_ratio_vs_ort_fp32"] = auto["latency"]["ratio_vs_ort_fp32"]
            info["auto_no_slower_than_fastest_peer"] = (
                fastest is not None and auto["latency"]["p50_ms"] <= peers[fastest])
            info["auto_agreement_at_least_fastest_peers"] = (
                fastest is not None and auto.get("agreement") is not None
                and rows[fastest].get("agreement") is not None and auto["agreement"] >= rows[fastest]["agreement"])
        else:
            info["auto"] = auto.get("error") if auto else "missing"
        out[f"threads_{threads}"] = info
    return out


def environment() -> dict[str, Any]:
    versions = {}
    for name in ("onnxruntime", "openvino", "nncf", "torch", "torchvision", "onnx"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
        flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx", "avx_vnni")))
    except (OSError, StopIteration):
        pass
    model_name = ""
    try:
        model_name = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name or platform.processor(), "cpu_flags": flags, "versions": versions,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,mobilenet_v2,resnet18")
    parser.add_argument("--size", type=int, default=224, help="torchvision input size")
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run, not for figures)")
    parser.add_argument("--no-auto", action="store_true", help="skip edgeopt --mode auto")
    parser.add_argument("--auto-models", default=None, help="models to run auto on (default: all)")
    parser.add_argument("--auto-threads", default="1,2", help="thread counts to run auto at")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    bench = (BenchSettings(warmup=3, min_runs=10, min_seconds=0.2, max_seconds=2.0) if args.quick
             else BenchSettings(warmup=5, min_runs=50, min_seconds=1.5, max_seconds=8.0))
    started = time.perf_counter()
    cases_out: list[dict[str, Any]] = []
    auto_models = set(args.models.split(",") if args.auto_models is None else args.auto_models.split(","))
    auto_threads = tuple(int(t) for t in args.auto_threads.split(",") if t.strip())
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "digits":
            case = digits_case()
        else:
            case = torchvision_case(name, size=args.size, n_calib=64 if not args.quick else 16,
                                    n_eval=64 if not args.quick else 16, n_heldout=128 if not args.quick else 16)
        use_auto = not args.no_auto and name in auto_models
        cases_out.append(run_case(case, bench, auto_threads=auto_threads if use_auto else ()))
        print_case(cases_out[-1])
        write_results(args, bench, cases_out, started, complete=False)  # keep what is done if stopped
    write_results(args, bench, cases_out, started, complete=True)


def write_results(args: argparse.Namespace, bench: BenchSettings, cases_out: list[dict[str, Any]],
                  started: float, *, complete: bool) -> None:
    payload = {
        "benchmark": "quantize_peers",
        "command": "benchmarks/quantize_peers.py " + " ".join(sys.argv[1:]),
        "note": ("taken on a shared, loaded 2-core machine (several engineers running tests): absolute ms are "
                 "noisy; every ratio comes from one interleaved measure.compare run"),
        "environment": environment(),
        "bench_settings": {"warmup": bench.warmup, "min_runs": bench.min_runs, "min_seconds": bench.min_seconds,
                           "max_seconds": bench.max_seconds, "batch": 1, "threads": list(THREADS)},
        "total_seconds": round(time.perf_counter() - started, 1),
        "complete": complete,
        "cases": cases_out,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out} ({len(cases_out)} model(s), complete={complete}) after {payload['total_seconds']} s")


def print_case(case: dict[str, Any]) -> None:
    print(f"\n{case['model']} (FP32 {case['fp32_size_bytes'] / 1e6:.2f} MB)")
    print(f"  {'variant':34s} {'size x':>7s} {'agree':>7s} {'cosine':>8s}  "
          + "  ".join(f"p50@{t}t ms  ratio" for t in THREADS))
    for row in case["rows"] + case["auto"]:
        if row.get("error"):
            print(f"  {row['variant']:34s} {row['error']}")
            continue
        lat = row["latency"] if "threads" not in row else {str(row["threads"]): row["latency"]}
        cells = []
        for t in THREADS:
            e = lat.get(str(t))
            cells.append(f"{e['p50_ms']:10.3f} {e['ratio_vs_ort_fp32']:6.2f}x" if e else " " * 18)
        agree = row.get("agreement")
        name = row["variant"] + (f" @{row['threads']}t" if "threads" in row else "")
        print(f"  {name:34s} "
              f"{row['size_ratio_vs_fp32']:6.2f}x {agree if agree is None else f'{agree:7.3f}'} "
              f"{row.get('cosine') or 0:8.5f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
