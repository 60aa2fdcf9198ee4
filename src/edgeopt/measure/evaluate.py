"""Accuracy and fidelity: top-1/top-5 against labels, agreement and cosine against a reference.

Agreement (same top-1 as the reference) and cosine of the outputs tell how faithful an
optimized model is even when the data has no labels; which of them means something depends
on the output (class scores or not), see :mod:`edgeopt.measure.judge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.devices import DeviceProfile
from edgeopt.errors import DataError
from edgeopt.measure import harness
from edgeopt.measure.judge import Fidelity, fidelity_of, output_kind, token_mask
from edgeopt.model import Model
from edgeopt.runtimes.sessions import RunSettings, open_session, resolve_settings


@dataclass
class EvalResult:
    """``n`` samples; accuracy/top5 need labels; the fidelity figures need a reference.

    ``kind`` is the reference's output kind (``classes`` or ``other``, see
    :mod:`edgeopt.measure.judge`); class scores add ``confident_agreement`` (over ``n_confident``
    samples where the reference is clear) and ``kl``; other outputs add ``nn_agreement`` (and as
    expected, ``nn_expected_agreement`` +- ``nn_expected_margin``) and ``embedding_cosine`` of the
    pooled embeddings.
    """

    n: int
    accuracy: float | None
    top5: float | None
    agreement: float | None = None
    cosine: float | None = None
    min_cosine: float | None = None
    cosine_p5: float | None = None
    kind: str | None = None
    confident_agreement: float | None = None
    n_confident: int | None = None
    kl: float | None = None
    nn_agreement: float | None = None
    nn_tie_agreement: float | None = None
    nn_confident_agreement: float | None = None
    n_nn_confident: int | None = None
    nn_expected_agreement: float | None = None
    nn_expected_margin: float | None = None
    embedding_cosine: float | None = None
    outputs: np.ndarray | None = field(default=None, repr=False)
    measured_on: dict[str, Any] = field(default_factory=dict, repr=False)  # device name, CPU, runtime version

    def to_dict(self) -> dict[str, Any]:
        out = {"n": self.n, "accuracy": self.accuracy, "top5": self.top5,
               "agreement": self.agreement, "cosine": self.cosine, "min_cosine": self.min_cosine}
        if self.kind is not None:
            out.update(cosine_p5=self.cosine_p5, output_kind=self.kind)
            extra = (("confident_agreement", "n_confident", "kl") if self.kind == "classes"
                     else ("nn_agreement", "nn_tie_agreement", "nn_confident_agreement", "n_nn_confident",
                           "nn_expected_agreement", "nn_expected_margin", "embedding_cosine"))
            out.update({k: getattr(self, k) for k in extra})
        return out


def predict(model: Model, data: Dataset, *, settings: RunSettings | None = None,
            batch_size: int = 64, session: Any = None) -> np.ndarray:
    """The model's first output for every sample, stacked (N, ...); on the device when ``settings``
    name a remote one.

    ``session``: one already opened for ``model`` (callers that predict batch after batch, such
    as an ONNX teacher during distillation, open it once).
    """
    fitted = data.feeds_for(model)
    rs = settings or resolve_settings(model)
    fixed = [s.shape[0] for s in model.inputs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0]
    step = fixed[0] if fixed else batch_size
    if session is None and rs.remote is not None:
        from edgeopt.runtimes.remote import remote_device

        return remote_device(rs.remote).predict(model, fitted.inputs, step=step, fixed=bool(fixed), settings=rs)
    if session is None:
        session = open_session(model, rs)
    return harness.predict_arrays(session.run, fitted.inputs, step=step, fixed=bool(fixed))


def accuracy_of(outputs: np.ndarray, labels: np.ndarray, *, k: int = 1) -> float:
    logits = outputs.reshape(len(outputs), -1)
    if k == 1:
        return float(np.mean(np.argmax(logits, axis=1) == labels))
    # the k highest scores in any order: a partition, not a sort (linear in the outputs, so wide
    # outputs such as token states cost no more to judge than the rest of the figures)
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(agreement, mean cosine, min cosine) of ``outputs`` against ``reference`` outputs.

    The plain figures, whatever the output; :func:`edgeopt.measure.judge.fidelity_of` judges by kind.
    """
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    if a.shape != b.shape:
        raise DataError(f"outputs have shape {a.shape[1:]} but the reference's are {b.shape[1:]}; "
                        "compare models with the same outputs")
    agreement = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(denom > 0, np.sum(a * b, axis=1) / np.maximum(denom, 1e-30), 1.0)
    return agreement, float(np.mean(cos)), float(np.min(cos))


