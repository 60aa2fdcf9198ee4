"""Adapt a model to local data on the device: pick a strategy that fits the memory budget, train,
guard what the model already knew, checkpoint atomically, export ONNX (re-quantized if it was).

The order of one run:
  1. the PyTorch model (from ``file.py:factory``/``.pt2``, or an FP32 ONNX via onnx2torch), or the
     weights of OUT's checkpoint with ``resume``;
  2. local data split into train and a held-out validation part (stratified); ``replay`` original
     samples are mixed into the training part, the rest of the original data is the held-out
     check on old knowledge;
  3. peak training memory measured per strategy (``memory.measure_training_memory``); ``auto``
     tries the most capable one under ``memory_mb`` first;
  4. ``training.fit`` trains the strategy's parameters with early stopping on the local
     validation split, writing a checkpoint after every epoch;
  5. rollback to the starting weights when the result is worse on the local validation split
     (or forgets more than ``max_forget`` on the original data). With ``auto``, a strategy that
     forgets too much is followed by the next less capable one that fits: training fewer
     parameters is the usual cure for forgetting (the most capable strategy is often not the
     best adapter: ``full`` forgot 2.6 pt of digits where ``sparse`` forgot 1.5);
  6. ONNX export (verified), re-quantized like the deployed model when that was quantized.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgeopt.adapt.checkpoint import checkpoint_path, load_checkpoint, restore_on_failure, save_checkpoint
from edgeopt.adapt.memory import MemoryMeasurement, measure_training_memory
from edgeopt.adapt.strategies import (
    STRATEGIES,
    STRATEGY_NAMES,
    Strategy,
    count_params,
    frozen_norm_statistics,
    get_strategy,
    mark_trainable,
    strategy_dict,
)
from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BudgetNotMet, ConfigError, DataError, ModelError, first_line
from edgeopt.model import Model
from edgeopt.training import TrainSettings, flat_fields, resolve_train


@dataclass(frozen=True)
class AdaptConfig:
    """How to adapt.

    Args:
        strategy: ``auto`` or one of ``last-layer``, ``bias-last``, ``sparse``, ``full``.
        memory_mb: peak training memory allowed (measured, see ``adapt/memory.py``); None: no limit.
        train: the shared training settings for ``training.fit`` (defaults: 20 epochs, lr 1e-3, batch 32,
            seed 0: the split, replay choice and training).
        val_fraction: share of the local data held out to judge the result (and roll back).
        replay: original-domain samples mixed into training (needs original data).
        max_forget: roll back when original-domain accuracy drops by more than this (0.02 = 2 pt).
        distill: weight of distillation from the starting model's own outputs (Learning without
            Forgetting, Li & Hoiem 2016): 0 trains on labels only, 0.5 blends both.
        quantize: re-quantize the exported ONNX (static INT8) even without a quantized reference.
    """

    strategy: str = "auto"
    memory_mb: float | None = None
    train: TrainSettings = TrainSettings()
    val_fraction: float = 0.2
    replay: int = 0
    max_forget: float | None = None
    distill: float = 0.0
    quantize: bool = False

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = TrainSettings(epochs=20, lr=1e-3, batch_size=32, seed=0,
                                                            weight_decay=0.0, warmup=0.0)

    def __post_init__(self) -> None:
        resolve_train(self)
        self.train.require_epochs(minimum=1)
        if self.strategy != "auto" and self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"unknown strategy {self.strategy!r}: choose auto or one of {', '.join(STRATEGY_NAMES)}")
        if self.memory_mb is not None and not self.memory_mb > 0:
            raise ConfigError(f"--memory-mb must be > 0, got {self.memory_mb}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.replay < 0:
            raise ConfigError(f"--replay must be >= 0, got {self.replay}")
        if not 0.0 <= self.distill < 1.0:
            raise ConfigError(f"--distill must be in [0, 1), got {self.distill}")
        if self.max_forget is not None and not 0 <= self.max_forget <= 1:
            raise ConfigError(f"--max-forget must be in [0, 1], got {self.max_forget}")


@dataclass
class AdaptResult:
    """The adapted model (ONNX), its weights, and the report written beside it."""

    model: Model
    state_dict: dict[str, Any]
    report: dict[str, Any]
    rolled_back: bool
    trials: list[MemoryMeasurement] = field(default_factory=list)


@restore_on_failure
def adapt(model: Model, local: Dataset, *, config: AdaptConfig | None = None, original: Dataset | None = None,
          out: str | os.PathLike[str] | None = None, resume: bool = False, deployed: Model | None = None,
          progress: bool = True) -> AdaptResult:
    """Fine-tune ``model`` on ``local`` data within a memory budget, safely.

    Args:
        model: PyTorch model (``load_model("net.py:build", weights=...)`` or ``.pt2``) or FP32 ONNX.
        local: labelled local samples (the new domain).
        config: strategy, memory budget, epochs, replay, rollback threshold.
        original: labelled original-domain samples: replay buffer source and held-out check.
        out: output ONNX path; ``OUT.pt`` (state_dict), ``OUT``'s .report.json and the checkpoint
            ``OUT.ckpt.pt`` are written beside it, each atomically. None: nothing written.
        resume: start from OUT's checkpoint (incremental adaptation with new local data).
        deployed: the ONNX model now on the device; when it is quantized the output is
            re-quantized the same way.

    Returns:
        The result; ``result.report`` is what ``OUT``'s .report.json holds.

    Raises:
        BudgetNotMet: no strategy's measured peak training memory fits ``memory_mb`` (exit 3).
        DataError: unlabelled or too little local data, ``replay`` without original data.
        ModelError: a model that cannot be trained here (quantized ONNX, TFLite), no checkpoint to resume.

    Example:
        >>> r = adapt(load_model("net.py:build", weights="w.pt"), load_data("local.npz"),
        ...           config=AdaptConfig(memory_mb=64), out="adapted.onnx")  # doctest: +SKIP
        >>> r.report["strategy"]["name"]  # doctest: +SKIP
        'sparse'
    """
    torch = require("torch", extra="torch")
    from edgeopt.training import TrainConfig, accuracy_torch, fit, predict_torch

    cfg = config or AdaptConfig()
    module, input_shape = _torch_module(model)
    module = copy.deepcopy(module)
    ckpt = checkpoint_path(out) if out is not None else None
    history_in: list[dict[str, Any]] = []
    if resume:
        if ckpt is None:
            raise ConfigError("--resume needs the output path whose checkpoint to continue from")
        state, info = load_checkpoint(ckpt)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"checkpoint {ckpt} does not match this model: {first_line(exc)}") from exc
        history_in = list(info.get("runs", []))
    start_state = copy.deepcopy(module.state_dict())

    local_train, local_val, replay_set, original_check = _split(local, original, cfg)
    train = _concat(local_train, replay_set) if replay_set is not None else local_train

    trials, fitting = _choose_strategy(module, train, cfg)

    def accuracies() -> dict[str, float | None]:
        return {"local": accuracy_torch(module, local_val, batch_size=cfg.train.batch_size),
                "original": accuracy_torch(module, original_check, batch_size=cfg.train.batch_size)
                if original_check is not None else None}

    before = accuracies()
    train_cfg = TrainConfig(train=cfg.train, alpha=cfg.distill, temperature=2.0)
    teacher = predict_torch(module, train, batch_size=cfg.train.batch_size) if cfg.distill > 0 else None
    attempts: list[dict[str, Any]] = []
    for strategy in fitting:
        module.load_state_dict(start_state)
        params = mark_trainable(module, strategy)
        runs = history_in + [{"samples": len(local), "strategy": strategy.name}]

        def on_epoch(result: Any, strategy: Strategy = strategy, runs: list[dict[str, Any]] = runs) -> None:
            if ckpt is not None:
                save_checkpoint(ckpt, state_dict=module.state_dict(),
                                info={"complete": False, "epoch": result.epochs_run, "strategy": strategy.name,
                                      "runs": runs})

        torch.manual_seed(cfg.train.seed)
        with frozen_norm_statistics(module):
            fitted = fit(module, train, config=train_cfg, validation=local_val, params=params, progress=progress,
                         teacher_logits=teacher, description=f"adapting ({strategy.name})", on_epoch_end=on_epoch)
        after = accuracies()
        reason = _rollback_reason(before, after, cfg)
        attempts.append({"strategy": strategy.name, "accuracy_after": after, "rollback_reason": reason})
        if reason is None or not reason.startswith(FORGOT):
            break
    if reason is not None:
        module.load_state_dict(start_state)
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()

    onnx_model, quantized_with = _export(module, input_shape, train, deployed, cfg)
    onnx_model = onnx_model.with_metadata(adapted_strategy=strategy.name, adapted_rolled_back=str(reason is not None))
    deployed_acc = _evaluate_onnx(onnx_model, local_val, original_check)

    report: dict[str, Any] = {
        "model": model.source,
        "strategy": strategy_dict(strategy),
        "strategy_requested": cfg.strategy,
        "memory_budget_mb": cfg.memory_mb,
        "trainable_params": count_params(params),
        "total_params": count_params(list(module.parameters())),
        "peak_memory_mb": round(next(t.peak_mb for t in trials if t.strategy == strategy.name), 3),
        "memory_method": "torch.profiler CPU allocator events over real training steps, plus resident weights",
        "strategies": [t.to_dict() | {"fits": cfg.memory_mb is None or t.peak_mb <= cfg.memory_mb} for t in trials],
        "samples": {"local_train": len(local_train), "local_validation": len(local_val),
                    "replay": len(replay_set) if replay_set is not None else 0,
                    "original_check": len(original_check) if original_check is not None else 0},
        "accuracy_before": before,
        "accuracy_after": after,
        "rolled_back": reason is not None,
        "rollback_reason": reason,
        "attempts": attempts,
        "output_accuracy": deployed_acc,
        "quantized": quantized_with,
        "training": {"epochs_run": fitted.epochs_run, "best_epoch": fitted.best_epoch, "seconds": round(fitted.seconds, 2),
                     "history": fitted.history, "config": flat_fields(cfg)},
        "resumed": resume,
        "runs": runs,
    }
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if out is not None:
        onnx_model = _write_outputs(Path(out), onnx_model, state, report, strategy, runs)
    return AdaptResult(model=onnx_model, state_dict=state, report=report, rolled_back=reason is not None, trials=trials)


def is_quantized(model: Model) -> bool:
    """True when an ONNX model carries quantized operators or edgeopt quantization metadata."""
    from edgeopt.transforms.quantize import QUANTIZED_OPS

    if model.format != "onnx":
        return False
    if "edgeopt.quantization" in model.metadata:
        return True
    return any(n.op_type in QUANTIZED_OPS for n in model.onnx.graph.node)


# -- steps ---------------------------------------------------------------------------------------
def _torch_module(model: Model) -> tuple[Any, tuple[int, ...] | None]:
    shape = None
    if model.inputs:
        fixed = model.inputs[0].fixed_shape(1)
        shape = tuple(fixed) if fixed else None
    if model.format == "torch":
        return model.module, shape
    if model.format == "onnx":
        if is_quantized(model):
            raise ModelError(f"{model.source} is quantized and cannot be trained; pass the FP32 PyTorch model "
                             "(file.py:factory --weights W) and this file as --deployed to re-quantize the result")
        onnx2torch = require("onnx2torch", extra="adapt")
        try:
            module = onnx2torch.convert(model.onnx)
        except Exception as exc:
            raise ModelError(f"cannot convert {model.source} to PyTorch for training "
                             f"({type(exc).__name__}: {first_line(exc)}); "
                             "pass the PyTorch model as file.py:factory with --weights") from exc
        return module, shape
    raise ModelError(f"{model.source} is a {model.format} model; adapt trains PyTorch models: pass "
                     "file.py:factory with --weights, a .pt2 archive, or an FP32 .onnx")


def _split(local: Dataset, original: Dataset | None, cfg: AdaptConfig
           ) -> tuple[Dataset, Dataset, Dataset | None, Dataset | None]:
    if local.labels is None:
        raise DataError(f"{local.source} has no labels (y): adapting needs labelled local data")
    if len(local) < 10:
        raise DataError(f"{local.source} has {len(local)} samples; adapting needs at least 10 "
                        "(some are held out to check the result)")
    local_train, local_val = local.split(1.0 - cfg.val_fraction, seed=cfg.train.seed)
    replay_set = original_check = None
    if cfg.replay and original is None:
        raise DataError("--replay takes its samples from the original data: pass --original-data too")
    if original is not None:
        if original.labels is None:
            raise DataError(f"{original.source} has no labels (y): the original-domain check needs them")
        if set(original.inputs) != set(local.inputs):
            raise DataError(f"{original.source} has inputs {sorted(original.inputs)} but {local.source} has "
                            f"{sorted(local.inputs)}")
        if cfg.replay:
            if cfg.replay >= len(original):
                raise DataError(f"--replay {cfg.replay} leaves no original samples for the held-out check "
                                f"({original.source} has {len(original)})")
            replay_set, original_check = original.split(cfg.replay / len(original), seed=cfg.train.seed)
        else:
            original_check = original
    return local_train, local_val, replay_set, original_check


def _concat(a: Dataset, b: Dataset) -> Dataset:
    import numpy as np

    inputs = {k: np.concatenate([a.inputs[k], b.inputs[k].astype(a.inputs[k].dtype)]) for k in a.inputs}
    labels = np.concatenate([a.labels, b.labels]) if a.labels is not None and b.labels is not None else None
    return Dataset(inputs=inputs, labels=labels, source=f"{a.source}+replay")


def _choose_strategy(module: Any, train: Dataset, cfg: AdaptConfig
                     ) -> tuple[list[MemoryMeasurement], list[Strategy]]:
    """Every strategy's measured peak, and those that fit the budget, most capable first."""
    candidates: tuple[Strategy, ...] = STRATEGIES if cfg.strategy == "auto" else (get_strategy(cfg.strategy),)
    trials = [measure_training_memory(module, train, s, batch_size=cfg.train.batch_size, lr=cfg.train.lr) for s in candidates]
    fitting = [(s, t) for s, t in zip(candidates, trials, strict=True)
               if cfg.memory_mb is None or t.peak_mb <= cfg.memory_mb]
    if not fitting:
        cheapest = min(trials, key=lambda t: t.peak_mb)
        which = "no strategy fits" if cfg.strategy == "auto" else f"strategy {cfg.strategy} does not fit"
        raise BudgetNotMet(f"{which} in --memory-mb {cfg.memory_mb:g}: the lowest measured peak is "
                           f"{cheapest.peak_mb:.1f} MB ({cheapest.strategy}, batch {cfg.train.batch_size}); "
                           "raise --memory-mb or lower --batch-size")
    return trials, [s for s, _ in reversed(fitting)]


