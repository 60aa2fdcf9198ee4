"""Mixed precision: keep the most sensitive layers in float until the accuracy budget holds.

The result is an ordinary :class:`StaticInt8` whose ``exclude_nodes`` lists the float layers, so
the recipe replays exactly (``edgeopt apply``) without re-running this search. Layers are taken
greedily in the order :func:`edgeopt.transforms.sensitivity.analyze` ranks them, 0, 1, 2, 4, 8 ...
at a time, so a model with a hundred layers needs a handful of quantize-and-evaluate steps.

Each step is judged the way optimize and ``quantize --mode auto`` judge a candidate
(:func:`edgeopt.search.engine.evaluate_candidate`: the budget metric resolved for the output kind,
confident agreement or cosine from :func:`edgeopt.measure.judge.fidelity_of`, and the
``min_cosine`` floor), so a config found here meets the budget there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from edgeopt.data import Dataset
from edgeopt.model import Model
from edgeopt.search.budget import Budget
from edgeopt.search.engine import CandidateResult, baseline_result, evaluate_candidate
from edgeopt.transforms.quantize import StaticInt8, quantize
from edgeopt.transforms.sensitivity import LayerSensitivity


@dataclass
class MixedPrecisionResult:
    """The config found, its model, whether it meets the budget, and every step tried."""

    config: StaticInt8
    model: Model
    meets_budget: bool
    steps: list[dict[str, Any]] = field(default_factory=list)


def mixed_precision(model: Model, base: StaticInt8, *, calibration: Dataset, eval_data: Dataset, budget: Budget,
                    ranking: list[LayerSensitivity], max_float: int | None = None, threads: int = 1
                    ) -> MixedPrecisionResult:
    """Exclude the top-ranked layers from INT8 one at a time until ``budget`` holds.

    Args:
        model: the FP32 ONNX model.
        base: the StaticInt8 settings for the layers that stay INT8.
        calibration: calibration data; ``eval_data``: held-out data the budget is judged on.
        budget: the drop allowed vs the FP32 model and the cosine floor (``auto`` follows the output:
            accuracy with labels, confident agreement without, cosine for non-class outputs).
        ranking: layers, most sensitive first (from ``analyze``).
        max_float: keep at most this many layers in float (default: half of them).

    Returns:
        The first config that meets the budget, else the last one tried (``meets_budget`` False).

    Example:
        >>> r = mixed_precision(m, StaticInt8(), calibration=cal, eval_data=ev, budget=Budget(), ranking=rows)  # doctest: +SKIP
        >>> r.config.exclude_nodes
    """
    _, base_out, base_metric = baseline_result(model, eval_data, budget, threads=threads)
    limit = max_float if max_float is not None else max(1, len(ranking) // 2)
    steps: list[dict[str, Any]] = []
    cfg, out, ok = base, model, False
    for k in _float_counts(min(limit, len(ranking))):
        cfg = replace(base, exclude_nodes=tuple(r.node for r in ranking[:k]), only_nodes=())
        out = quantize(model, cfg, data=calibration)
        judged = CandidateResult(name=f"int8-mixed-{k}-float", recipe={})
        evaluate_candidate(judged, out, eval_data=eval_data, budget=budget, baseline_outputs=base_out,
                           baseline_metric=base_metric, threads=threads)
        ok = judged.meets_budget
        steps.append({"float_nodes": list(cfg.exclude_nodes), "accuracy": judged.accuracy,
                      "agreement": judged.agreement, "confident_agreement": judged.confident_agreement,
                      "cosine": judged.cosine, "drop": judged.drop, "drop_interval": judged.drop_interval,
                      "judged": judged.judged, "meets_budget": ok})
        if ok:
            break
    return MixedPrecisionResult(cfg, out, ok, steps)


def _float_counts(limit: int) -> list[int]:
    """0, 1, 2, 4, ... up to and including ``limit``."""
    counts, k = [0], 1
    while k < limit:
        counts.append(k)
        k *= 2
    if limit > 0:
        counts.append(limit)
    return counts