def figures_of(outputs: np.ndarray, data: Dataset, *, fid: Fidelity | None = None,
               check_labels: bool = True) -> EvalResult:
    """The figures of ``outputs`` on ``data``: accuracy and top-5 against its labels (checked to fit
    the outputs) and, with ``fid`` (their fidelity to a reference's outputs), every fidelity figure.

    The one place these figures are gathered: ``evaluate`` and the search engine's judging
    (``search/engine.py``, which every command's measure-and-report step uses) both call it.
    ``check_labels=False``: no DataError for labels the outputs cannot have (the search engine's
    lenient judging, whose callers check first where it matters).
    """
    accuracy = top5 = None
    if data.labels is not None:
        n_classes = int(np.prod(outputs.shape[1:]))
        if check_labels and (data.labels.max(initial=0) >= n_classes or data.labels.min(initial=0) < 0):
            raise DataError(f"{data.source}: labels range {int(data.labels.min())}..{int(data.labels.max())} but the "
                            f"model has {n_classes} outputs")
        accuracy = accuracy_of(outputs, data.labels)
        top5 = accuracy_of(outputs, data.labels, k=5) if n_classes > 5 else None
    result = EvalResult(n=len(data), accuracy=accuracy, top5=top5)
    if fid is not None:
        result.agreement, result.cosine, result.min_cosine = fid.agreement, fid.cosine, fid.min_cosine
        result.cosine_p5, result.kind = fid.cosine_p5, fid.kind
        result.confident_agreement, result.n_confident, result.kl = fid.confident_agreement, fid.n_confident, fid.kl
        result.nn_agreement, result.embedding_cosine = fid.nn_agreement, fid.embedding_cosine
        result.nn_confident_agreement, result.n_nn_confident = fid.nn_confident_agreement, fid.n_nn_confident
        result.nn_tie_agreement = fid.nn_tie_agreement
        result.nn_expected_agreement, result.nn_expected_margin = fid.nn_expected_agreement, fid.nn_expected_margin
    return result


def evaluate(model: Model, data: Dataset, *, reference: Model | np.ndarray | None = None,
             runtime: str | None = None, threads: int | None = None,
             device: str | DeviceProfile | None = None, settings: RunSettings | None = None,
             keep_outputs: bool = False) -> EvalResult:
    """Accuracy (with labels) and fidelity (with a reference model or its outputs) on ``data``.

    Example:
        >>> r = evaluate(int8, data, reference=fp32)  # doctest: +SKIP
        >>> r.accuracy, r.agreement
    """
    if len(data) == 0:
        raise DataError(f"{data.source} is empty")
    rs = settings or resolve_settings(model, runtime=runtime, threads=threads, device=device)
    outputs = predict(model, data, settings=rs)
    fid = None
    if reference is not None:
        ref_out = reference if isinstance(reference, np.ndarray) else predict(
            reference, data, settings=resolve_settings(reference, device=rs.remote) if rs.remote else None)
        name = model.outputs[0].name if model.outputs else None
        fid = fidelity_of(outputs, ref_out, kind=output_kind(ref_out, name=name),
                          mask=token_mask(ref_out, data.feeds_for(model).inputs))
    result = figures_of(outputs, data, fid=fid)
    if keep_outputs:
        result.outputs = outputs
    if rs.remote is not None:
        from edgeopt.runtimes.remote import remote_device

        result.measured_on = remote_device(rs.remote).measured_on(rs.runtime)
    else:
        from edgeopt.measure.bench import measured_here

        result.measured_on = measured_here(rs.runtime, device)
    return result
