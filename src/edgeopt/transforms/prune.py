"""Pruning: unstructured L1 magnitude sparsity and structured channel removal, with fine-tuning.

This module is the technique only (surgery and fine-tuning): :func:`pruned_model` returns the pruned
model and its facts. Export, the before/after measurement and the files the ``prune`` command
writes are in :mod:`edgeopt.report.prune`.

Unstructured pruning zeroes weights; dense runtimes do not skip zeros, so it makes a model
smaller only once compressed (gzip of the weights) and no faster: the report says so with
measured numbers. Structured pruning (``prune_structured``, over torch-pruning) removes whole
channels, giving a smaller dense model that really is faster. Both can be fine-tuned on
``data`` (optionally distilling from the unpruned model) in an iterative prune-and-tune schedule;
the data the result is judged on never overlaps the tuning data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import ConfigError, DataError, ModelError, first_line
from edgeopt.model import Model
from edgeopt.training import TrainSettings, resolve_train
from edgeopt.transforms.config import TransformContext, register_config, register_transform

Scope = Literal["layer", "global"]
Importance = Literal["l1", "l2", "taylor"]


# A prune fine-tune: none unless asked (epochs 0), no early stopping by default.
PRUNE_TRAIN = TrainSettings(epochs=0, lr=1e-3, batch_size=64, seed=0, weight_decay=0.0, warmup=0.0)


def _check_tuning(config: Any) -> None:
    resolve_train(config)
    config.train.require_epochs(minimum=0)
    if config.iterative_steps < 1:
        raise ConfigError(f"iterative steps must be >= 1, got {config.iterative_steps}")


def _check_fraction(value: float, name: str) -> None:
    if not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


@register_config
@dataclass(frozen=True)
class UnstructuredPrune:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights (L1), per layer or globally.

    ``layers`` names the modules to prune (default: every Conv and Linear weight), ``skip``
    removes some. ``iterative_steps`` reaches the sparsity in equal steps, fine-tuning
    ``train.epochs`` after each when training data is given (``distill``: from the unpruned model).

    Example:
        >>> UnstructuredPrune(sparsity=0.4, scope="global", train=TrainSettings(epochs=2))  # doctest: +SKIP
    """

    sparsity: float = 0.4
    scope: Scope = "layer"
    layers: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    iterative_steps: int = 1
    distill: bool = True
    train: TrainSettings = TrainSettings()

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = PRUNE_TRAIN

    def __post_init__(self) -> None:
        _check_fraction(self.sparsity, "sparsity")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        _check_tuning(self)


@register_config
@dataclass(frozen=True)
class StructuredPrune:
    """Remove the ``ratio`` fraction of channels of every prunable layer (torch-pruning).

    ``target_macs`` (absolute multiply-accumulates, batch 1) instead prunes in small steps, at
    most ``ratio``, until the model is at or below it; ``target_latency_ms`` until the measured
    batch-1 p50 of its ONNX export is (see ``prune_latency``). ``importance`` scores channel
    groups by L1/L2 weight magnitude or first-order Taylor (needs labelled data). The classifier
    head (the last Conv/Linear run) is kept whole when ``keep_head``; ``skip`` names more layers
    to leave alone; ``round_to`` keeps channel counts multiples of it (SIMD-friendly).

    Example:
        >>> StructuredPrune(ratio=0.5, importance="l2", train=TrainSettings(epochs=3))  # doctest: +SKIP
    """

    ratio: float = 0.5
    target_macs: float | None = None
    target_latency_ms: float | None = None
    importance: Importance = "l1"
    skip: tuple[str, ...] = ()
    keep_head: bool = True
    iterative_steps: int = 1
    round_to: int | None = None
    distill: bool = True
    train: TrainSettings = TrainSettings()

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = PRUNE_TRAIN

    def __post_init__(self) -> None:
        _check_fraction(self.ratio, "ratio")
        if self.importance not in ("l1", "l2", "taylor"):
            raise ConfigError(f"importance must be l1, l2 or taylor, got {self.importance!r}")
        if self.target_macs is not None and not self.target_macs > 0:
            raise ConfigError(f"target MACs must be > 0, got {self.target_macs}")
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise ConfigError(f"target latency must be > 0 ms, got {self.target_latency_ms}")
        if self.target_macs is not None and self.target_latency_ms is not None:
            raise ConfigError("give a MAC target or a latency target, not both")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        _check_tuning(self)


