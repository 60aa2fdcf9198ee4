"""One training loop for every technique that trains: pruning fine-tune, distillation, adaptation.

Supervised cross-entropy, optionally blended with knowledge distillation from a teacher's
logits (Hinton et al. 2015: KL at temperature T, scaled by T^2), early stopping on a
validation split with the best weights restored. Deterministic for a given seed.

Two options exist because distillation on small data needs them:
- a linear learning-rate warm-up before the cosine decay: a transformer trained from scratch
  with Adam learns slower and less reliably without it (the 4-layer BERT teacher of
  benchmarks/distill.py: 94.9 % without, 97.6 % with, after 4 epochs; at lr 2e-3 without
  warm-up it stayed at chance);
- random-shift augmentation with the teacher run on the *same* shifted batch ("consistent
  teaching", Beyer et al. 2022): soft targets computed once on the unshifted images would
  contradict the view the student sees, so with augmentation the teacher is a callable.

``schedule="plateau"`` is for training "until the validation curve plateaus" (``--epochs auto``):
a cosine decay needs the number of epochs up front, so instead the rate is halved after
``patience // 2`` epochs without a better validation accuracy and training stops after
``patience`` (or when ``max_seconds`` is spent); :attr:`FitResult.stopped` says which.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import ConfigError, DataError

AUTO_EPOCHS = "auto"


@dataclass(frozen=True)
class TrainSettings:
    """The training settings every technique that trains shares (prune fine-tune, distill, adapt, the loop).

    A field left None takes the technique's own default (``Distill`` trains 10 epochs at lr 2e-3,
    a prune fine-tune 0 epochs at 1e-3, ...): a config resolves its ``train`` against its
    ``TRAIN_DEFAULTS`` when it is built, so ``Distill(train=TrainSettings(epochs=3))`` keeps
    distillation's learning rate. ``patience`` None means no early stopping (every technique's
    default); ``epochs`` is a count or ``"auto"`` where the technique trains until the validation
    curve plateaus. Recipe JSON stores these fields flat beside the config's own (see
    ``transforms/config.py``), as earlier versions wrote them.

    Raises:
        ConfigError: a value out of range, one line naming the CLI flag (``--epochs``, ``--lr`` ...).

    Example:
        >>> TrainSettings(epochs=3, lr=5e-4).over(TrainSettings(epochs=10, lr=2e-3, batch_size=64)).batch_size
        64
    """

    epochs: int | str | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    patience: int | None = None
    weight_decay: float | None = None
    warmup: float | None = None

    def __post_init__(self) -> None:
        e = self.epochs
        if e is not None and e != AUTO_EPOCHS and (isinstance(e, bool) or not isinstance(e, int) or e < 0):
            raise ConfigError(f"--epochs must be an integer >= 0 or 'auto', got {e!r}")
        _check(self.lr, "--lr", lambda v: v > 0, "> 0")
        _check(self.batch_size, "--batch-size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check(self.seed, "--seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _check(self.patience, "--patience", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check(self.weight_decay, "--weight-decay", lambda v: v >= 0, ">= 0")
        _check(self.warmup, "--warmup", lambda v: 0.0 <= v < 1.0, "in [0, 1)")

    def over(self, defaults: TrainSettings) -> TrainSettings:
        """These settings with every field left None taken from ``defaults``."""
        return replace(defaults, **{f.name: getattr(self, f.name) for f in fields(self)
                                    if getattr(self, f.name) is not None})

    def require_epochs(self, *, minimum: int = 0, auto: bool = False) -> None:
        """What a technique accepts for ``epochs`` beyond the shared range (same error, same shape)."""
        e = self.epochs
        if e == AUTO_EPOCHS and auto:
            return
        if e == AUTO_EPOCHS or e is None or isinstance(e, str) or e < minimum:
            allowed = f"an integer >= {minimum}" + (" or 'auto'" if auto else "")
            raise ConfigError(f"--epochs must be {allowed}, got {e!r}")


def _check(value: Any, flag: str, ok: Callable[[Any], bool], what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ConfigError(f"{flag} must be {what}, got {value!r}")


def resolve_train(config: Any) -> None:
    """In a frozen config's ``__post_init__``: its ``train`` (a TrainSettings, or a dict of its fields)
    resolved against the config's ``TRAIN_DEFAULTS``."""
    train = config.train
    if isinstance(train, dict):
        train = TrainSettings(**train)
    if not isinstance(train, TrainSettings):
        raise ConfigError(f"{type(config).__name__}: train must be a TrainSettings, got {type(train).__name__}")
    object.__setattr__(config, "train", train.over(config.TRAIN_DEFAULTS))


