"""DistilBERT-style distillation of a BERT-family sequence classifier (Sanh et al. 2019).

The student is the teacher's configuration with half the layers, initialised from every other
teacher layer (0, 2, 4, ...) plus the teacher's embeddings, pooler and classifier, then trained by
:func:`edgeopt.training.fit` on soft targets (KL at temperature T, and hard labels by ``1 -
alpha``) plus a cosine loss pulling each student layer's hidden states towards those of the
teacher layer it stands in for (student layer i <-> teacher layer 2i+1), over real tokens only.
Models are Hugging Face ``transformers`` classes built from a ``BertConfig`` or local weights;
nothing is downloaded. Text comes from ``.jsonl`` via :mod:`edgeopt.text_data`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeopt.deps import require
from edgeopt.errors import BadInput, DataError, ModelError, first_line
from edgeopt.model import Model
from edgeopt.search import distill_choice as choice
from edgeopt.text_data import TextExamples, WordVocab, text_dataset
from edgeopt.training import TrainSettings
from edgeopt.transforms.distill import check_kd_fields, split_for_distillation, student_notes


@dataclass(frozen=True)
class DistillText:
    """Settings for :func:`distill_text`; ``hidden_weight`` 0 turns hidden-state matching off;
    ``train`` the shared training settings (defaults: 10 epochs, lr 1e-4, batch 32, and a warm-up
    over 0.1 of the steps: transformers need a linear learning-rate ramp).
    ``temperature``/``alpha`` None are chosen on the validation split, ``train.epochs`` may be
    ``"auto"``, as for vision (:class:`edgeopt.transforms.distill.Distill`)."""

    train: TrainSettings = TrainSettings()
    temperature: float | None = None
    alpha: float | None = None
    hidden_weight: float = 1.0
    val_fraction: float = 0.15
    max_len: int = 64
    time_budget: float | None = None

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = TrainSettings(epochs=10, lr=1e-4, batch_size=32, seed=0,
                                                            weight_decay=0.0, warmup=0.1)

    def __post_init__(self) -> None:
        check_kd_fields(self)
        if self.hidden_weight < 0:
            raise BadInput(f"hidden-state weight must be >= 0, got {self.hidden_weight}")
        if self.max_len < 3:
            raise BadInput(f"--max-len must be >= 3, got {self.max_len}")


def make_bert_classifier(*, vocab_size: int, layers: int = 4, hidden: int = 128, heads: int = 4,
                         intermediate: int | None = None, max_len: int = 128, classes: int = 2,
                         seed: int = 0) -> Any:
    """A randomly initialised ``BertForSequenceClassification`` (eager attention, exports to ONNX).

    Example:
        >>> teacher = make_bert_classifier(vocab_size=500, layers=4, classes=2)  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    transformers = require("transformers", extra="transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                                     max_position_embeddings=max(max_len, 8), num_labels=classes,
                                     attn_implementation="eager")
    return transformers.BertForSequenceClassification(config).eval()


