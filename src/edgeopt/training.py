"""One training loop for every technique that trains: pruning fine-tune, distillation, adaptation.

Supervised cross-entropy, optionally blended with knowledge distillation from a teacher's
logits (Hinton et al. 2015: KL at temperature T, scaled by T^2), early stopping on a
validation split with the best weights restored. Deterministic for a given seed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import ConfigError, DataError


@dataclass(frozen=True)
class TrainConfig:
    """Epochs, optimizer and distillation settings.

    ``alpha`` weights the soft (teacher) loss against the hard (label) loss: 1.0 is pure
    distillation, 0.0 ignores the teacher. ``patience`` stops after that many epochs without a
    better validation accuracy (None: run all epochs).
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    optimizer: str = "adam"
    temperature: float = 4.0
    alpha: float = 0.5
    patience: int | None = None
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.optimizer not in ("adam", "sgd", "adamw"):
            raise ConfigError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _forward(module: Any, inputs: dict[str, Any]) -> Any:
    out = module(next(iter(inputs.values()))) if len(inputs) == 1 else module(**inputs)
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, list | tuple):
        out = out[0]
    return out


def _to_tensors(torch: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


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


def fit(module: Any, train: Dataset, *, config: TrainConfig | None = None, validation: Dataset | None = None,
        teacher_logits: np.ndarray | None = None, params: Iterable[Any] | None = None,
        progress: bool = True, description: str = "training",
        on_epoch_end: Callable[[FitResult], None] | None = None,
        extra_loss: Callable[[Any], Any] | None = None) -> FitResult:
    """Train ``module`` in place on ``train``; return what happened.

    Args:
        module: a torch nn.Module producing logits (or an object with ``.logits``).
        train: inputs keyed by name (one input: passed positionally; several: as keyword args).
        config: epochs, lr, distillation temperature/alpha, patience.
        validation: labelled data for early stopping; the best epoch's weights are restored.
        teacher_logits: the teacher's logits for every ``train`` sample, in order.
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
    if train.labels is None and (teacher_logits is None or cfg.alpha == 0):
        raise DataError(f"{train.source} has no labels (y) and there is no teacher: nothing to train on")
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise DataError("teacher logits must have one row per training sample")
    if train.labels is None and teacher_logits is not None and cfg.alpha < 1:
        cfg = TrainConfig(**{**cfg.__dict__, "alpha": 1.0})
    torch.manual_seed(cfg.seed)
    trainable = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not trainable:
        raise ConfigError("no trainable parameters")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs))
    tensors = _to_tensors(torch, train.inputs)
    labels = torch.from_numpy(train.labels) if train.labels is not None else None
    soft = torch.from_numpy(teacher_logits.astype(np.float32)) if teacher_logits is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size

    result = FitResult(epochs_run=0, best_epoch=0, best_val_accuracy=None)
    best_state = None
    if validation is not None and validation.labels is not None:
        result.best_val_accuracy = accuracy_torch(module, validation, batch_size=cfg.batch_size)
        best_state = copy.deepcopy(module.state_dict())
    since_best = 0
    start = time.perf_counter()
    progress_ctx = _progress(progress, description, cfg.epochs * steps)
    with progress_ctx as bar:
        task = bar.add_task(description, total=cfg.epochs * steps) if bar else None
        for epoch in range(cfg.epochs):
            module.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(steps):
                idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                out = _forward(module, {k: v[idx] for k, v in tensors.items()})
                loss = kd_loss(out, soft[idx] if soft is not None else None,
                               labels[idx] if labels is not None else None,
                               temperature=cfg.temperature, alpha=cfg.alpha)
                if extra_loss is not None:
                    loss = loss + extra_loss(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                if bar:
                    bar.advance(task)
            sched.step()
            result.epochs_run = epoch + 1
            entry = {"epoch": epoch + 1, "loss": total / n}
            if validation is not None and validation.labels is not None:
                acc = accuracy_torch(module, validation, batch_size=cfg.batch_size)
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
            if cfg.patience is not None and since_best >= cfg.patience:
                break
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    result.seconds = time.perf_counter() - start
    return result


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool, description: str, total: int) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgeopt.cli.common import err_console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, transient=True)
