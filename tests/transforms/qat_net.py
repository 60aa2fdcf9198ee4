"""A depthwise-separable CNN on scikit-learn's real 8x8 digits whose per-tensor INT8 PTQ collapses.

Why it breaks PTQ (the failure cross-layer equalization and QAT papers start from, seen in
MobileNetV2): the stem is Conv + ReLU trained with a high learning rate, so some stem channels die
(never positive). The depthwise conv after them sees an all-zero input channel, its BatchNorm's
running variance for that channel decays to ~0, and folding BN into the conv multiplies that
channel's weights by gamma / sqrt(eps) ~ 300. With per-channel weight scales that does not
matter; with ONE scale per tensor (targets without per-channel INT8: many NPUs/DSPs) the dead
channel sets the scale and every live channel's weights round to a few levels or zero.
The training recipe is the common one for MobileNets (SGD, momentum 0.9, one-cycle, weight decay
4e-5); the named constraint is per-tensor weights: per-channel PTQ keeps FP32 accuracy here.

Used as ``tests/transforms/qat_net.py:SeparableNet`` with ``--weights`` by the CLI tests, and by
benchmarks/qat.py.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 8, 8)  # batch first, as load_model expects of a factory file


def _separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SeparableNet(nn.Sequential):
    """Stem conv + ReLU (no BN), two depthwise-separable blocks with BN, global pooling, linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(nn.Conv2d(1, width, 3, 1, 1), nn.ReLU(), *_separable(width, 2 * width, 1),
                         *_separable(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, 10))


def digits(seed: int = 0, *, size: int = 8) -> tuple[Any, Any]:
    """(train, test): 1,200 / 597 real digits scaled to [0, 1] (8x8, or resized to ``size``), a fixed shuffle.

    benchmarks/qat.py resizes to 32x32 with a wider net: at 8x8 ONNX Runtime's INT8 kernels are
    slower than FP32 (the convolutions are too small to pay for the quantize/dequantize steps)."""
    from edgeopt.data import Dataset, load_data

    d = load_data("sklearn:digits", input_size=None if size == 8 else (1, size, size))
    x = next(iter(d.inputs.values())).astype(np.float32)
    y = np.asarray(d.labels).astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    return (Dataset({"input": x[idx[:1200]]}, y[idx[:1200]], "digits-train"),
            Dataset({"input": x[idx[1200:]]}, y[idx[1200:]], "digits-test"))


def train_net(train: Any, *, epochs: int = 8, lr: float = 0.5, seed: int = 0, width: int = 16) -> SeparableNet:
    """SGD (momentum 0.9, one-cycle to ``lr``, weight decay 4e-5), batch 64, one thread: seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = SeparableNet(width)
        x, y = train.inputs["input"], train.labels
        steps = (len(x) + 63) // 64
        opt = torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=4e-5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps)
        fit(net, x, y, opt, sched, epochs=epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def fit(net: nn.Module, x: np.ndarray, y: np.ndarray, opt: Any, sched: Any, *, epochs: int, seed: int) -> nn.Module:
    """Cross-entropy epochs in batches of 64, shuffled by ``seed + 1``, the schedule stepped per batch."""
    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(x))
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            loss = nn.functional.cross_entropy(net(torch.from_numpy(x[b])), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@functools.lru_cache(maxsize=1)
def trained() -> tuple[SeparableNet, Any, Any]:
    """(net, train, test) trained once per test process (~10 s), shared by the QAT test modules."""
    train, test = digits()
    return train_net(train), train, test


def dead_stem_channels(net: SeparableNet, data: Any) -> int:
    """Stem channels that are never positive on ``data`` (what makes the folded depthwise range wide)."""
    with torch.no_grad():
        out = net[1](net[0](torch.from_numpy(data.inputs["input"])))
    return int((out.amax(dim=(0, 2, 3)) <= 0).sum())


def write_cli_files(net: SeparableNet, train: Any, test: Any, folder: Path) -> dict[str, Path]:
    """``weights.pt`` (state_dict), ``train.npz``, ``test.npz`` for ``file.py:SeparableNet --weights``."""
    from edgeopt.data import save_npz

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"weights": folder / "weights.pt", "train": folder / "train.npz", "test": folder / "test.npz"}
    torch.save(net.state_dict(), paths["weights"])
    save_npz(paths["train"], train)
    save_npz(paths["test"], test)
    return paths
