"""Knowledge distillation: a small student learns from a large teacher's soft outputs.

The student (a catalogue network built for the data, or any ``file.py:factory``) is trained by
the one training loop (:func:`edgeopt.training.fit`) on ``alpha * T^2 * KL(teacher_T ||
student_T) + (1 - alpha) * CE(labels)`` (Hinton et al. 2015), optionally plus feature matching
(FitNets-style: the student's penultimate features, through a learned linear projection, pulled
towards the teacher's by cosine distance). The teacher is a PyTorch model or an ONNX model (run
by ONNX Runtime). Early stopping uses a held-out split.

With ``augment_shift`` the images are randomly shifted every batch and the teacher is run on the
same shifted batch ("consistent teaching", Beyer et al. 2022): on small datasets the student then
learns the teacher's whole function around each image rather than a few thousand soft labels,
which is where distillation beats training on labels alone. Without augmentation (and without
feature matching) the teacher's logits are computed once, which is cheaper.

Distillation does not always pay (a student far smaller than a near-certain teacher can end below
plain training), so several candidates are trained from the same initial weights: the student on
the labels alone, a small temperature x alpha grid (or the values the user gave), and for a 10x
size gap a teacher assistant (TAKD). The best on the validation split ships, a tie goes to the
labels-only student, and the report lists every candidate (:mod:`edgeopt.search.distill_choice`).
Its accuracy figures come from a test split that chose nothing, beside the teacher, with latency
of the teacher and student ONNX exports timed interleaved.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, DataError
from edgeopt.model import Model
from edgeopt.training import TrainSettings, resolve_train
from edgeopt.transforms.config import TransformContext, register_config, register_transform


def check_kd_fields(config: Any) -> None:
    """The checks every distillation config shares beyond its ``train`` settings (resolved and checked by
    :class:`edgeopt.training.TrainSettings`): temperature, alpha, val_fraction and time budget
    (temperature and alpha may be None: chosen on the validation split)."""
    resolve_train(config)
    config.train.require_epochs(minimum=1, auto=True)
    if config.temperature is not None and config.temperature <= 0:
        raise BadInput(f"--temperature must be > 0, got {config.temperature}")
    if config.alpha is not None and not 0.0 <= config.alpha <= 1.0:
        raise BadInput(f"--alpha must be in [0, 1], got {config.alpha}")
    if not 0.0 < config.val_fraction < 0.5:
        raise BadInput(f"--val-fraction must be in (0, 0.5), got {config.val_fraction}")
    if config.time_budget is not None and config.time_budget <= 0:
        raise BadInput(f"--time-budget must be > 0, got {config.time_budget}")


@register_config
@dataclass(frozen=True)
class Distill:
    """Train ``student`` (catalogue name or ``file.py:factory``) from the teacher's soft targets.

    ``temperature`` / ``alpha`` None: each is chosen on the validation split from a small grid
    (:mod:`edgeopt.search.distill_choice`), with the same student trained on labels alone as one
    more candidate; the best by validation accuracy ships. Given values are used as given.
    ``alpha`` weights the soft loss (1.0: teacher only, no labels needed); ``feature_weight`` > 0
    adds feature matching (PyTorch teachers only); ``train`` holds the shared training settings
    (defaults: 10 epochs, lr 2e-3, batch 64): ``train.epochs`` is a count or ``"auto"`` (until the
    validation curve plateaus, ``train.patience`` epochs without improvement); ``time_budget`` (seconds)
    bounds all candidates together; ``val_fraction`` of the data is held out for validation (and
    as much again for the test figures when no test data is given); ``augment_shift`` shifts
    images by up to that many pixels with the teacher seeing the same view (the labels-only
    candidate gets the same augmentation); ``assistant`` is ``auto`` (a catalogue network between
    teacher and student when the student is 10x or more smaller), ``none``, or a catalogue name.
    """

    student: str = "mobilenet_v3_small"
    train: TrainSettings = TrainSettings()
    temperature: float | None = None
    alpha: float | None = None
    feature_weight: float = 0.0
    val_fraction: float = 0.15
    augment_shift: int = 0
    time_budget: float | None = None
    assistant: str = "auto"

    TRAIN_DEFAULTS: ClassVar[TrainSettings] = TrainSettings(epochs=10, lr=2e-3, batch_size=64, seed=0,
                                                            weight_decay=0.0, warmup=0.0)

    def __post_init__(self) -> None:
        if not self.student:
            raise BadInput("student must be a catalogue name or file.py:factory")
        check_kd_fields(self)
        if self.feature_weight < 0:
            raise BadInput(f"feature weight must be >= 0, got {self.feature_weight}")
        if self.augment_shift < 0:
            raise BadInput(f"--augment-shift must be >= 0 pixels, got {self.augment_shift}")
        if not self.assistant:
            raise BadInput("--assistant must be auto, none or a catalogue name")


@dataclass
class DistillResult:
    """The trained student (PyTorch and verified ONNX), the no-teacher baseline's accuracy, and the report."""

    student: Model
    student_onnx: Model
    report: dict[str, Any]
    baseline: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    candidates: list[Any] = field(default_factory=list)
    # what the report step (report/distill.py) measures on: the split the figures come from
    validation: Dataset | None = field(default=None, repr=False)
    test: Dataset | None = field(default=None, repr=False)
    input_size: tuple[int, ...] = ()
    student_module: Any = field(default=None, repr=False)


