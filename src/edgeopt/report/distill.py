"""The ``distill`` command's result: the technique (transforms/distill.py) and the shipped student
measured against the teacher through the shared step (measure/outcome.py).

The technique trains the candidates, picks one on validation and exports it; this adds what a
user judges it by on the test data that chose nothing: the teacher's and the student's accuracy,
top-1 agreement, MACs, sizes, and batch-1 latency timed interleaved (the speed-up), and what the
teacher gained over the same student trained on labels alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.model import Model
from edgeopt.transforms.distill import Distill, DistillResult, distilled_model

if TYPE_CHECKING:
    from edgeopt.text_data import TextExamples, WordVocab
    from edgeopt.transforms.distill_text import DistillText, TextDistillResult


def distill(teacher: Model, data: Dataset, config: Distill | None = None, *, validation: Dataset | None = None,
            test: Dataset | None = None, baseline: bool = True, device: Any = None, threads: int | None = None,
            bench_seconds: float = 2.0, progress: bool = True) -> DistillResult:
    """Distill ``teacher`` into ``config.student`` on ``data`` and measure what was gained.

    Candidates (all from the same initial weights): the student on labels alone, the student
    distilled at each (temperature, alpha) the config leaves open (a small grid) or gives, and,
    for a student 10x or more smaller than the teacher, the student distilled from a teacher
    assistant (TAKD). The best by validation accuracy ships; a tie ships the labels-only student
    (:func:`edgeopt.transforms.distill.distilled_model`).

    Args:
        teacher: a PyTorch (``file.py:factory`` + weights) or ONNX model producing logits.
        data: training inputs (``x``, preprocessed for both models) with labels ``y`` unless alpha is 1.
        config: student, training settings (epochs may be ``"auto"``), temperature/alpha (None: chosen), budget.
        validation: held-out data for early stopping and choosing (default: ``config.val_fraction`` of ``data``).
        test: data the report's accuracies are measured on, which chose nothing (default: another
            ``val_fraction`` of ``data``).
        baseline: also train the same student without the teacher as a candidate (needs labels).
        device, threads: where latency is measured (teacher and student interleaved).

    Returns:
        a :class:`DistillResult`; ``report`` holds every candidate (validation and test accuracy,
        epochs, stop reason), which one shipped, teacher vs student params, MACs, size, latency
        (with the speed-up ratio) and accuracy, the labels-only baseline and notes.

    Raises:
        BadInput: a student whose output size differs from the teacher's, an unknown architecture.
        DataError: no labels when alpha < 1 asks for the hard-label loss.

    Example:
        >>> r = distill(load_model("teacher.onnx"), load_data("train.npz"), Distill(student="squeezenet1_1"))  # doctest: +SKIP
        >>> r.report["chosen"], r.report["student"]["accuracy"], r.report["baseline"]["accuracy"]
    """
    from edgeopt.search import distill_choice as choice

    result = distilled_model(teacher, data, config, validation=validation, test=test, baseline=baseline,
                             progress=progress, hold_test=True)
    if result.test is None:
        return result
    report = result.report
    _measure(report, teacher, result, device=device, threads=threads, bench_seconds=bench_seconds)
    base = next((c for c in result.candidates if not c.distilled), None)
    s_acc = report["student"]["accuracy"]
    if base is not None and base.test_accuracy is not None and s_acc is not None:
        report["distillation_gain_pt"] = round(100 * (s_acc - base.test_accuracy), 3)
        distilled = [c for c in result.candidates if c.distilled]
        best_distilled = choice.pick(distilled) if len(result.candidates) > 1 else None
        if best_distilled is not None and best_distilled.test_accuracy is not None:
            report["best_distilled_gain_pt"] = round(100 * (best_distilled.test_accuracy - base.test_accuracy), 3)
    return result


def _bench(seconds: float) -> Any:
    """How long teacher and student are timed: at least ``seconds`` each, interleaved."""
    from edgeopt.measure.bench import BenchSettings

    return BenchSettings(warmup=10, min_runs=50, min_seconds=seconds, max_seconds=max(10.0, 5 * seconds))


def _measure(report: dict[str, Any], teacher: Model, result: DistillResult, *, device: Any, threads: int | None,
             bench_seconds: float) -> None:
    """Teacher vs shipped student on the test data, and their latency interleaved (fills ``report``)."""
    from edgeopt.measure.complexity import count_macs_params
    from edgeopt.measure.outcome import measure_outcome
    from edgeopt.transforms.distill import onnx_params
    from edgeopt.transforms.export import OnnxExport, to_onnx

    input_size = result.input_size
    if teacher.format == "torch":
        teacher_onnx, _ = to_onnx(Model.from_torch(teacher.module.eval(), source=teacher.source,
                                                   input_shape=(1, *input_size)), OnnxExport(atol=1e-3),
                                  data=result.validation)
        teacher_onnx = Model.from_onnx(teacher_onnx.onnx, source="teacher")
        t_macs, t_params = count_macs_params(teacher.module, np.zeros((1, *input_size), np.float32))
    else:
        teacher_onnx = Model.from_onnx(teacher.onnx, source="teacher")
        t_macs, t_params = None, onnx_params(teacher)
    student_onnx = result.student_onnx
    s_macs, s_params = count_macs_params(result.student_module, np.zeros((1, *input_size), np.float32))
    outcome = measure_outcome(teacher_onnx, student_onnx, data=result.test, device=device, threads=threads,
                              name="student", bench=_bench(bench_seconds))
    t, s = outcome.before, outcome.after
    report["teacher"] = {"source": teacher.source, "format": teacher.format, "params": t_params, "macs": t_macs,
                         "onnx_bytes": teacher_onnx.size_bytes, "latency_ms": t.latency_ms,
                         "accuracy": t.accuracy, **report.get("teacher", {})}
    report["student"].update({"params": s_params, "macs": s_macs, "onnx_bytes": student_onnx.size_bytes,
                              "latency_ms": s.latency_ms, "accuracy": s.accuracy, "agreement": s.agreement})
    report["ratios"] = {"params": t_params / s_params, "macs": (t_macs / s_macs) if t_macs else None,
                        "size": teacher_onnx.size_bytes / student_onnx.size_bytes,
                        "speedup_p50": t.latency_ms["p50"] / s.latency_ms["p50"]}
    report["latency"] = {"runtime": t.runtime, "threads": t.threads, "batch": 1, "interleaved": True}
    if s.accuracy is not None and t.accuracy is not None:
        report["accuracy_drop_pt"] = round(100 * (t.accuracy - s.accuracy), 3)


def distill_text(teacher: Any, examples: TextExamples, config: DistillText | None = None, *,
                 vocab: WordVocab | None = None, test: TextExamples | None = None, baseline: bool = True,
                 device: Any = None, threads: int | None = None, bench_seconds: float = 2.0,
                 progress: bool = True) -> TextDistillResult:
    """Distill a BERT-family classifier into its every-other-layer student and measure both.

    Args:
        teacher: a ``transformers`` sequence classifier (e.g. ``BertForSequenceClassification``).
        examples: training texts with labels (labels optional when ``alpha`` is 1).
        config: training settings, temperature, alpha, hidden-state weight, max_len.
        vocab: the teacher's word vocabulary (default: built from ``examples``).
        test: texts the report's accuracies use (default: the held-out validation split).
        baseline: also train the same initialised student on labels alone.
        device, threads: where latency is measured (teacher and student interleaved, on the test texts).

    Returns:
        a :class:`TextDistillResult` with the student, its verified ONNX export and the report
        (layers, params, size, interleaved batch-1 latency, accuracy, the baseline).

    Raises:
        DataError: no labels with alpha < 1; labels outside the teacher's classes.
        ModelError: a teacher that is not a BERT-style encoder classifier.

    Example:
        >>> r = distill_text(teacher, load_jsonl("train.jsonl"), DistillText(train=TrainSettings(epochs=3)))  # doctest: +SKIP
    """
    from edgeopt.measure.outcome import measure_outcome
    from edgeopt.transforms.distill_text import distilled_text_model

    result = distilled_text_model(teacher, examples, config, vocab=vocab, test=test, baseline=baseline,
                                  progress=progress)
    report = result.report
    outcome = measure_outcome(result.teacher_onnx, result.student_onnx, data=result.test_data,
                              timing_data=result.test_data, device=device, threads=threads, name="student",
                              bench=_bench(bench_seconds))
    t, s = outcome.before, outcome.after
    report["teacher"].update({"latency_ms": t.latency_ms, "accuracy": t.accuracy})
    report["student"].update({"latency_ms": s.latency_ms, "accuracy": s.accuracy, "agreement": s.agreement})
    report["ratios"]["speedup_p50"] = t.latency_ms["p50"] / s.latency_ms["p50"]
    report["latency"] = {"runtime": t.runtime, "threads": t.threads, "batch": 1, "interleaved": True}
    base_acc = (report["baseline"] or {}).get("accuracy")
    if base_acc is not None and s.accuracy is not None:
        report["distillation_gain_pt"] = round(100 * (s.accuracy - base_acc), 3)
    if t.accuracy and s.accuracy is not None:
        report["accuracy_retained"] = s.accuracy / t.accuracy
    return result