PruneConfig = UnstructuredPrune | StructuredPrune


# -- the mechanics -------------------------------------------------------------------------------
def torch_module(model: Model) -> Any:
    """The nn.Module of a PyTorch Model; ModelError explaining how to give one otherwise."""
    if model.format != "torch":
        raise ModelError(
            f"pruning needs a PyTorch model, and {model.source} is {model.format}: an ONNX graph cannot be "
            "fine-tuned or re-traced here. Give the architecture as path/to/file.py:factory with "
            "--weights state_dict.pt, or a torch.export .pt2 archive")
    return model.module


def example_input(model: Model, data: Dataset | None) -> Any:
    """One batch-1 input tensor for ``model`` (from ``data`` when given); DataError when it does not fit."""
    torch = require("torch", extra="torch")
    from edgeopt.transforms.export import example_inputs

    feeds = example_inputs(model, data, batch=1)
    if len(feeds) != 1:
        raise ModelError(f"{model.source}: pruning supports single-input models, this one has {len(feeds)} inputs")
    example = torch.from_numpy(next(iter(feeds.values())))
    module = model.module
    was_training = module.training
    try:
        with torch.no_grad():
            module.eval()(example)
    except Exception as exc:  # the data does not fit the network (channels, size, dtype)
        shape = "x".join(map(str, example.shape[1:]))
        raise DataError(f"{data.source if data is not None else model.source}: samples of shape {shape} do not "
                        f"fit {model.source} ({first_line(exc)})") from exc
    finally:
        module.train(was_training)
    return example


def _weight_layers(module: Any, config: UnstructuredPrune) -> list[tuple[str, Any]]:
    torch = require("torch", extra="torch")
    from edgeopt.transforms.prune_structured import resolve_layers

    if config.layers is not None:
        chosen = list(zip(config.layers, resolve_layers(module, config.layers, what="--layers"), strict=True))
    else:
        kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
        chosen = [(n, m) for n, m in module.named_modules() if isinstance(m, kinds)]
    resolve_layers(module, config.skip, what="--skip")
    chosen = [(n, m) for n, m in chosen if n not in config.skip and isinstance(getattr(m, "weight", None),
                                                                              torch.nn.Parameter)]
    if not chosen:
        raise ConfigError("no layer left to prune (every Conv/Linear layer is skipped)")
    return chosen


def _l1_step(layers: list[tuple[str, Any]], fraction: float, scope: Scope) -> None:
    """Raise the sparsity of ``layers`` to ``fraction`` (exact counts), keeping earlier zeros."""
    tprune = require("torch.nn.utils.prune", extra="torch")
    if scope == "global":
        total = sum(m.weight.numel() for _, m in layers)
        already = sum(int((_mask(m) == 0).sum()) for _, m in layers)
        extra = int(round(fraction * total)) - already
        if extra > 0:
            tprune.global_unstructured([(m, "weight") for _, m in layers],
                                       pruning_method=tprune.L1Unstructured, amount=extra)
        return
    for _, m in layers:
        already = int((_mask(m) == 0).sum())
        extra = int(round(fraction * m.weight.numel())) - already
        if extra > 0:
            tprune.l1_unstructured(m, "weight", amount=extra)


def _mask(module: Any) -> Any:
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else module.weight.detach().ne(0).float()


def sparsity_table(module: Any, names: list[str]) -> list[dict[str, Any]]:
    """Per layer: parameters of its weight, how many are exactly zero, sparsity in percent."""
    modules = dict(module.named_modules())
    rows = []
    for name in names:
        w = modules[name].weight.detach()
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "parameters": int(w.numel()), "zeros": zeros,
                     "sparsity_pct": round(100.0 * zeros / w.numel(), 4)})
    return rows