def build_student(spec: str, *, input_size: tuple[int, ...], classes: int, seed: int = 0) -> Any:
    """A student module: a catalogue name built for the data, or ``file.py:factory`` (seeded init)."""
    torch = require("torch", extra="torch")
    from edgeopt.transforms.architectures import build_architecture

    torch.manual_seed(seed)
    if ".py:" in spec or spec.endswith(".py"):
        from edgeopt.model import load_model

        return load_model(spec).module
    return build_architecture(spec, input_size=input_size, classes=classes)


def teacher_logits(run_teacher: Any, data: Dataset, *, batch_size: int = 256) -> np.ndarray:
    """The logits of a :func:`teacher_function` for every sample of ``data``, in order (computed once,
    for training without augmentation)."""
    torch = require("torch", extra="torch")
    chunks = []
    with torch.no_grad():
        for feeds, _ in data.batches(batch_size):
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            chunks.append(run_teacher(batch).float().numpy())
    return np.concatenate(chunks).reshape(len(data), -1)


def teacher_function(teacher: Model) -> Any:
    """``batch tensors -> teacher logits``: PyTorch in eval mode, ONNX through one ONNX Runtime session.

    Used for the teacher's logits computed once, and for a teacher run during training (on
    augmented views, or for feature matching)."""
    torch = require("torch", extra="torch")
    from edgeopt.training import _forward

    if teacher.format == "torch":
        module = teacher.module.eval()
        return lambda batch: _forward(module, batch)
    if teacher.format != "onnx":
        raise BadInput(f"teacher {teacher.source} is {teacher.format}; give a PyTorch or ONNX teacher")
    from edgeopt.measure.evaluate import predict
    from edgeopt.runtimes.sessions import open_session, resolve_settings

    session = open_session(teacher, resolve_settings(teacher, runtime="onnxruntime"))

    def run(batch: dict[str, Any]) -> Any:
        view = Dataset({k: v.numpy() for k, v in batch.items()}, None, source="training batch")
        out = predict(teacher, view, session=session)
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(len(view), -1))

    return run


def student_notes(fitted: Any, *, student_params: int, teacher_params: int | None) -> list[str]:
    """Plain warnings for results a user would otherwise misread as distillation failing."""
    notes = []
    if fitted.best_epoch == 0 and fitted.best_val_accuracy is not None:
        notes.append(f"the student never beat its initial weights on the held-out split in {fitted.epochs_run} "
                     f"epoch(s) (best {100 * fitted.best_val_accuracy:.1f}%): train longer (--epochs) or change --lr")
    if teacher_params and student_params >= teacher_params:
        notes.append(f"the student has {student_params:,} parameters, the teacher {teacher_params:,}: pick a smaller "
                     "student (see edgeopt zoo)")
    return notes


def teacher_on_shifted_views(run_teacher: Any, data: Dataset, pixels: int, *, seed: int = 0) -> dict[str, float]:
    """The teacher's accuracy on ``data`` as is and shifted as training will shift it.

    Consistent teaching only helps if the teacher is right on the shifted views: a teacher never
    trained with shifts can fall from 100% to 60% on digits moved by 2 pixels, and its soft
    targets then teach the student mistakes.
    """
    torch = require("torch", extra="torch")
    from edgeopt.training import _Shift

    shift = None
    plain, moved = [], []
    with torch.no_grad():
        for feeds, _ in data.batches(256):  # a large held-out set never goes through the teacher at once
            x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            shift = shift or _Shift(torch, x, pixels, seed=seed)
            plain.append(run_teacher(x).argmax(dim=1).numpy())
            moved.append(run_teacher(shift(x)).argmax(dim=1).numpy())
    return {"plain": float(np.mean(np.concatenate(plain) == data.labels)),
            "shifted": float(np.mean(np.concatenate(moved) == data.labels))}


