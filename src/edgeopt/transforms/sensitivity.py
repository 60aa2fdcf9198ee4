"""Per-layer quantization sensitivity: which layers cost accuracy when they are INT8.

One fragile layer can ruin an INT8 model. To find it, each weight layer (Conv, Gemm, MatMul) is
quantized *alone* (static INT8, only that node) and the model is compared with FP32 on held-out
data; then the whole model is quantized *but* that layer, which shows how much keeping it in
float would recover. Layers are ranked by what quantizing them alone costs. Calibration runs once
(ORT's calibration cache), so the cost is one quantizer pass and one evaluation per variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.errors import DataError, UnsupportedOperation
from edgeopt.measure.evaluate import accuracy_of, fidelity, predict
from edgeopt.model import Model
from edgeopt.runtimes.sessions import resolve_settings
from edgeopt.transforms.quantize import StaticInt8, check_quantizable, prepared, quantize, weight_nodes


@dataclass
class LayerSensitivity:
    """What quantizing one layer costs (``accuracy``..``drop``: only this layer INT8) and what
    keeping it float recovers (``all_but_*``: every other layer INT8). ``drop`` is in absolute
    points of accuracy (with labels) or agreement with FP32 (without)."""

    node: str
    op_type: str
    params: int
    accuracy: float | None
    agreement: float
    cosine: float
    drop: float
    all_but_accuracy: float | None = None
    all_but_agreement: float | None = None
    all_but_cosine: float | None = None
    all_but_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Scorer:
    """Scores a model's outputs on held-out data against the FP32 reference."""

    data: Dataset
    reference: np.ndarray
    base_accuracy: float | None
    threads: int

    @classmethod
    def for_model(cls, model: Model, data: Dataset, *, threads: int = 1) -> Scorer:
        ref = predict(model, data, settings=resolve_settings(model, threads=threads))
        acc = accuracy_of(ref, data.labels) if data.labels is not None else None
        return cls(data, ref, acc, threads)

    def score(self, model: Model) -> tuple[float | None, float, float, float]:
        """(accuracy, agreement, cosine, drop) of ``model``."""
        out = predict(model, self.data, settings=resolve_settings(model, threads=self.threads))
        agreement, cosine, _ = fidelity(out, self.reference)
        if self.data.labels is not None and self.base_accuracy is not None:
            acc = accuracy_of(out, self.data.labels)
            return acc, agreement, cosine, self.base_accuracy - acc
        return None, agreement, cosine, 1.0 - agreement


def split_for_analysis(data: Dataset, eval_data: Dataset | None, *, max_eval: int, seed: int
                       ) -> tuple[Dataset, Dataset]:
    """(calibration, evaluation): disjoint halves of ``data`` unless ``eval_data`` is given."""
    if eval_data is not None:
        calib, held = data, eval_data
    elif len(data) >= 20:
        calib, held = data.split(0.5, seed=seed)
    else:
        raise DataError(f"{data.source} has {len(data)} samples; analyze needs at least 20 "
                        "(half calibrate, half judge) or a separate evaluation set")
    if len(held) > max_eval:
        held = held.take(np.sort(np.random.default_rng(seed).permutation(len(held))[:max_eval]))
    return calib, held


def analyze(model: Model, data: Dataset, *, config: StaticInt8 | None = None, eval_data: Dataset | None = None,
            threads: int = 1, all_but: bool = True, max_eval: int = 256, seed: int = 0,
            on_layer: Callable[[str], None] | None = None) -> list[LayerSensitivity]:
    """Rank the weight layers of ``model`` by what static INT8 quantization of each alone costs.

    Args:
        model: an FP32 ONNX model.
        data: calibration data (and, without ``eval_data``, half of it judges).
        config: the StaticInt8 settings to test with (default ``StaticInt8()``).
        eval_data: held-out data to judge on; default: the half of ``data`` not used to calibrate.
        threads: intra-op threads for the evaluations.
        all_but: also quantize everything but each layer (doubles the time).
        max_eval: judge on at most this many samples.
        on_layer: called with each node name before it is analyzed (progress).

    Returns:
        One LayerSensitivity per Conv/Gemm/MatMul with a constant weight, most sensitive first.

    Raises:
        BadInput/DataError/UnsupportedOperation as :func:`edgeopt.quantize`.

    Example:
        >>> rows = analyze(load_model("digits_cnn.onnx"), load_data("train.npz"))  # doctest: +SKIP
        >>> rows[0].node, rows[0].drop
    """
    base_cfg = config or StaticInt8()
    check_quantizable(model)
    data.feeds_for(model)
    calib, held = split_for_analysis(data, eval_data, max_eval=max_eval, seed=seed)
    layers = weight_nodes(prepared(model))
    if not layers:
        raise UnsupportedOperation(f"{model.source} has no Conv, Gemm or MatMul with constant weights to analyze")
    scorer = Scorer.for_model(model, held, threads=threads)
    rows: list[LayerSensitivity] = []
    for name, op_type, params in layers:
        if on_layer is not None:
            on_layer(name)
        only = quantize(model, replace(base_cfg, only_nodes=(name,), exclude_nodes=()), data=calib)
        acc, agr, cos, drop = scorer.score(only)
        row = LayerSensitivity(name, op_type, params, acc, agr, cos, drop)
        if all_but:
            rest = quantize(model, replace(base_cfg, exclude_nodes=(name,), only_nodes=()), data=calib)
            row.all_but_accuracy, row.all_but_agreement, row.all_but_cosine, row.all_but_drop = scorer.score(rest)
        rows.append(row)
    return rank(rows)


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Most sensitive first: largest drop, then lowest cosine, then most recovered when kept float."""
    return sorted(rows, key=lambda r: (-r.drop, r.cosine, -(r.all_but_cosine or 0.0)))