def _fine_tuner(module: Any, train: Dataset | None, config: PruneConfig, teacher_logits: np.ndarray | None,
                progress: bool) -> Any:
    """A callable fine-tuning ``module`` for ``config.train.epochs`` (or None when there is nothing to do)."""
    if train is None or config.train.epochs == 0:
        return None
    from edgeopt.training import TrainConfig, fit

    fit_train, validation = train, None
    if train.labels is not None and len(train) >= 100:
        fit_train, validation = train.split(0.9, seed=config.train.seed)
        if teacher_logits is not None:
            keep = _positions(train, fit_train)
            teacher_logits = teacher_logits[keep]
    cfg = TrainConfig(train=config.train)
    history: list[dict[str, Any]] = []

    def tune(step: int) -> None:
        result = fit(module, fit_train, config=cfg, validation=validation, teacher_logits=teacher_logits,
                     progress=progress, description=f"fine-tuning (step {step + 1})")
        history.append({"step": step + 1, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                        "val_accuracy": result.best_val_accuracy, "seconds": round(result.seconds, 2)})

    tune.history = history  # type: ignore[attr-defined]
    return tune


def _positions(full: Dataset, part: Dataset) -> np.ndarray:
    """Indices of ``part``'s samples in ``full`` (Dataset.split keeps order, so this is a merge)."""
    key = next(iter(full.inputs))
    a = full.inputs[key].reshape(len(full), -1)
    b = part.inputs[key].reshape(len(part), -1)
    idx, j = [], 0
    for i in range(len(full)):
        if j < len(b) and np.array_equal(a[i], b[j]):
            idx.append(i)
            j += 1
    if j != len(b):
        raise DataError("internal: could not align the fine-tuning split with the teacher's logits")
    return np.array(idx, dtype=np.int64)


def teacher_logits_for(teacher: Model | Any, train: Dataset) -> np.ndarray:
    """The teacher's logits on ``train`` (a torch Model/module, or any model edgeopt can run)."""
    from edgeopt.training import predict_torch

    if isinstance(teacher, Model) and teacher.format != "torch":
        from edgeopt.measure.evaluate import predict

        return predict(teacher, train)
    module = teacher.module if isinstance(teacher, Model) else teacher
    return predict_torch(module, train)


def prune_module(module: Any, config: PruneConfig, *, example: Any, train: Dataset | None = None,
                 teacher_logits: np.ndarray | None = None, progress: bool = False,
                 timing: Any = None) -> dict[str, Any]:
    """Prune ``module`` in place (and fine-tune when ``train`` is given); return what was done.

    ``timing`` (a ``prune_latency.LatencyTiming``; its defaults when None) says how candidates
    are timed for ``target_latency_ms``.

    Raises:
        ConfigError: a named layer does not exist, or Taylor importance without labels.
    """
    require("torch", extra="torch")
    from edgeopt.measure.complexity import count_macs_params

    tune = _fine_tuner(module, train, config, teacher_logits, progress)
    info: dict[str, Any] = {"config": type(config).__name__}
    if isinstance(config, UnstructuredPrune):
        tprune = require("torch.nn.utils.prune", extra="torch")
        layers = _weight_layers(module, config)
        for step in range(config.iterative_steps):
            _l1_step(layers, config.sparsity * (step + 1) / config.iterative_steps, config.scope)
            if tune is not None:
                tune(step)
        for _, m in layers:
            if tprune.is_pruned(m):
                tprune.remove(m, "weight")
        info["sparsity"] = sparsity_table(module, [n for n, _ in layers])
    else:
        from edgeopt.transforms.prune_structured import head_layer, prune_channels, resolve_layers

        resolve_layers(module, config.skip, what="--skip")
        head = head_layer(module, example) if config.keep_head else None
        kept = ([head] if head else []) + list(config.skip)
        shapes_before = {n: tuple(m.weight.shape) for n, m in module.named_modules()
                         if getattr(m, "weight", None) is not None and m.weight.dim() > 1}

        def channels(target: Any, ratio: float, **schedule: Any) -> list[dict[str, Any]]:
            return prune_channels(target, example, ratio=ratio, importance=config.importance,
                                  ignored=resolve_layers(target, tuple(kept), what="--skip"),
                                  round_to=config.round_to, count=lambda m: count_macs_params(m, example)[0],
                                  data=train, **schedule)

        targeted = config.target_macs is not None or config.target_latency_ms is not None
        if config.target_latency_ms is not None:
            info["steps"], info["target_latency"] = _to_latency(module, config, example, channels, timing)
            info["target_latency_met"] = info["target_latency"]["met"]
        else:
            info["steps"] = channels(module, config.ratio, steps=config.iterative_steps,
                                     target_macs=config.target_macs, after_step=None if targeted else tune)
        if tune is not None and targeted:
            tune(0)
        modules = dict(module.named_modules())
        info["kept_whole"] = kept
        info["layers"] = [{"layer": n, "shape_before": list(s), "shape_after": list(modules[n].weight.shape)}
                          for n, s in shapes_before.items() if n in modules]
        if config.target_macs is not None and info["steps"][-1]["macs"] > config.target_macs:
            info["target_macs_met"] = False
    if tune is not None:
        info["fine_tune"] = tune.history
    return info