def _output_size(torch: Any, module: Any, sample: dict[str, np.ndarray]) -> int:
    from edgeopt.training import _forward

    module.eval()
    with torch.no_grad():
        out = _forward(module, {k: torch.from_numpy(np.ascontiguousarray(v[:1])) for k, v in sample.items()})
    return int(np.prod(out.shape[1:]))


def _feature_module(torch: Any, module: Any) -> Any:
    """The last Linear (or 1x1 classifier Conv) layer: its input is the penultimate feature."""
    last = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            last = m
    if last is None:
        raise BadInput("feature matching needs a model with a Linear or Conv2d classifier")
    return last


class _Capture:
    """Forward pre-hook keeping the (pooled) input of a layer from the latest forward pass."""

    def __init__(self, torch: Any, layer: Any) -> None:
        self.value = None
        self._torch = torch
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, _module: Any, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.value = x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def _feature_loss(torch: Any, student: Any, teacher: Any, train: Dataset, weight: float
                  ) -> tuple[Any, list[Any], list[Any]]:
    """(extra_loss callback, projection parameters, hooks to remove) for FitNets-style matching.

    The teacher runs inside the training loop on each batch (``fit(teacher=...)``) before the
    student's loss is taken, so its hook already holds this batch's features.
    """
    s_cap = _Capture(torch, _feature_module(torch, student))
    t_cap = _Capture(torch, _feature_module(torch, teacher))
    sample = {k: torch.from_numpy(np.ascontiguousarray(v[:1])) for k, v in train.inputs.items()}
    from edgeopt.training import _forward

    with torch.no_grad():
        _forward(teacher.eval(), sample)
        _forward(student.eval(), sample)
    proj = torch.nn.Linear(s_cap.value.shape[1], t_cap.value.shape[1])

    def extra(_idx: Any) -> Any:
        cos = torch.nn.functional.cosine_similarity(proj(s_cap.value), t_cap.value, dim=1)
        return weight * (1.0 - cos).mean()

    return extra, list(proj.parameters()), [s_cap.handle, t_cap.handle]


def onnx_params(model: Model) -> int:
    """Parameters stored in an ONNX graph (its initializers)."""
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).size for t in model.onnx.graph.initializer))


def split_for_distillation(data: Dataset, cfg: Any, *, validation: Dataset | None, test: Dataset | None,
                           hold_test: bool = True) -> tuple[Dataset, Dataset, Dataset | None]:
    """(train, validation, test): what the caller gave, the rest held out of ``data`` (no test
    part when ``hold_test`` is False and none was given).

    The test part chose nothing: not the epoch, not the candidate."""
    train = data
    need = (validation is None) + (test is None and hold_test)
    if need and len(data) < 4 * need:
        raise DataError(f"{data.source} has {len(data)} samples; need at least {4 * need} to hold out "
                        f"{'validation and test splits' if need == 2 else 'a held-out split'}")
    val_fraction = cfg.val_fraction
    if test is None and hold_test:
        train, test = train.split(1.0 - cfg.val_fraction, seed=cfg.train.seed + 1)
        test = Dataset(test.inputs, test.labels, source=f"a held-out test split of {data.source} ({len(test)})")
        val_fraction = cfg.val_fraction / (1.0 - cfg.val_fraction)  # of what is left: the same share of data
    if validation is None:
        train, validation = train.split(1.0 - val_fraction, seed=cfg.train.seed)
    return train, validation, test