def flat_fields(config: Any) -> dict[str, Any]:
    """``asdict(config)`` with its ``train`` settings inline, as recipes and reports store them
    (``{"epochs": 2, "lr": 0.001, ...}`` beside the config's own fields, the shape earlier versions wrote)."""
    from dataclasses import asdict

    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, TrainSettings):
            out.update(asdict(value))
        else:
            out[f.name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return out


TRAIN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainSettings))


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings: the shared ``train`` settings plus the loop's own.

    ``alpha`` weights the soft (teacher) loss against the hard (label) loss: 1.0 is pure
    distillation, 0.0 ignores the teacher. ``train.patience`` stops after that many epochs without a
    better validation accuracy (None: run all epochs). ``train.warmup`` is the fraction of all steps
    over which the learning rate ramps up linearly; ``augment_shift`` moves each image by up to
    that many pixels (edge-padded) in every batch. ``schedule`` is ``cosine`` (over the epochs) or
    ``plateau`` (halve the rate when validation stalls; needs a patience and validation data).
    """

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = TrainSettings(epochs=5, lr=1e-3, batch_size=64, seed=0,
                                                            weight_decay=0.0, warmup=0.0)

    train: TrainSettings = TrainSettings()
    optimizer: str = "adam"
    temperature: float = 4.0
    alpha: float = 0.5
    max_seconds: float | None = None
    augment_shift: int = 0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        resolve_train(self)
        self.train.require_epochs(minimum=0)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.optimizer not in ("adam", "sgd", "adamw"):
            raise ConfigError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.augment_shift < 0:
            raise ConfigError(f"augment shift must be >= 0 pixels, got {self.augment_shift}")
        if self.schedule not in ("cosine", "plateau"):
            raise ConfigError(f"schedule must be cosine or plateau, got {self.schedule!r}")
        if self.schedule == "plateau" and not self.train.patience:
            raise ConfigError("the plateau schedule needs a patience (epochs without a better validation accuracy)")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be > 0, got {self.max_seconds}")


@dataclass
class FitResult:
    """What training did. ``stopped``: ``epochs`` (all run), ``patience`` (validation plateaued)
    or ``time`` (``max_seconds`` spent)."""

    epochs_run: int
    best_epoch: int
    best_val_accuracy: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "epochs"

    @property
    def best_is_last(self) -> bool:
        """The best validation epoch was the last one run: the curve was still rising."""
        return self.best_val_accuracy is not None and self.best_epoch > 0 and self.best_epoch == self.epochs_run


def _forward(module: Any, inputs: dict[str, Any]) -> Any:
    out = module(next(iter(inputs.values()))) if len(inputs) == 1 else module(**inputs)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, list | tuple):
        out = out[0]
    return out


def _to_tensors(torch: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def output_classes(module: Any, tensors: dict[str, Any]) -> int:
    """How many class scores ``module`` gives for one sample (its last output dimension)."""
    torch = require("torch", extra="torch")
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = _forward(module, {k: v[:1] for k, v in tensors.items()})
    module.train(was_training)
    return int(out.shape[-1])


def check_label_range(labels: np.ndarray, classes: int, source: str) -> None:
    """Labels must index the model's outputs; a label >= classes would crash the loss mid-training."""
    if len(labels) and (int(labels.max()) >= classes or int(labels.min()) < 0):
        bad = int(labels.max()) if int(labels.max()) >= classes else int(labels.min())
        raise DataError(f"{source}: label {bad} is outside the model's {classes} classes (0..{classes - 1}); "
                        "the labels must index the model's outputs")


def predict_torch(module: Any, data: Dataset, *, batch_size: int = 256) -> np.ndarray:
    """Logits of a torch module over ``data`` in eval mode."""
    torch = require("torch", extra="torch")
    was_training = module.training
    module.eval()
    outs = []
    with torch.no_grad():
        for feeds, _ in data.batches(batch_size):
            outs.append(_forward(module, _to_tensors(torch, feeds)).float().numpy())
    module.train(was_training)
    return np.concatenate(outs)


def accuracy_torch(module: Any, data: Dataset, *, batch_size: int = 256) -> float:
    if data.labels is None:
        raise DataError(f"{data.source} has no labels")
    return float(np.mean(predict_torch(module, data, batch_size=batch_size).argmax(axis=1) == data.labels))