def halve_bert(teacher: Any) -> Any:
    """The DistilBERT student: half the layers, initialised from teacher layers 0, 2, 4, ....

    Raises:
        ModelError: the teacher is not a BERT-style classifier (``.bert.encoder.layer``) or has one layer.
    """
    transformers = require("transformers", extra="transformers")
    layers = _encoder_layers(teacher)
    if len(layers) < 2:
        raise ModelError(f"the teacher has {len(layers)} layer(s); halving needs at least 2")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = (len(layers) + 1) // 2
    config._attn_implementation = "eager"
    student = type(teacher)(config) if isinstance(teacher, transformers.PreTrainedModel) else copy.deepcopy(teacher)
    own = student.state_dict()
    state = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if "layer" in parts and parts[parts.index("layer") - 1] == "encoder":
            at = parts.index("layer") + 1
            index = int(parts[at])
            if index % 2:
                continue
            parts[at] = str(index // 2)
        state[".".join(parts)] = value
    missing = [k for k in own if k not in state]
    if missing:
        raise ModelError(f"cannot initialise the student from the teacher: {len(missing)} missing (e.g. {missing[0]})")
    student.load_state_dict({k: state[k] for k in own}, strict=True)
    return student.eval()


def _encoder_layers(module: Any) -> Any:
    base = getattr(module, getattr(module, "base_model_prefix", "bert"), None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ModelError(f"{type(module).__name__} is not a BERT-style encoder classifier (no .encoder.layer)")
    return layers


def load_text_teacher(spec: str, *, weights: str | Path | None = None, trust_pickle: bool = False
                      ) -> tuple[Any, WordVocab | None]:
    """A teacher from a local Hugging Face folder (config + weights, and ``vocab.json`` written by
    edgeopt if present) or ``file.py:factory`` (+ weights); never from the hub."""
    path = Path(spec)
    if path.is_dir():
        transformers = require("transformers", extra="transformers")
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json: save the teacher with save_pretrained()")
        hf_logging = transformers.utils.logging
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # keep stderr to our own one-line messages
        try:
            module = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, attn_implementation="eager")
        except Exception as exc:
            raise ModelError(f"cannot load a sequence classifier from {path}: {first_line(exc)}") from exc
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        vocab_file = path / "vocab.json"
        vocab = WordVocab.load(vocab_file) if vocab_file.exists() else None
        return module.eval(), vocab
    from edgeopt.model import load_model

    model = load_model(spec, weights=weights, trust_pickle=trust_pickle)
    if model.format != "torch":
        raise ModelError(f"a transformer teacher must be a PyTorch model (folder or file.py:factory), not {model.format}")
    return model.module.eval(), None


class _Logits:
    """Wrap a classifier so that ``module(input_ids, attention_mask)`` returns the logits tensor (for export)."""

    @staticmethod
    def wrap(module: Any) -> Any:
        torch = require("torch", extra="torch")

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return LogitsOnly(module).eval()


def export_text_classifier(module: Any, data: Any, *, source: str) -> Model:
    """Verified ONNX export with inputs ``input_ids``, ``attention_mask`` and output ``logits``."""
    from edgeopt.transforms.export import OnnxExport, to_onnx

    wrapped = Model.from_torch(_Logits.wrap(module), source=source)
    onnx_model, _ = to_onnx(wrapped, OnnxExport(atol=1e-3, input_names=("input_ids", "attention_mask")), data=data)
    return Model.from_onnx(onnx_model.onnx, source=source)


def _hidden_loss(torch: Any, student: Any, teacher: Any, train: Any, weight: float) -> tuple[Any, list[Any]]:
    captured: dict[int, Any] = {}
    hooks = []
    for i, layer in enumerate(_encoder_layers(student)):
        def hook(_m: Any, _args: Any, out: Any, i: int = i) -> None:
            captured[i] = out[0] if isinstance(out, tuple) else out
        hooks.append(layer.register_forward_hook(hook))
    ids = torch.from_numpy(train.inputs["input_ids"])
    mask = torch.from_numpy(train.inputs["attention_mask"])
    n_teacher = len(_encoder_layers(teacher))

    def extra(idx: Any) -> Any:
        with torch.no_grad():
            hs = teacher(input_ids=ids[idx], attention_mask=mask[idx], output_hidden_states=True).hidden_states
        m = mask[idx].float()
        total = 0.0
        for i, s_h in captured.items():
            t_h = hs[min(2 * i + 2, n_teacher)]
            cos = torch.nn.functional.cosine_similarity(s_h, t_h, dim=-1)
            total = total + ((1.0 - cos) * m).sum() / m.sum().clamp(min=1.0)
        return weight * total / max(1, len(captured))

    return extra, hooks


@dataclass
class TextDistillResult:
    student_module: Any
    student_onnx: Model
    vocab: WordVocab
    report: dict[str, Any]
    baseline_module: Any = None
    teacher_onnx: Model | None = None  # what the report step (report/distill.py) measures on
    test_data: Any = None


def distilled_text_model(teacher: Any, examples: TextExamples, config: DistillText | None = None, *,
                         vocab: WordVocab | None = None, test: TextExamples | None = None, baseline: bool = True,
                         progress: bool = True) -> TextDistillResult:
    """The technique: distill a BERT-family classifier into its every-other-layer student; export both.

    Nothing here evaluates the exports or times them: :func:`edgeopt.report.distill.distill_text`
    measures student against teacher through the shared step (measure/outcome.py).

    Args:
        teacher: a ``transformers`` sequence classifier (e.g. ``BertForSequenceClassification``).
        examples: training texts with labels (labels optional when ``alpha`` is 1).
        config: epochs, temperature, alpha, hidden-state weight, max_len.
        vocab: the teacher's word vocabulary (default: built from ``examples``).
        test: texts the report's accuracies use (default: the held-out validation split).
        baseline: also train the same initialised student on labels alone.

    Returns:
        a :class:`TextDistillResult` with the student, its verified ONNX export (and the teacher's) and
        the report (layers, params, sizes, candidates, the baseline).

    Raises:
        DataError: no labels with alpha < 1; labels outside the teacher's classes.
        ModelError: a teacher that is not a BERT-style encoder classifier.

    Example:
        >>> r = distilled_text_model(teacher, load_jsonl("train.jsonl"), DistillText(train=TrainSettings(epochs=3)))  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    from edgeopt.training import TrainConfig, accuracy_torch, fit, predict_torch

    cfg = config or DistillText()
    if cfg.alpha is not None and cfg.alpha < 1 and examples.labels is None:
        raise DataError(f"{examples.source} has no labels but alpha {cfg.alpha:g} < 1 asks for the hard-label "
                        "loss; pass --alpha 1 to learn from the teacher alone")
    if cfg.train.epochs == choice.AUTO and examples.labels is None:
        raise DataError(f"{examples.source} has no labels: --epochs auto watches the validation accuracy; "
                        "give a number of epochs")
    vocab = vocab or WordVocab.build(examples.texts)
    teacher_vocab = int(getattr(teacher.config, "vocab_size", len(vocab)))
    if len(vocab) > teacher_vocab:
        raise DataError(f"the vocabulary has {len(vocab)} tokens but the teacher's embedding has {teacher_vocab}; "
                        "use the vocabulary the teacher was trained with")
    max_pos = int(getattr(teacher.config, "max_position_embeddings", cfg.max_len))
    max_len = min(cfg.max_len, max_pos)
    data = text_dataset(examples, vocab, max_len=max_len)
    train, validation, test_data = split_for_distillation(
        data, cfg, validation=None, test=text_dataset(test, vocab, max_len=max_len) if test is not None else None)
    teacher.eval()
    soft = predict_torch(teacher, train)
    classes = soft.shape[1]
    for part in (train, test_data):
        if part.labels is not None and (part.labels.max(initial=0) >= classes or part.labels.min(initial=0) < 0):
            raise DataError(f"{part.source}: labels range {int(part.labels.min())}..{int(part.labels.max())} but the "
                            f"teacher has {classes} outputs")

    first = halve_bert(teacher)
    initial = copy.deepcopy(first.state_dict())
    # what the teacher's every-other layers give before any training: on easy tasks most of the
    # student's accuracy is already here, and the report should say so
    initial_acc = accuracy_torch(first, test_data) if test_data.labels is not None else None
    labels = train.labels is not None
    settings = choice.kd_settings(cfg.temperature, cfg.alpha, labels=labels, default_temperature=2.0)
    with_baseline = baseline and labels
    schedule = choice.train_schedule(cfg.train.epochs, patience=cfg.train.patience, time_budget=cfg.time_budget,
                                     runs=len(settings) + int(with_baseline))

    def train_cfg(temperature: float, alpha: float) -> Any:
        return TrainConfig(train=replace(cfg.train, epochs=schedule["epochs"], patience=schedule["patience"]),
                           optimizer="adamw", temperature=temperature, alpha=alpha, schedule=schedule["schedule"],
                           max_seconds=schedule["max_seconds"])

    def fresh() -> Any:
        module = first if not candidates else halve_bert(teacher)
        module.load_state_dict(initial)
        return module

    candidates: list[choice.KdCandidate] = []
    if with_baseline:
        c = choice.KdCandidate(name=choice.LABELS_ONLY, teacher="none")
        c.module = fresh()
        c.record(fit(c.module, train, config=train_cfg(1.0, 0.0), validation=validation, progress=progress,
                     description="student on labels only"))
        candidates.append(c)
    for temperature, alpha in settings:
        c = choice.KdCandidate(name=choice.candidate_name(temperature, alpha), teacher="teacher",
                               temperature=temperature, alpha=alpha)
        c.module = fresh()
        extra, hooks = (None, [])
        if cfg.hidden_weight > 0:
            extra, hooks = _hidden_loss(torch, c.module, teacher, train, cfg.hidden_weight)
        try:
            c.record(fit(c.module, train, config=train_cfg(temperature, alpha), validation=validation,
                         teacher_logits=soft, extra_loss=extra, progress=progress,
                         description=f"distilling (half the layers, {c.name})"))
        finally:
            for h in hooks:
                h.remove()
        candidates.append(c)
    if test_data.labels is not None:
        for c in candidates:
            c.test_accuracy = accuracy_torch(c.module, test_data)
    chosen = choice.pick(candidates)
    student, fitted = chosen.module, chosen.fit
    base = next((c for c in candidates if not c.distilled), None)
    base_module = base.module if base is not None else None
    base_acc = base.test_accuracy if base is not None else None
    notes = choice.choice_notes(chosen, candidates, epochs=cfg.train.epochs, test_source=test_data.source)
    leak = choice.overlap_note(test_data, chose={"training": train, "validation": validation})
    if leak:
        notes.append(leak)

    teacher_onnx = export_text_classifier(teacher, validation, source="teacher")
    student_onnx = export_text_classifier(student, validation, source="student")

    def n_params(m: Any) -> int:
        return int(sum(p.numel() for p in m.parameters()))

    report: dict[str, Any] = {
        "config": {"student": "half", "epochs": cfg.train.epochs, "temperature": cfg.temperature, "alpha": cfg.alpha,
                   "hidden_weight": cfg.hidden_weight, "lr": cfg.train.lr, "warmup": cfg.train.warmup,
                   "max_len": max_len, "seed": cfg.train.seed, "time_budget": cfg.time_budget,
                   "train_schedule": schedule},
        "data": {"train": len(train), "validation": len(validation), "test": len(test_data),
                 "test_source": test_data.source, "vocab_size": len(vocab)},
        "teacher": {"layers": len(_encoder_layers(teacher)), "params": n_params(teacher), "macs": None,
                    "onnx_bytes": teacher_onnx.size_bytes, "latency_ms": None, "accuracy": None},
        "student": {"layers": len(_encoder_layers(student)), "params": n_params(student), "macs": None,
                    "onnx_bytes": student_onnx.size_bytes, "latency_ms": None,
                    "accuracy": None, "accuracy_before_training": initial_acc,
                    "agreement": None, "epochs_run": fitted.epochs_run,
                    "best_epoch": fitted.best_epoch, "best_val_accuracy": fitted.best_val_accuracy,
                    "stopped": fitted.stopped, "distilled": chosen.distilled, "temperature": chosen.temperature,
                    "alpha": chosen.alpha},
        "ratios": {"params": n_params(teacher) / n_params(student),
                   "size": teacher_onnx.size_bytes / student_onnx.size_bytes, "speedup_p50": None},
        "latency": None,
        "baseline": None if base_module is None else {
            "description": "same every-other-layer student, trained on labels only", "accuracy": base_acc},
        "chosen": chosen.name,
        "chosen_by": "validation accuracy (ties: labels only)",
        "candidates": [c.to_dict() for c in candidates],
        "notes": notes + student_notes(fitted, student_params=n_params(student), teacher_params=n_params(teacher)),
    }
    return TextDistillResult(student_module=student, student_onnx=student_onnx, vocab=vocab, report=report,
                             baseline_module=base_module, teacher_onnx=teacher_onnx, test_data=test_data)


def predict_text(module: Any, examples: TextExamples, vocab: WordVocab, *, max_len: int = 64) -> np.ndarray:
    """Logits of a PyTorch text classifier for ``examples`` (tokenized with ``vocab``)."""
    from edgeopt.training import predict_torch

    return predict_torch(module, text_dataset(examples, vocab, max_len=max_len))