def _params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def distilled_model(teacher: Model, data: Dataset, config: Distill | None = None, *,
                    validation: Dataset | None = None, test: Dataset | None = None, baseline: bool = True,
                    progress: bool = True, hold_test: bool = True) -> DistillResult:
    """The technique: distill ``teacher`` into ``config.student`` on ``data`` and ship the best candidate.

    Nothing here exports the teacher or times anything: :func:`edgeopt.report.distill.distill` measures
    the shipped student against the teacher through the shared step (measure/outcome.py), and a
    recipe's candidate is measured once, by the search.

    Candidates (all from the same initial weights): the student on labels alone, the student
    distilled at each (temperature, alpha) the config leaves open (a small grid) or gives, and,
    for a student 10x or more smaller than the teacher, the student distilled from a teacher
    assistant (TAKD). The best by validation accuracy ships; a tie ships the labels-only student.

    Args:
        teacher: a PyTorch (``file.py:factory`` + weights) or ONNX model producing logits.
        data: training inputs (``x``, preprocessed for both models) with labels ``y`` unless alpha is 1.
        config: student, epochs (or ``"auto"``), temperature/alpha (None: chosen), patience, budget.
        validation: held-out data for early stopping and choosing (default: ``config.val_fraction`` of ``data``).
        test: data the report's accuracies are measured on, which chose nothing (default: another
            ``val_fraction`` of ``data``).
        baseline: also train the same student without the teacher as a candidate (needs labels).
        hold_test: hold a test split out of ``data`` when ``test`` is None (the search judges on its own).

    Returns:
        a :class:`DistillResult`; ``report`` holds every candidate (validation and test accuracy,
        epochs, stop reason), which one shipped, the student's params and export check, the
        labels-only baseline and notes.

    Raises:
        BadInput: a student whose output size differs from the teacher's, an unknown architecture.
        DataError: no labels when alpha < 1 asks for the hard-label loss.

    Example:
        >>> r = distilled_model(load_model("teacher.onnx"), load_data("train.npz"), Distill(student="cnn3_w16"))  # doctest: +SKIP
        >>> r.report["chosen"], r.report["baseline"]["accuracy"]
    """
    torch = require("torch", extra="torch")
    from edgeopt.search import distill_choice as choice
    from edgeopt.training import TrainConfig, accuracy_torch, fit

    cfg = config or Distill()
    if cfg.alpha is not None and cfg.alpha < 1 and data.labels is None:
        raise DataError(f"{data.source} has no labels (y) but alpha {cfg.alpha:g} < 1 asks for the hard-label "
                        "loss; pass --alpha 1 to learn from the teacher alone")
    if cfg.feature_weight > 0 and teacher.format != "torch":
        raise BadInput("feature matching needs a PyTorch teacher (file.py:factory), not an ONNX one")
    if len(data.inputs) != 1:
        raise DataError(f"{data.source}: vision distillation takes one input array 'x'; for text use a .jsonl file")
    train, validation, test = split_for_distillation(data, cfg, validation=validation, test=test,
                                                      hold_test=hold_test or test is not None)
    input_size = tuple(next(iter(train.inputs.values())).shape[1:])

    run_teacher = teacher_function(teacher)
    classes = teacher_logits(run_teacher, train.take(slice(0, 1))).shape[1]
    for part in (train, validation, test):
        if part is not None and part.labels is not None and (part.labels.max(initial=0) >= classes or part.labels.min(initial=0) < 0):
            raise DataError(f"{part.source}: labels range {int(part.labels.min())}..{int(part.labels.max())} but "
                            f"the teacher has {classes} outputs")
    student = build_student(cfg.student, input_size=input_size, classes=classes, seed=cfg.train.seed)
    got = _output_size(torch, student, train.inputs)
    if got != classes:
        raise BadInput(f"student {cfg.student} has {got} outputs but the teacher has {classes}; build the "
                       f"student with {classes} classes")
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    t_params = _params(teacher.module) if teacher.format == "torch" else onnx_params(teacher)
    s_params = _params(student)

    labels = train.labels is not None
    settings = choice.kd_settings(cfg.temperature, cfg.alpha, labels=labels)
    assistant = None
    if cfg.assistant == "auto":
        assistant = choice.assistant_for(teacher_params=t_params, student_params=s_params, input_size=input_size,
                                         classes=classes)
    elif cfg.assistant != "none":
        assistant = cfg.assistant
    with_baseline = baseline and labels
    runs = len(settings) + int(with_baseline) + (2 if assistant else 0)
    schedule = choice.train_schedule(cfg.train.epochs, patience=cfg.train.patience, time_budget=cfg.time_budget, runs=runs)

    def train_cfg(temperature: float, alpha: float, seed: int = cfg.train.seed) -> Any:
        return TrainConfig(train=replace(cfg.train, epochs=schedule["epochs"], patience=schedule["patience"], seed=seed),
                           temperature=temperature, alpha=alpha, augment_shift=cfg.augment_shift,
                           schedule=schedule["schedule"], max_seconds=schedule["max_seconds"])

    online = cfg.augment_shift > 0 or cfg.feature_weight > 0
    soft = None if online else teacher_logits(run_teacher, train)
    notes: list[str] = []
    views = None
    if cfg.augment_shift and validation.labels is not None:
        views = teacher_on_shifted_views(run_teacher, validation, cfg.augment_shift, seed=cfg.train.seed)
        if views["shifted"] < views["plain"] - 0.05:
            notes.append(f"the teacher is {100 * views['shifted']:.1f}% accurate on images shifted by up to "
                         f"{cfg.augment_shift} px ({100 * views['plain']:.1f}% unshifted): its soft targets on the "
                         "shifted views are poor; train the teacher with the same shifts or lower --augment-shift")

    def fresh() -> Any:
        module = build_student(cfg.student, input_size=input_size, classes=classes, seed=cfg.train.seed)
        module.load_state_dict(initial)
        return module

    def distil_into(module: Any, temperature: float, alpha: float, *, run: Any, logits: Any, torch_teacher: Any,
                    description: str) -> Any:
        extra, params, hooks = None, None, []
        if cfg.feature_weight > 0:
            extra, proj_params, hooks = _feature_loss(torch, module, torch_teacher, train, cfg.feature_weight)
            params = [*module.parameters(), *proj_params]
        try:
            return fit(module, train, config=train_cfg(temperature, alpha), validation=validation,
                       teacher_logits=None if online else logits, params=params, extra_loss=extra,
                       teacher=run if online else None, progress=progress, description=description)
        finally:
            for h in hooks:
                h.remove()

    candidates: list[choice.KdCandidate] = []
    if with_baseline:
        c = choice.KdCandidate(name=choice.LABELS_ONLY, teacher="none")
        c.module = fresh()
        c.record(fit(c.module, train, config=train_cfg(1.0, 0.0), validation=validation, progress=progress,
                     description=f"{cfg.student} on labels only"))
        candidates.append(c)
    torch_teacher = teacher.module if teacher.format == "torch" else None
    for temperature, alpha in settings:
        c = choice.KdCandidate(name=choice.candidate_name(temperature, alpha), teacher="teacher",
                               temperature=temperature, alpha=alpha)
        c.module = fresh()
        c.record(distil_into(c.module, temperature, alpha, run=run_teacher, logits=soft, torch_teacher=torch_teacher,
                             description=f"distilling into {cfg.student} ({c.name})"))
        candidates.append(c)
    if assistant:
        candidates.append(_via_assistant(assistant, candidates, input_size=input_size, classes=classes, cfg=cfg,
                                         fresh=fresh, distil_into=distil_into, run_teacher=run_teacher, soft=soft,
                                         torch_teacher=torch_teacher, train=train, online=online, validation=validation,
                                         train_cfg=train_cfg))

    if test is not None and test.labels is not None:
        for c in candidates:
            c.test_accuracy = accuracy_torch(c.module, test)
    chosen = choice.pick(candidates)
    student = chosen.module
    fitted = chosen.fit
    base = next((c for c in candidates if not c.distilled), None)
    notes += choice.choice_notes(chosen, candidates, epochs=cfg.train.epochs,
                                 test_source=test.source if test is not None else "")
    leak = choice.overlap_note(test, chose={"training": train, "validation": validation})
    if leak:
        notes.append(leak)
    notes += student_notes(fitted, student_params=s_params, teacher_params=t_params)

    student_model = Model.from_torch(student.eval(), source=f"{cfg.student} ({chosen.name})",
                                     input_shape=(1, *input_size))
    from edgeopt.transforms.export import OnnxExport, to_onnx

    student_onnx, check = to_onnx(student_model, OnnxExport(atol=1e-3), data=validation)
    student_onnx = Model.from_onnx(student_onnx.onnx, source="student")
    report: dict[str, Any] = {
        "config": {"student": cfg.student, "epochs": cfg.train.epochs, "temperature": cfg.temperature, "alpha": cfg.alpha,
                   "feature_weight": cfg.feature_weight, "patience": cfg.train.patience, "seed": cfg.train.seed,
                   "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "augment_shift": cfg.augment_shift,
                   "warmup": cfg.train.warmup, "time_budget": cfg.time_budget, "assistant": cfg.assistant,
                   "train_schedule": schedule},
        "data": {"train": len(train), "validation": len(validation), "test": len(test) if test is not None else 0,
                 "test_source": test.source if test is not None else None},
        "chosen": chosen.name,
        "chosen_by": "validation accuracy (ties: labels only)",
        "candidates": [c.to_dict() for c in candidates],
        "assistant": assistant,
        "student": {"params": s_params, "epochs_run": fitted.epochs_run, "best_epoch": fitted.best_epoch,
                    "best_val_accuracy": fitted.best_val_accuracy, "stopped": fitted.stopped,
                    "distilled": chosen.distilled, "temperature": chosen.temperature, "alpha": chosen.alpha,
                    "export_check": check.to_dict()},
        "baseline": None,
        "notes": notes,
    }
    if base is not None:
        report["baseline"] = {"description": "same student, same init/epochs/seed/augmentation, trained on labels only",
                              "accuracy": base.test_accuracy, "epochs_run": base.epochs_run,
                              "best_val_accuracy": base.val_accuracy}
    if views is not None:
        report.setdefault("teacher", {})["validation_accuracy_on_views"] = views
    return DistillResult(student=student_model, student_onnx=student_onnx, report=report,
                         baseline=base.module if base is not None else None, history=fitted.history,
                         candidates=candidates, validation=validation, test=test, input_size=input_size,
                         student_module=student)


