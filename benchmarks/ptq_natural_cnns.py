"""Does default (per-channel) static INT8 PTQ lose >= 2 pt on a natural small CNN? A search, measured.

benchmarks/qat.py shows QAT recovering where PTQ breaks, but only under a named constraint (one
weight scale per tensor). This benchmark is the search for a case without that constraint: small
CNNs of the shapes real edge models have, each trained in seconds on real data that ships in a
package, each built around one known cause of INT8 loss, then quantized by edgeopt's default static
INT8 (ONNX Runtime U8S8 QDQ, per-channel weights, per-tensor activations) with every calibration
``quantize --mode auto`` tries (MinMax, percentile, entropy) and with bias correction. Per-tensor
MinMax is shown beside them for contrast.

Causes tried (one variant each): dead stem channels after a high learning rate (the per-tensor
failure), depthwise convs without BatchNorm (wide per-channel activation ranges), ReLU without BN or
weight decay, concatenation of the raw input with BN'd and BN-less features, a residual Add of a BN'd
identity and a BN-less branch, 4-channel layers, 8 calibration samples, MobileNetV3 blocks
(hard-swish, squeeze-excite), a 12-block MobileNetV2 (depth), ConvNeXt blocks (LayerNorm, GELU,
layer scale 1e-6), and a harder task (scikit-image's brick / grass / gravel textures, 16x16 patches,
train and test from disjoint halves of each photo).

Data: scikit-learn digits (1,200 train / 597 held-out, ``tests/transforms/qat_net.digits``).
Accuracy only (no timing): each row is FP32 vs its INT8 variants on the same held-out samples, and
the activation spread (``activation_spread``) that explains them.

Run: PYTHONPATH=src .venv/bin/python benchmarks/ptq_natural_cnns.py [--seeds 0,1] [--only NAME,...]
Writes benchmarks/results/ptq_natural_cnns.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "ptq_natural_cnns.json"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tests.transforms import qat_net  # noqa: E402
from torch import nn  # noqa: E402

from edgeopt.data import Dataset  # noqa: E402
from edgeopt.fileio import write_json  # noqa: E402
from edgeopt.measure.evaluate import accuracy_of, predict  # noqa: E402
from edgeopt.model import Model  # noqa: E402
from edgeopt.transforms.export import OnnxExport, to_onnx  # noqa: E402
from edgeopt.transforms.quantize import StaticInt8, quantize  # noqa: E402


class DwNoBn(nn.Sequential):
    """Stem Conv+BN+ReLU, two blocks of depthwise conv (bias, no BN) + ReLU + pointwise conv + BN + ReLU."""

    def __init__(self, w: int = 16) -> None:
        layers: list[nn.Module] = [nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        for c in (w, 2 * w):
            layers += [nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.ReLU(), nn.Conv2d(c, 2 * c, 1, bias=False),
                       nn.BatchNorm2d(2 * c), nn.ReLU()]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


class VggNoBn(nn.Sequential):
    """Four 3x3 convs with ReLU and two max-pools, no BatchNorm, a 2-layer head (Kaiming init)."""

    def __init__(self, w: int = 16) -> None:
        super().__init__(nn.Conv2d(1, w, 3, 1, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(w, 2 * w, 3, 1, 1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * w, 64), nn.ReLU(), nn.Linear(64, 10))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)


class ConcatRanges(nn.Module):
    """DenseNet-like: the raw input (0-1), a BN'd ReLU map and a BN-less ReLU map concatenated."""

    def __init__(self, w: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(1 + w, w, 3, 1, 1), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(1 + 2 * w, 4 * w, 1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        b = self.c2(torch.cat([x, a], 1))
        return self.head(self.c3(torch.cat([x, a, b], 1)))


class UnequalResidual(nn.Module):
    """A BN'd stem as identity path plus two depthwise-separable branches without BN, added."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(w, w, 3, 1, 1, groups=w), nn.ReLU(), nn.Conv2d(w, w, 1))
        self.b2 = nn.Sequential(nn.Conv2d(w, w, 3, 1, 1, groups=w), nn.ReLU(), nn.Conv2d(w, w, 1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.b1(x)
        return self.head(x + self.b2(x))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(c // 4, 4), 1), nn.ReLU(),
                                  nn.Conv2d(max(c // 4, 4), c, 1), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise 3x3, optional squeeze-excite, 1x1 linear projection."""

    def __init__(self, cin: int, exp: int, cout: int, stride: int, se: bool, act: type[nn.Module],
                 zero_init: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if exp != cin:
            layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), act()]
        layers += [nn.Conv2d(exp, exp, 3, stride, 1, groups=exp, bias=False), nn.BatchNorm2d(exp), act()]
        if se:
            layers.append(SqueezeExcite(exp))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        if zero_init:  # torchvision's zero_init_residual: the block starts as the identity
            nn.init.zeros_(layers[-1].weight)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV3ish(nn.Sequential):
    def __init__(self, w: int = 16) -> None:
        hs, relu = nn.Hardswish, nn.ReLU
        super().__init__(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), hs(),
                         InvertedResidual(w, w, w, 1, True, relu), InvertedResidual(w, 4 * w, 2 * w, 2, False, relu),
                         InvertedResidual(2 * w, 6 * w, 2 * w, 1, False, relu),
                         InvertedResidual(2 * w, 6 * w, 3 * w, 1, True, hs), InvertedResidual(3 * w, 6 * w, 3 * w, 1, True, hs),
                         nn.Conv2d(3 * w, 6 * w, 1, bias=False), nn.BatchNorm2d(6 * w), hs(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6 * w, 10))


