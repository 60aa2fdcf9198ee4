"""The catalogue of edge-optimized architectures (torchvision, random weights), built for any input.

A distillation student has to fit the task (channels, classes, input size) and the device, so
each entry is built for the data at hand: the first convolution takes ``C`` channels, the head
has ``classes`` outputs, and for small inputs (shorter side < 96 px, e.g. 32x32 digits) the stem
convolution's stride becomes 1, as CIFAR variants of these networks do: with the stock 32x
downsampling a 32x32 image is 1x1 pixel after the stem stages and the networks lose most of
their accuracy. Nothing is downloaded (``weights=None``).

The ``cnn3_w*`` entries are the microcontroller-sized end: three 3x3 conv-BN-ReLU blocks
(stride 1, 2, 2, widths w, 2w, 4w), global average pool and a linear head, from 6K to 370K
parameters on 1x32x32 digits. They give distillation an intermediate "teacher assistant" between a
large teacher and a student 10x or more smaller (TAKD), where the torchvision families are all
too large.

:func:`zoo` measures every entry on a device profile: parameters, MACs (torch-pruning's
counter) and batch-1 latency of the ONNX export, timed interleaved with the other entries by
:func:`edgeopt.measure.compare`. Results are cached in ``~/.cache/edgeopt/zoo/`` keyed by
architecture, input size, classes, device, threads and library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeopt.deps import require
from edgeopt.errors import BadInput

SMALL_INPUT = 96  # shorter side below this: stem stride 1
BN_MOMENTUM = 0.1

# name -> (torchvision builder, keyword arguments, family, note)
_CATALOGUE: dict[str, tuple[str, dict[str, Any], str]] = {
    "mobilenet_v2_0.5": ("mobilenet_v2", {"width_mult": 0.5}, "MobileNetV2 width 0.5"),
    "mobilenet_v2_0.75": ("mobilenet_v2", {"width_mult": 0.75}, "MobileNetV2 width 0.75"),
    "mobilenet_v2_1.0": ("mobilenet_v2", {"width_mult": 1.0}, "MobileNetV2 width 1.0"),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, "MobileNetV3-Small"),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, "MobileNetV3-Large"),
    "squeezenet1_1": ("squeezenet1_1", {}, "SqueezeNet 1.1"),
    "efficientnet_b0": ("efficientnet_b0", {}, "EfficientNet-B0"),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {}, "ShuffleNetV2 x0.5"),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", {}, "ShuffleNetV2 x1.0"),
    "mnasnet0_5": ("mnasnet0_5", {}, "MnasNet 0.5"),
    "mnasnet1_0": ("mnasnet1_0", {}, "MnasNet 1.0"),
    "resnet18": ("resnet18", {}, "ResNet-18 (reference teacher size, not an edge network)"),
    "cnn3_w8": ("cnn3", {"width": 8}, "3 conv-BN-ReLU blocks, width 8 (MCU-sized)"),
    "cnn3_w16": ("cnn3", {"width": 16}, "3 conv-BN-ReLU blocks, width 16 (MCU-sized)"),
    "cnn3_w32": ("cnn3", {"width": 32}, "3 conv-BN-ReLU blocks, width 32"),
    "cnn3_w64": ("cnn3", {"width": 64}, "3 conv-BN-ReLU blocks, width 64"),
}
_ALIASES = {"mobilenet_v2": "mobilenet_v2_1.0", "squeezenet": "squeezenet1_1", "shufflenet_v2": "shufflenet_v2_x1_0",
            "mnasnet": "mnasnet1_0", "mobilenetv3_small": "mobilenet_v3_small"}


def list_architectures() -> list[str]:
    """Names accepted by :func:`build_architecture` (and ``edgeopt distill --student``)."""
    return list(_CATALOGUE)


def describe_architecture(name: str) -> str:
    return _CATALOGUE[_resolve(name)][2]


def _resolve(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in _CATALOGUE:
        raise BadInput(f"unknown architecture {name!r}; known: {', '.join(_CATALOGUE)}")
    return key


def _check_size(input_size: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_size) != 3 or any(int(d) < 1 for d in input_size):
        raise BadInput(f"input size must be CxHxW with positive dimensions, got {'x'.join(map(str, input_size))}")
    c, h, w = (int(d) for d in input_size)
    if min(h, w) < 16:
        raise BadInput(f"input {h}x{w} is too small for the catalogue networks (need at least 16x16)")
    return c, h, w


def build_architecture(name: str, *, input_size: tuple[int, ...] = (3, 224, 224), classes: int = 1000,
                       small_input_stem: bool | None = None) -> Any:
    """A randomly initialised catalogue network for ``input_size`` = (C, H, W) and ``classes`` outputs.

    Args:
        name: one of :func:`list_architectures` (e.g. ``mobilenet_v3_small``).
        input_size: channels and spatial size; C != 3 replaces the first convolution, and a
            shorter side below 96 px sets the stem stride to 1.
        classes: number of outputs of the classifier head.
        small_input_stem: stem stride 1 (True) or the stock stride (False); None decides by size.

    Returns:
        a ``torch.nn.Module`` in eval mode.

    Raises:
        BadInput: unknown name (the known ones are listed), bad size or class count.

    Example:
        >>> net = build_architecture("mobilenet_v3_small", input_size=(1, 32, 32), classes=10)  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    models = require("torchvision.models", extra="torch")
    key = _resolve(name)
    c, h, w = _check_size(tuple(input_size))
    if int(classes) < 2:
        raise BadInput(f"classes must be >= 2, got {classes}")
    builder, kwargs, _ = _CATALOGUE[key]
    if builder == "cnn3":
        return _cnn3(torch, channels=c, classes=int(classes), **kwargs).eval()
    net = getattr(models, builder)(weights=None, num_classes=int(classes), **kwargs)
    stem_name, stem = _first_conv(torch, net)
    small = min(h, w) < SMALL_INPUT if small_input_stem is None else small_input_stem
    stride = (1, 1) if small else stem.stride
    if c != stem.in_channels or tuple(stride) != tuple(stem.stride):
        new = torch.nn.Conv2d(c, stem.out_channels, stem.kernel_size, stride=stride, padding=stem.padding,
                              dilation=stem.dilation, groups=1, bias=stem.bias is not None)
        _set_module(net, stem_name, new)
    # torchvision builds some families (MobileNetV3, EfficientNet, MnasNet) with BatchNorm momentum 0.01,
    # tuned for long ImageNet runs; in a few hundred distillation steps the running statistics never
    # settle and the student sits at chance in eval mode. PyTorch's default 0.1 settles in time.
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = BN_MOMENTUM
    return net.eval()