def _via_assistant(assistant: str, candidates: list[Any], *, input_size: tuple[int, ...], classes: int,
                   cfg: Distill, fresh: Any, distil_into: Any, run_teacher: Any, soft: Any, torch_teacher: Any,
                   train: Dataset, online: bool, validation: Dataset, train_cfg: Any) -> Any:
    """TAKD: distil the assistant from the teacher, then the student from the assistant, both at the
    (temperature, alpha) that did best from the teacher directly."""
    from edgeopt.search import distill_choice as choice
    from edgeopt.training import _forward

    direct = choice.pick([c for c in candidates if c.distilled])
    temperature, alpha = direct.temperature, direct.alpha
    ta = build_student(assistant, input_size=input_size, classes=classes, seed=cfg.train.seed)
    ta_fit = distil_into(ta, temperature, alpha, run=run_teacher, logits=soft, torch_teacher=torch_teacher,
                         description=f"distilling the assistant {assistant}")
    ta.eval()
    ta_params = _params(ta)

    def run_ta(batch: dict[str, Any]) -> Any:
        return _forward(ta, batch)

    ta_logits = None if online else teacher_logits(run_ta, train)
    c = choice.KdCandidate(name=choice.candidate_name(temperature, alpha, via=assistant), teacher=f"assistant {assistant}",
                           temperature=temperature, alpha=alpha)
    c.module = fresh()
    c.record(distil_into(c.module, temperature, alpha, run=run_ta, logits=ta_logits, torch_teacher=ta,
                         description=f"distilling from the assistant ({c.name})"))
    c.assistant = {"name": assistant, "params": ta_params, "val_accuracy": ta_fit.best_val_accuracy,
                        "epochs_run": ta_fit.epochs_run}
    return c