class MobileNetV2Deep(nn.Sequential):
    def __init__(self, w: int = 8, blocks: int = 12) -> None:
        super().__init__(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                         *[InvertedResidual(w, 4 * w, w, 1, False, nn.ReLU, zero_init=True) for _ in range(blocks)],
                         nn.Conv2d(w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


class LayerNorm2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 7, 1, 3, groups=c), LayerNorm2d(c), nn.Conv2d(c, 4 * c, 1), nn.GELU(),
                                  nn.Conv2d(4 * c, c, 1))
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 1e-6))  # layer scale, ConvNeXt's initial value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.body(x)


class ConvNeXtish(nn.Sequential):
    def __init__(self, w: int = 16) -> None:
        super().__init__(nn.Conv2d(1, w, 2, 2), LayerNorm2d(w), *[ConvNeXtBlock(w) for _ in range(3)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(w), nn.Linear(w, 10))


@dataclass(frozen=True)
class Variant:
    name: str
    cause: str
    make: Callable[[], nn.Module]
    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 10
    calibration_samples: int = 128
    data: str = "digits"


VARIANTS = [
    Variant("separable-high-lr", "dead stem channels; BN-folded depthwise weights span ~300x (qat.py's fixture)",
            lambda: qat_net.SeparableNet(16), "sgd", 0.5, 4e-5, 8),
    Variant("depthwise-no-bn", "depthwise conv without BN: per-channel activation ranges set by kernel norms",
            DwNoBn),
    Variant("relu-no-bn-no-wd", "ReLU, no BatchNorm, no weight decay (unbounded activations)", VggNoBn, lr=1e-3, epochs=20),
    Variant("concat-ranges", "raw input (0-1) concatenated with BN'd and BN-less ReLU maps", ConcatRanges, epochs=30),
    Variant("residual-unequal", "residual Add of a BN'd identity and BN-less branches", UnequalResidual, epochs=30),
    Variant("narrow-4-channels", "4-channel layers (no redundancy to average rounding out)",
            lambda: qat_net.SeparableNet(4), "sgd", 0.5, 4e-5, 8),
    Variant("calibration-8-samples", "8 calibration samples (ranges from too little data)",
            lambda: qat_net.SeparableNet(16), "sgd", 0.5, 4e-5, 8, calibration_samples=8),
    Variant("mobilenetv3-se-hswish", "MobileNetV3 blocks: hard-swish, squeeze-excite, linear bottlenecks", MobileNetV3ish),
    Variant("mobilenetv2-12-blocks", "depth: 12 inverted residuals, 37 quantized convs", MobileNetV2Deep),
    Variant("convnext-layer-scale", "ConvNeXt blocks: LayerNorm, GELU, layer scale 1e-6 on the residual branch",
            ConvNeXtish, lr=4e-3, epochs=20),
    Variant("textures-mobilenetv3", "a harder task: brick / grass / gravel 16x16 patches (scikit-image photos)",
            MobileNetV3ish, data="textures"),
]


def textures(size: int = 16, per_class: int = 600, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Patches of scikit-image's brick, grass and gravel photos: train from each photo's left half,
    test (half as many) from its right half, so no test patch overlaps a training one."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(("brick", "grass", "gravel")):
        image = getattr(skdata, name)().astype(np.float32) / 255.0
        h, w = image.shape[:2]
        for part, lo, hi, count in (("train", 0, w // 2 - size, per_class), ("test", w // 2, w - size, per_class // 2)):
            for _ in range(count):
                i, j = int(rng.integers(0, h - size)), int(rng.integers(lo, hi))
                parts[part][0].append(image[i:i + size, j:j + size][None])
                parts[part][1].append(label)
    order = rng.permutation(len(parts["train"][1]))
    x, y = np.stack(parts["train"][0])[order], np.asarray(parts["train"][1], np.int64)[order]
    return (Dataset({"input": x}, y, "textures-train"),
            Dataset({"input": np.stack(parts["test"][0])}, np.asarray(parts["test"][1], np.int64), "textures-test"))


def train(net: nn.Module, data: Dataset, v: Variant, seed: int) -> nn.Module:
    """Batch 64, one-cycle schedule to ``v.lr`` (SGD momentum 0.9 or Adam), one thread."""
    torch.manual_seed(seed)
    x, y = data.inputs["input"], np.asarray(data.labels)
    steps = (len(x) + 63) // 64
    opt = (torch.optim.SGD(net.parameters(), v.lr, momentum=0.9, weight_decay=v.weight_decay) if v.optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), v.lr, weight_decay=v.weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, v.lr, total_steps=v.epochs * steps)
    return qat_net.fit(net, x, y, opt, sched, epochs=v.epochs, seed=seed)


def activation_spread(net: nn.Module, x: np.ndarray) -> float:
    """The widest per-tensor activation spread at any Conv2d/Linear input on ``x``: the largest
    channel's range (max |value|) over the median live channel's. One u8 scale per tensor costs the
    median channel log2 of this many bits; PTQ breaks when it reaches ~50-100x (MobileNets on ImageNet)."""
    ranges: list[np.ndarray] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        t = args[0].detach()
        if t.shape[1] > 1:
            ranges.append(t.abs().amax(dim=[d for d in range(t.dim()) if d != 1]).numpy())

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            net(torch.from_numpy(x))
    finally:
        for h in handles:
            h.remove()
    return round(max(float(r.max() / np.median(r[r > 0])) for r in ranges if (r > 0).any()), 2)


def run_variant(v: Variant, seed: int, datasets: dict[str, tuple[Dataset, Dataset]]) -> dict[str, Any]:
    started = time.perf_counter()
    tr, te = datasets[v.data]
    torch.manual_seed(seed)
    net = train(v.make(), tr, v, seed)
    shape = (1, *tr.inputs["input"].shape[1:])
    cal = tr.take(np.arange(v.calibration_samples))
    fp32, _ = to_onnx(Model.from_torch(net, source=f"{v.name}-seed{seed}", input_shape=shape), OnnxExport(atol=1e-3),
                      data=cal)

    def acc(m: Model) -> float:
        return round(100 * accuracy_of(predict(m, te), te.labels), 2)

    base = StaticInt8(samples=v.calibration_samples)
    per_channel = {c: acc(quantize(fp32, replace(base, calibration=c), data=cal)) for c in ("minmax", "percentile", "entropy")}
    per_channel["bias-corrected"] = acc(quantize(fp32, replace(base, bias_correction=True), data=cal))
    a = acc(fp32)
    return {"variant": v.name, "seed": seed, "fp32": a, "per_channel": per_channel,
            "per_tensor_minmax": acc(quantize(fp32, replace(base, per_channel=False), data=cal)),
            "activation_spread": activation_spread(net, tr.inputs["input"][:128]),
            "best_per_channel_drop_pt": round(a - max(per_channel.values()), 2),
            "default_minmax_drop_pt": round(a - per_channel["minmax"], 2),
            "heldout_samples": len(te), "calibration_samples": v.calibration_samples,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
    torch.set_num_threads(1)
    datasets = {"digits": qat_net.digits()}
    if any(v.data == "textures" for v in chosen):
        datasets["textures"] = textures()
    rows = []
    for v in chosen:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_variant(v, seed, datasets))
            r = rows[-1]
            print(f"{v.name:24s} seed {seed}: FP32 {r['fp32']:.2f} %, per-channel {r['per_channel']}, "
                  f"per-tensor {r['per_tensor_minmax']:.2f} %, best per-channel drop {r['best_per_channel_drop_pt']:+.2f} pt, "
                  f"activation spread {r['activation_spread']:.1f}x",
                  flush=True)
    import onnxruntime

    write_json(args.out, {
        "command": "PYTHONPATH=src .venv/bin/python benchmarks/ptq_natural_cnns.py " + " ".join(sys.argv[1:]),
        "question": "does default static INT8 (per-channel weights) lose >= 2 pt on a natural small CNN?",
        "int8": "ONNX Runtime QDQ U8S8, per-channel symmetric weights, per-tensor asymmetric activations",
        "variants": {v.name: {"cause": v.cause, "optimizer": v.optimizer, "lr": v.lr, "weight_decay": v.weight_decay,
                              "epochs": v.epochs, "data": v.data} for v in chosen},
        "max_best_per_channel_drop_pt": max(r["best_per_channel_drop_pt"] for r in rows),
        "max_default_minmax_drop_pt": max(r["default_minmax_drop_pt"] for r in rows),
        "max_activation_spread": max(r["activation_spread"] for r in rows),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
