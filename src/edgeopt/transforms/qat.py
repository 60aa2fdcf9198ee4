"""Quantization-aware fine-tuning (QAT) of a PyTorch model, exported to the same INT8 ONNX as PTQ.

When post-training INT8 loses accuracy no calibration or float layer can buy back cheaply, a few
epochs of training *through* the INT8 rounding let the weights adapt to it. BatchNorm is first
folded into the conv before it (eval statistics, ``torch.fx`` fusion), because ONNX Runtime folds
it before quantizing: the weights trained through fake quantization must be the weights that are
quantized. Every Conv2d/Linear is then wrapped so that, in training, its input goes through u8
fake quantization (per tensor, range tracked by a moving min/max as ONNX Runtime's MinMax
calibration would see it) and its weight through s8 fake quantization (per output channel, or
one scale per tensor for targets without per-channel INT8), with straight-through gradients.

One scale per tensor is where PTQ breaks on depthwise convs: a channel whose input is dead has a
folded weight hundreds of times larger than the others and sets the scale. So the per-tensor
weight range is a clip chosen from the calibration samples, the one minimizing the weight
rounding error weighted by each input channel's mean square activation (a channel that never
sees input costs nothing when clipped), re-chosen every epoch; the exported weights are clamped
to it, so ONNX Runtime's min/max weight scale is the scale trained through.

The FP32 model is the teacher: the loss is the distillation KL at temperature T mixed with
cross-entropy on the labels. Afterwards the wrappers are removed (an ordinary float module again,
with weights that round well), it is exported to ONNX and quantized by the same static INT8 path
as post-training quantization, so the INT8 graph, and its speed, are the PTQ graph's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, ConfigError
from edgeopt.model import Model
from edgeopt.training import TrainSettings, kd_step, resolve_train
from edgeopt.transforms.config import TransformContext, register_config, register_transform


@register_config
@dataclass(frozen=True)
class QatConfig:
    """Settings of the QAT fine-tune.

    Args:
        train: the shared training settings (defaults: 3 epochs, a few: it starts from the trained model;
            Adam at lr 1e-3, batch 64, seed 0 for shuffling and initialization). QAT's loop has no
            validation split and no warm-up, so ``patience`` and ``warmup`` are refused.
        temperature, alpha: distillation from the FP32 model: ``alpha * T^2 * KL + (1 - alpha) * CE``.
        momentum: of the moving min/max of each activation range.
        per_channel: weight scales per output channel (as ``StaticInt8.per_channel``; match the PTQ settings).
    """

    train: TrainSettings = TrainSettings()
    temperature: float = 2.0
    alpha: float = 0.5
    momentum: float = 0.9
    per_channel: bool = True

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = TrainSettings(epochs=3, lr=1e-3, batch_size=64, seed=0,
                                                            weight_decay=0.0, warmup=0.0)

    def __post_init__(self) -> None:
        resolve_train(self)
        self.train.require_epochs(minimum=1)
        if self.train.patience is not None or self.train.warmup:
            raise ConfigError("QAT fine-tunes a fixed number of epochs without a validation split or warm-up: "
                              "leave --patience and --warmup unset")
        if not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("QatConfig needs temperature > 0 and 0 <= alpha <= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"QatConfig momentum must be in [0, 1), got {self.momentum}")


# per-tensor weight clips tried: absmax * 2^(-k/4), down to absmax / 1024
CLIP_STEPS = 41


def _fake_quant_wrapper(torch: Any) -> Any:
    nn = torch.nn

    class FakeQuant(nn.Module):
        """Wraps a Conv2d/Linear: u8 fake-quantized input (tracked range), s8 weight (per channel or clipped per tensor)."""

        def __init__(self, layer: Any, momentum: float, per_channel: bool) -> None:
            super().__init__()
            self.layer = layer
            self.momentum = momentum
            self.per_channel = per_channel
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(False))
            self.register_buffer("clip", torch.tensor(0.0))  # per-tensor weight range; 0: absmax
            self.register_buffer("energy", torch.zeros(self._in_channels()))  # mean x^2 per input channel
            self.register_buffer("batches", torch.tensor(0))

        def _in_channels(self) -> int:
            layer = self.layer
            return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)

        def _observe(self, x: Any) -> None:
            lo, hi = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
            if not bool(self.seen):
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.seen.fill_(True)
            else:
                self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)

        def observe_energy(self, x: Any) -> None:
            dims = [d for d in range(x.dim()) if d != 1]
            self.energy.add_((x.detach() ** 2).mean(dim=dims))
            self.batches.add_(1)

        def weight_energy(self) -> Any:
            """Each weight's input-channel energy, shaped like the weight."""
            w = self.layer.weight
            e = self.energy / max(int(self.batches), 1)
            if isinstance(self.layer, nn.Linear):
                return e.reshape(1, -1).expand_as(w)
            groups = self.layer.groups
            per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
            index = (torch.arange(w.shape[0]) // per_group_out).reshape(-1, 1) * per_group_in \
                + torch.arange(per_group_in).reshape(1, -1)
            return e[index].reshape(*w.shape[:2], *([1] * (w.dim() - 2))).expand_as(w)

        def choose_clip(self) -> None:
            """The per-tensor range minimizing the energy-weighted rounding error of the weights."""
            if self.per_channel:
                return
            w = self.layer.weight.detach()
            e = self.weight_energy()
            absmax = float(w.abs().max())
            best, best_err = absmax, None
            for k in range(CLIP_STEPS):
                c = absmax * 2.0 ** (-k / 4)
                if c <= 0:
                    break
                s = c / 127.5
                err = float((e * (w - torch.clamp(torch.round(w / s), -128, 127) * s) ** 2).sum())
                if best_err is None or err < best_err:
                    best, best_err = c, err
            self.clip.fill_(best)

        def quantized_weight(self) -> Any:
            w = self.layer.weight
            if self.per_channel:
                absmax = w.detach().abs().reshape(w.shape[0], -1).max(dim=1).values.clamp(min=1e-12)
                wscale = (absmax / 127.5).reshape(-1, *([1] * (w.dim() - 1)))
            else:
                clip = self.clip if float(self.clip) > 0 else w.detach().abs().max()
                wscale = (clip / 127.5).clamp(min=1e-12)
            wq = torch.clamp(torch.round(w / wscale), -128, 127) * wscale
            return w + (wq - w).detach()

        def clamp_weight(self) -> None:
            """Clamp the float weights to the trained range, so ONNX Runtime's min/max scale is that range."""
            if not self.per_channel and float(self.clip) > 0:
                with torch.no_grad():
                    self.layer.weight.clamp_(-float(self.clip), float(self.clip))

        def forward(self, x: Any) -> Any:
            if self.training:
                self._observe(x)
            scale = ((self.hi - self.lo) / 255.0).clamp(min=1e-8)
            zero = torch.round(-self.lo / scale).clamp(0, 255)
            xq = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
            x = x + (xq - x).detach()
            # the layer's own forward with the fake-quantized weight: a Conv2d subclass that pads
            # first (TensorFlow-style "same" padding, as EfficientNet ports have) keeps its padding
            return torch.func.functional_call(self.layer, {"weight": self.quantized_weight()}, (x,))

    return FakeQuant


def fold_batchnorm(module: Any) -> Any:
    """An eval-mode copy of ``module`` with every Conv -> BatchNorm folded into the conv (``torch.fx``).

    ONNX Runtime folds BatchNorm before quantizing, so QAT must train the folded weights. A module
    torch.fx cannot trace is returned unfolded (a copy): QAT still runs, on the unfolded weights.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    def layers(m: Any) -> int:
        return sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())

    copy_ = copy.deepcopy(module).eval()
    try:
        fused = fuse(copy.deepcopy(copy_), inplace=True)
    except Exception:  # noqa: BLE001 - tracing is an optimization here, not a requirement
        return copy_
    # tracing inlines a user-defined Conv2d subclass into a bare conv call on its weight, which QAT
    # could no longer wrap: keep the unfolded copy then (with per-channel scales folding changes
    # nothing QAT trains: BN scales each output channel, and each has its own scale)
    bn = sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in copy_.modules())
    return fused if layers(fused) == layers(copy_) and bn else copy_


def _swap(module: Any, torch: Any, wrapper: Any, momentum: float, per_channel: bool) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) or (isinstance(child, torch.nn.Conv2d)
                                                   and child.padding_mode == "zeros"):
            setattr(module, name, wrapper(child, momentum, per_channel))
            count += 1
        else:
            count += _swap(child, torch, wrapper, momentum, per_channel)
    return count


def _unswap(module: Any, wrapper: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, wrapper):
            setattr(module, name, child.layer)
        else:
            _unswap(child, wrapper)


def qat_finetune(module: Any, train: Dataset, *, calibration: Dataset | None = None,
                 config: QatConfig | None = None) -> Any:
    """A copy of ``module`` fine-tuned through INT8 fake quantization, with ``module`` as teacher.

    Args:
        module: a trained PyTorch classifier (one input, class scores out).
        train: labelled samples (inputs as the module takes them).
        calibration: samples that initialize the activation ranges (default: ``train``).
        config: :class:`QatConfig`.

    Returns:
        The fine-tuned float module (eval mode), ready for ONNX export and static INT8.

    Raises:
        BadInput: no labels, or no Conv2d/Linear to quantize.

    Example:
        >>> tuned = qat_finetune(net, load_data("train.npz"), config=QatConfig(train=TrainSettings(epochs=3)))  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    cfg = config or QatConfig()
    if train.labels is None:
        raise BadInput(f"QAT needs labelled data; {train.source} has no labels")
    torch.manual_seed(cfg.train.seed)
    teacher = module.eval()
    student = fold_batchnorm(module)
    wrapper = _fake_quant_wrapper(torch)
    if _swap(student, torch, wrapper, cfg.momentum, cfg.per_channel) == 0:
        raise BadInput("QAT found no Conv2d or Linear layer to quantize")
    fakes = [m for m in student.modules() if isinstance(m, wrapper)]
    handles = [f.register_forward_pre_hook(lambda m, args: m.observe_energy(args[0])) for f in fakes]
    x_all = next(iter(train.inputs.values()))
    y_all = np.asarray(train.labels)
    cal = next(iter((calibration or train).inputs.values()))
    student.train()
    for m in student.modules():  # BatchNorm left unfolded keeps its eval statistics: ORT folds those
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():  # first ranges (and input energies) from the calibration samples, as PTQ sees them
        for i in range(0, len(cal), cfg.train.batch_size):
            student(torch.from_numpy(np.ascontiguousarray(cal[i:i + cfg.train.batch_size])))
    for h in handles:
        h.remove()
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(cfg.train.seed)
    t = cfg.temperature
    for _ in range(cfg.train.epochs):
        for f in fakes:
            f.choose_clip()
        order = rng.permutation(len(x_all))
        for i in range(0, len(order), cfg.train.batch_size):
            idx = order[i:i + cfg.train.batch_size]
            xb = torch.from_numpy(np.ascontiguousarray(x_all[idx]))
            yb = torch.from_numpy(y_all[idx]).long()
            kd_step(student, teacher, xb, yb, optimizer, temperature=t, alpha=cfg.alpha)
    for f in fakes:
        f.clamp_weight()
    _unswap(student, wrapper)
    return student.eval()


def qat(model: Model, config: QatConfig | None = None, *, train: Dataset, calibration: Dataset | None = None) -> Model:
    """A PyTorch Model fine-tuned through INT8 fake quantization (BatchNorm folded), still float.

    Export it to ONNX and quantize it with the same :class:`StaticInt8` as PTQ (as :func:`qat_int8`
    does, and as a recipe ``(QatConfig, OnnxExport, StaticInt8)`` does in ``optimize`` and
    ``quantize --mode auto``).

    Raises:
        BadInput: not a PyTorch model, no labels, or no Conv2d/Linear.
    """
    if model.format != "torch":
        raise BadInput(f"QAT fine-tunes PyTorch models; {model.source} is {model.format}")
    tuned = qat_finetune(model.module, train, calibration=calibration, config=config)
    sample = next(iter((calibration or train).inputs.values()))
    shape = tuple(model.inputs[0].shape) if model.inputs else (1, *sample.shape[1:])
    return Model.from_torch(tuned, source=f"{model.source} [qat]",
                            input_shape=tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape))