def _to_latency(module: Any, config: StructuredPrune, example: Any, channels: Any,
                timing: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prune ``module`` to the least ratio whose ONNX export meets the latency target (see prune_latency)."""
    torch = require("torch", extra="torch")
    from edgeopt.measure.complexity import count_macs_params
    from edgeopt.transforms.prune_latency import LatencySearch, LatencyTiming

    def one_shot(target: Any, ratio: float) -> list[dict[str, Any]]:
        with torch.random.fork_rng(devices=[]):  # dropout in Taylor's gradients: the same channels every time
            torch.manual_seed(config.train.seed)
            return channels(target, ratio)

    search = LatencySearch(module, example, target_ms=config.target_latency_ms, timing=timing or LatencyTiming(),
                           prune=one_shot, count=lambda m: count_macs_params(m, example)[0])
    ratio = search.run(ratio=config.ratio)
    return (one_shot(module, ratio) if ratio > 0 else []), search.report()


# -- the technique -------------------------------------------------------------------------------
def pruned_model(model: Model, config: PruneConfig, *, train: Dataset | None = None, example_data: Dataset | None = None,
                 teacher: Model | Any = None, progress: bool = False, timing: Any = None) -> tuple[Model, dict[str, Any]]:
    """The technique: ``model`` pruned (and, with ``train`` and ``train.epochs`` > 0, fine-tuned), and its facts.

    Args:
        model: a PyTorch Model; it is not changed.
        config: :class:`UnstructuredPrune` or :class:`StructuredPrune`.
        train: fine-tuning data (and Taylor gradients).
        example_data: data that gives the input shape when ``train`` is None.
        teacher: distil the fine-tune from this model (default: the unpruned original) when ``config.distill``.
        timing: a ``prune_latency.LatencyTiming`` for ``target_latency_ms`` (its defaults when None).

    Returns:
        (the pruned torch Model, facts: the per-layer sparsity table or shapes, the pruning steps,
        the fine-tune history, the latency-target search). Nothing here is evaluated or timed for
        the report: :func:`edgeopt.measure.outcome.measure_outcome` does that, for every technique.
    """
    original = torch_module(model)
    example = example_input(model, train or example_data)
    module = copy.deepcopy(original).eval()
    logits = None
    if train is not None and config.train.epochs > 0 and config.distill:
        logits = teacher_logits_for(teacher if teacher is not None else original, train)
    info = prune_module(module, config, example=example, train=train, teacher_logits=logits, progress=progress,
                        timing=timing)
    module.eval()
    return Model.from_torch(module, source=f"{model.source} (pruned)", input_shape=tuple(example.shape)), info


# -- recipe steps --------------------------------------------------------------------------------
def _apply(model: Model, config: PruneConfig, ctx: TransformContext) -> Model:
    """Recipe step: torch Model in, pruned (and, with ctx.train, fine-tuned) torch Model out."""
    from edgeopt.transforms.prune_latency import LatencyTiming

    pruned, _ = pruned_model(model, config, train=ctx.train, example_data=ctx.calibration, teacher=ctx.teacher,
                             progress=ctx.progress, timing=LatencyTiming(device=ctx.device))
    return pruned


register_transform(UnstructuredPrune)(_apply)
register_transform(StructuredPrune)(_apply)