_RECIPE_MEMO: dict[str, Model] = {}  # the search applies the same distill step in several recipes (+ INT8)


def _memo_key(teacher: Model, config: Distill, *parts: Dataset | None) -> str:
    import hashlib
    import json

    from edgeopt.transforms.config import config_to_dict

    h = hashlib.sha256(teacher.sha256.encode())
    h.update(json.dumps(config_to_dict(config), sort_keys=True).encode())
    for part in parts:
        if part is not None:
            for v in (*part.inputs.values(), part.labels):
                if v is not None:
                    h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


@register_transform(Distill)
def _apply(model: Model, config: Distill, ctx: TransformContext) -> Model:
    """In a recipe: the teacher is ``ctx.teacher`` (default: the incoming model); returns the shipped
    student's ONNX, chosen by the same rule as ``edgeopt distill`` (the labels-only student is a
    candidate, so a distilled recipe never wins only by the search's luck)."""
    if ctx.train is None:
        raise BadInput("distillation needs training data")
    teacher = ctx.teacher if ctx.teacher is not None else model
    key = _memo_key(teacher, config, ctx.train, ctx.validation)
    if key not in _RECIPE_MEMO:
        result = distilled_model(teacher, ctx.train, config, validation=ctx.validation, baseline=True,
                                 progress=ctx.progress, hold_test=False)
        student = result.student_onnx.with_metadata(distill_chosen=result.report["chosen"])
        while len(_RECIPE_MEMO) >= 4:
            _RECIPE_MEMO.pop(next(iter(_RECIPE_MEMO)))
        _RECIPE_MEMO[key] = student
    return _RECIPE_MEMO[key]