# The last fine-tune, keyed by the objects it came from (kept alive in the value, so their ids stay
# theirs): the INT8 variants of one QAT step (search/recovery.py) train once.
_LAST: dict[tuple[int, QatConfig, int, int], tuple[Model, tuple[Any, ...]]] = {}


@register_transform(QatConfig)
def _apply(model: Model, config: QatConfig, ctx: TransformContext) -> Model:
    train = ctx.train if ctx.train is not None else ctx.calibration
    if train is None:
        raise BadInput("QAT needs labelled training data: pass --data with labels")
    key = (id(model), config, id(train), id(ctx.calibration))
    if key not in _LAST:
        tuned = qat(model, config, train=train, calibration=ctx.calibration)
        _LAST.clear()
        _LAST[key] = (tuned, (model, train, ctx.calibration))
    return _LAST[key][0]


def qat_int8(model: Model, train: Dataset, calibration: Dataset, *, int8: Any = None,
             config: QatConfig | None = None) -> Model:
    """QAT fine-tune a PyTorch Model, export it to ONNX and quantize it with the PTQ path.

    Args:
        model: a PyTorch Model (``Model.from_torch`` / ``load_model("net.py:Factory", weights=...)``).
        train: labelled training samples; ``calibration``: the static INT8 calibration samples.
        int8: the :class:`StaticInt8` settings (default ``StaticInt8()``), the same as PTQ's; QAT
            trains with its weight scales (per channel or per tensor).

    Returns:
        The INT8 ONNX Model.

    Example:
        >>> q = qat_int8(load_model("net.py:Net", weights="w.pt"), train, cal,
        ...              int8=StaticInt8(per_channel=False))  # doctest: +SKIP
    """
    from dataclasses import replace

    from edgeopt.transforms.export import OnnxExport, to_onnx
    from edgeopt.transforms.quantize import StaticInt8, quantize

    int8 = int8 or StaticInt8()
    cfg = replace(config or QatConfig(), per_channel=int8.per_channel)
    tuned = qat(model, cfg, train=train, calibration=calibration)
    exported, _ = to_onnx(tuned, OnnxExport(atol=1e-3), data=calibration)
    return quantize(exported, int8, data=calibration)