def _cnn3(torch: Any, *, channels: int, classes: int, width: int) -> Any:
    nn = torch.nn

    def block(cin: int, cout: int, stride: int) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    return nn.Sequential(block(channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


def _first_conv(torch: Any, net: Any) -> tuple[str, Any]:
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            return name, module
    raise BadInput("network has no convolution")  # pragma: no cover - every catalogue entry has one


def _set_module(root: Any, dotted: str, new: Any) -> None:
    parent = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        parent = getattr(parent, part)
    setattr(parent, parts[-1], new)


# -- measuring the catalogue --------------------------------------------------------------------
@dataclass
class ZooEntry:
    """One measured architecture; latency is batch-1 p50 of the ONNX export on the device profile."""

    name: str
    description: str
    input_size: list[int]
    classes: int
    params: int
    macs: int
    onnx_bytes: int
    latency_ms: dict[str, float] | None
    runtime: str | None
    threads: int | None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """``$EDGEOPT_CACHE/zoo`` or ``~/.cache/edgeopt/zoo``."""
    root = os.environ.get("EDGEOPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgeopt") / "zoo"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "onnxruntime", "openvino", "edgeopt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _cache_key(name: str, size: tuple[int, int, int], classes: int, device: str, threads: int, latency: bool) -> str:
    body = {"arch": name, "size": list(size), "classes": classes, "device": device, "threads": threads,
            "latency": latency, "versions": _versions()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def _count(name: str, size: tuple[int, ...], classes: int) -> tuple[int, int]:
    """(MACs, params) from shapes alone: the network is built and run on torch's meta device, which
    allocates and computes nothing (8x faster than a real forward at 224x224; same counts)."""
    import torch

    from edgeopt.measure.complexity import count_macs_params

    with torch.device("meta"):
        net = build_architecture(name, input_size=size, classes=classes)
        return count_macs_params(net, torch.zeros((1, *size)))


def zoo(*, input_size: tuple[int, ...] = (3, 224, 224), classes: int = 1000, names: list[str] | None = None,
        device: str | Any = None, threads: int | None = None, latency: bool = True, use_cache: bool = True,
        bench_seconds: float = 1.0, progress: Callable[[str], None] | None = None) -> list[ZooEntry]:
    """Build and measure catalogue entries for one input size and class count.

    Args:
        input_size: (C, H, W).
        classes: outputs of each network's head.
        names: a subset of :func:`list_architectures` (default: all).
        device: device profile whose runtime and threads time the ONNX exports.
        latency: False skips export and timing (params and MACs only, fast).
        use_cache: read and write ``cache_dir()``; entries are keyed by everything that changes them.
        bench_seconds: minimum timed seconds per network.

    Returns:
        one :class:`ZooEntry` per network, in catalogue order.

    Example:
        >>> [e.name for e in zoo(input_size=(1, 32, 32), classes=10, latency=False)][:2]  # doctest: +SKIP
        ['mobilenet_v2_0.5', 'mobilenet_v2_0.75']
    """
    from edgeopt.devices import get_device
    from edgeopt.fileio import write_json
    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.model import Model
    from edgeopt.runtimes.sessions import resolve_settings
    from edgeopt.transforms.export import OnnxExport, to_onnx

    size = _check_size(tuple(input_size))
    profile = get_device(device)
    chosen = [_resolve(n) for n in (names or list_architectures())]
    n_threads = threads or profile.effective_threads()
    entries: list[ZooEntry | None] = []
    to_time: list[tuple[int, Model, str]] = []
    for name in chosen:
        key = _cache_key(name, size, int(classes), profile.name, n_threads, latency)
        path = cache_dir() / f"{name}-{key}.json"
        if use_cache and path.exists():
            try:
                entries.append(ZooEntry(**{**json.loads(path.read_text()), "cached": True}))
                continue
            except (ValueError, TypeError):
                pass
        if progress:
            progress(f"building {name}")
        macs, params = _count(name, size, int(classes))
        entry = ZooEntry(name=name, description=_CATALOGUE[name][2], input_size=list(size), classes=int(classes),
                         params=params, macs=macs, onnx_bytes=0, latency_ms=None, runtime=None, threads=None)
        if latency:
            net = build_architecture(name, input_size=size, classes=classes)
            torch_model = Model.from_torch(net, source=name, input_shape=(1, *size))
            onnx_model, _ = to_onnx(torch_model, OnnxExport(atol=1e-3))
            onnx_model = Model.from_onnx(onnx_model.onnx, source=name)
            entry.onnx_bytes = onnx_model.size_bytes
            to_time.append((len(entries), onnx_model, str(path)))
        elif use_cache:
            write_json(path, entry.to_dict())
        entries.append(entry)
    if to_time:
        if progress:
            progress(f"timing {len(to_time)} network(s) interleaved")
        models = [m for _, m, _ in to_time]
        settings = [resolve_settings(m, device=profile, threads=n_threads) for m in models]
        results = compare(models, settings=BenchSettings(warmup=5, min_runs=30, min_seconds=bench_seconds,
                                                         max_seconds=max(5.0, 4 * bench_seconds)),
                          run_settings=settings)
        for (index, _, path), result in zip(to_time, results, strict=True):
            entry = entries[index]
            assert entry is not None
            entry.latency_ms = {k: round(v, 4) for k, v in result.latency_ms.items()}
            entry.runtime, entry.threads = result.runtime, result.threads
            if use_cache:
                write_json(path, entry.to_dict())
    return [e for e in entries if e is not None]