FORGOT = "original-domain accuracy dropped"


def _rollback_reason(before: dict[str, float | None], after: dict[str, float | None], cfg: AdaptConfig) -> str | None:
    if after["local"] is not None and before["local"] is not None and after["local"] < before["local"]:
        return (f"adapted model is worse on the local validation split "
                f"({100 * after['local']:.1f}% < {100 * before['local']:.1f}%)")
    if after["local"] == before["local"] and after["local"] is not None:
        return f"no improvement on the local validation split ({100 * after['local']:.1f}%)"
    if cfg.max_forget is not None and before["original"] is not None and after["original"] is not None:
        drop = before["original"] - after["original"]
        if drop > cfg.max_forget + 1e-9:  # 2 of 100 samples is 0.020000000000000018, not more than 0.02
            return (f"{FORGOT} {100 * drop:.1f} pt "
                    f"(> --max-forget {100 * cfg.max_forget:.1f} pt)")
    return None


def _export(module: Any, input_shape: tuple[int, ...] | None, calib: Dataset, deployed: Model | None,
            cfg: AdaptConfig) -> tuple[Model, dict[str, Any] | None]:
    from edgeopt.transforms.export import to_onnx

    shape = input_shape or (1, *next(iter(calib.inputs.values())).shape[1:])
    exported, _ = to_onnx(Model.from_torch(module, source="adapted", input_shape=shape), data=calib)
    if not (cfg.quantize or (deployed is not None and is_quantized(deployed))):
        return exported, None
    from edgeopt.transforms.config import config_from_dict, config_to_dict
    from edgeopt.transforms.quantize import StaticInt8, quantize

    qcfg: Any = StaticInt8()
    stored = deployed.metadata.get("edgeopt.quantization") if deployed is not None else None
    if stored:
        try:
            qcfg = config_from_dict(json.loads(stored))
        except Exception:  # an older or foreign record: fall back to the default static INT8
            qcfg = StaticInt8()
    quantized = quantize(exported, qcfg, data=calib)
    return quantized, config_to_dict(qcfg)


def _evaluate_onnx(model: Model, local_val: Dataset, original: Dataset | None) -> dict[str, float | None]:
    from edgeopt.measure.evaluate import evaluate

    return {"local": evaluate(model, local_val, threads=1).accuracy,
            "original": evaluate(model, original, threads=1).accuracy if original is not None else None}


def _write_outputs(out: Path, onnx_model: Model, state: dict[str, Any], report: dict[str, Any],
                   strategy: Strategy, runs: list[dict[str, Any]]) -> Model:
    torch = require("torch", extra="torch")
    from edgeopt.fileio import atomic_path, report_path, write_json

    weights = out.with_suffix(".pt")
    with atomic_path(weights) as tmp:
        torch.save(state, str(tmp))
    saved = onnx_model.save(out)
    save_checkpoint(checkpoint_path(out), state_dict=state,
                    info={"complete": True, "strategy": strategy.name, "runs": runs})
    report["outputs"] = {"onnx": str(out), "state_dict": str(weights), "checkpoint": str(checkpoint_path(out)),
                         "size_bytes": saved.size_bytes}
    write_json(report_path(out), report)
    return saved