def kd_loss(student_logits: Any, teacher_logits: Any, labels: Any, *, temperature: float, alpha: float) -> Any:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    torch = require("torch", extra="torch")
    f = torch.nn.functional
    loss = 0.0
    if teacher_logits is not None and alpha > 0:
        t = temperature
        soft = f.kl_div(f.log_softmax(student_logits / t, dim=1), f.softmax(teacher_logits / t, dim=1),
                        reduction="batchmean") * (t * t)
        loss = loss + alpha * soft
    if labels is not None and (teacher_logits is None or alpha < 1):
        weight = 1.0 if teacher_logits is None else 1.0 - alpha
        loss = loss + weight * f.cross_entropy(student_logits, labels)
    return loss


def kd_step(student: Any, teacher: Any, x: Any, labels: Any, optimizer: Any, *, temperature: float,
            alpha: float) -> Any:
    """One optimizer step of :func:`kd_loss` on a batch, the teacher run without gradients; returns the loss."""
    torch = require("torch", extra="torch")
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = kd_loss(student(x), teacher_logits, labels, temperature=temperature, alpha=alpha)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def fit(module: Any, train: Dataset, *, config: TrainConfig | None = None, validation: Dataset | None = None,
        teacher_logits: np.ndarray | None = None, params: Iterable[Any] | None = None,
        progress: bool = True, description: str = "training",
        on_epoch_end: Callable[[FitResult], None] | None = None,
        extra_loss: Callable[[Any], Any] | None = None,
        teacher: Callable[[dict[str, Any]], Any] | None = None) -> FitResult:
    """Train ``module`` in place on ``train``; return what happened.

    Args:
        module: a torch nn.Module producing logits (or an object with ``.logits``).
        train: inputs keyed by name (one input: passed positionally; several: as keyword args).
        config: epochs, lr, distillation temperature/alpha, patience.
        validation: labelled data for early stopping; the best epoch's weights are restored.
        teacher_logits: the teacher's logits for every ``train`` sample, in order.
        teacher: instead of ``teacher_logits``, a function from a batch (tensors keyed like
            ``train.inputs``, augmented as the student sees them) to the teacher's logits;
            needed with ``augment_shift`` so that both models see the same view.
        params: the parameters to train (default: all with requires_grad).
        on_epoch_end: called after each epoch with the result so far (module holds that epoch's
            weights), e.g. to write a checkpoint.
        extra_loss: called after each training forward pass with the batch's sample indices
            (a LongTensor into ``train``); the loss it returns is added (e.g. feature or
            hidden-state matching, with the student's activations captured by forward hooks).

    Raises:
        DataError: no labels and no teacher (nothing to learn from).
    """
    torch = require("torch", extra="torch")
    cfg = config or TrainConfig()
    if teacher_logits is not None and teacher is not None:
        raise ConfigError("give the teacher's logits or the teacher, not both")
    if teacher_logits is not None and cfg.augment_shift:
        raise ConfigError("augmentation needs the teacher itself (its logits change with the view), "
                          "not precomputed logits")
    has_teacher = teacher_logits is not None or teacher is not None
    if train.labels is None and (not has_teacher or cfg.alpha == 0):
        raise DataError(f"{train.source} has no labels (y) and there is no teacher: nothing to train on")
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise DataError("teacher logits must have one row per training sample")
    if train.labels is None and has_teacher and cfg.alpha < 1:
        cfg = replace(cfg, alpha=1.0)
    torch.manual_seed(cfg.train.seed)
    trainable = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not trainable:
        raise ConfigError("no trainable parameters")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tensors = _to_tensors(torch, train.inputs)
    if train.labels is not None:
        check_label_range(train.labels, output_classes(module, tensors), train.source)
    labels = torch.from_numpy(train.labels) if train.labels is not None else None
    soft = torch.from_numpy(teacher_logits.astype(np.float32)) if teacher_logits is not None else None
    gen = torch.Generator().manual_seed(cfg.train.seed)
    n = len(train)
    steps = (n + cfg.train.batch_size - 1) // cfg.train.batch_size
    plateau_scale = [1.0]  # the plateau schedule's multiplier, halved in the epoch loop
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps, plateau_scale))
    shift = _Shift(torch, tensors, cfg.augment_shift, seed=cfg.train.seed + 1) if cfg.augment_shift else None

    result = FitResult(epochs_run=0, best_epoch=0, best_val_accuracy=None)
    best_state = None
    validated = validation is not None and validation.labels is not None
    if cfg.schedule == "plateau" and not validated:
        raise ConfigError("the plateau schedule needs labelled validation data")
    if validated:
        result.best_val_accuracy = accuracy_torch(module, validation, batch_size=cfg.train.batch_size)
        best_state = copy.deepcopy(module.state_dict())
    since_best = 0
    start = time.perf_counter()
    from edgeopt.progress import progress_bar

    with progress_bar(enabled=progress and steps > 0, eta=True) as bar:
        task = bar.add_task(description, total=cfg.train.epochs * steps)
        for epoch in range(cfg.train.epochs):
            module.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(steps):
                idx = perm[s * cfg.train.batch_size:(s + 1) * cfg.train.batch_size]
                batch = {k: v[idx] for k, v in tensors.items()}
                if shift is not None:
                    batch = shift(batch)
                if teacher is not None:
                    with torch.no_grad():
                        targets = teacher(batch).float()
                else:
                    targets = soft[idx] if soft is not None else None
                out = _forward(module, batch)
                loss = kd_loss(out, targets, labels[idx] if labels is not None else None,
                               temperature=cfg.temperature, alpha=cfg.alpha)
                if extra_loss is not None:
                    loss = loss + extra_loss(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                bar.advance(task)
            result.epochs_run = epoch + 1
            entry = {"epoch": epoch + 1, "loss": total / n}
            if validation is not None and validation.labels is not None:
                acc = accuracy_torch(module, validation, batch_size=cfg.train.batch_size)
                entry["val_accuracy"] = acc
                if result.best_val_accuracy is None or acc > result.best_val_accuracy:
                    result.best_val_accuracy, result.best_epoch = acc, epoch + 1
                    best_state = copy.deepcopy(module.state_dict())
                    since_best = 0
                else:
                    since_best += 1
            result.history.append(entry)
            if on_epoch_end is not None:
                on_epoch_end(result)
            if cfg.train.patience is not None and since_best >= cfg.train.patience:
                result.stopped = "patience"
                break
            if cfg.schedule == "plateau" and since_best and since_best % max(1, cfg.train.patience // 2) == 0:
                plateau_scale[0] *= 0.5
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                result.stopped = "time" if epoch + 1 < cfg.train.epochs else "epochs"
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    result.seconds = time.perf_counter() - start
    return result


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int, plateau_scale: list[float] | None = None
               ) -> Callable[[int], float]:
    """Per-step LR multiplier: linear warm-up over ``cfg.train.warmup`` of all steps, times a cosine
    decay that steps once per epoch (the schedule this loop always had), or for ``plateau`` the
    multiplier the epoch loop halves when validation stalls (warm-up over the first epoch's
    ``cfg.train.warmup``: the number of epochs is not known)."""
    epochs = max(1, cfg.train.epochs)
    plateau = cfg.schedule == "plateau"
    warm = int(cfg.train.warmup * (1 if plateau else cfg.train.epochs) * steps_per_epoch)
    scale = plateau_scale if plateau_scale is not None else [1.0]

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warm) if warm else 1.0
        if plateau:
            return ramp * scale[0]
        return ramp * 0.5 * (1.0 + np.cos(np.pi * (step // steps_per_epoch) / epochs))

    return factor


class _Shift:
    """Random translation by up to ``pixels`` per image (edge padding), for every 4-D float input."""

    def __init__(self, torch: Any, tensors: dict[str, Any], pixels: int, *, seed: int) -> None:
        self.keys = [k for k, v in tensors.items() if v.dim() == 4 and v.is_floating_point()]
        if not self.keys:
            raise ConfigError("random-shift augmentation needs image inputs shaped (N, C, H, W)")
        smallest = min(min(tensors[k].shape[2], tensors[k].shape[3]) for k in self.keys)
        if pixels >= smallest:
            raise ConfigError(f"--augment-shift {pixels} must be smaller than the images ({smallest} pixels on "
                              "their short side)")
        self.torch, self.pixels = torch, pixels
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        f, p = self.torch.nn.functional, self.pixels
        out = dict(batch)
        for key in self.keys:
            x = batch[key]
            padded = f.pad(x, (p, p, p, p), mode="replicate")
            dy, dx = self.torch.randint(0, 2 * p + 1, (2, len(x)), generator=self.gen).tolist()
            h, w = x.shape[2], x.shape[3]
            out[key] = self.torch.stack([padded[i, :, y:y + h, z:z + w] for i, (y, z) in enumerate(zip(dy, dx, strict=True))])
        return out
