"""The accuracy budget: how much of a metric a candidate may lose, in absolute points, and the
cosine floor no candidate may fall below whatever the metric."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from edgeopt.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

Metric = Literal["auto", "accuracy", "agreement", "cosine", "neighbours"]
METRICS: tuple[str, ...] = ("auto", "accuracy", "agreement", "cosine", "neighbours")
Objective = Literal["latency", "size", "memory"]
OBJECTIVES: tuple[str, ...] = ("latency", "size", "memory")
DEFAULT_MIN_COSINE = 0.99


@dataclass(frozen=True)
class Budget:
    """``max_drop`` in absolute points of ``metric`` (0.01 = 1 point); ``min_cosine`` a floor.

    ``metric="auto"`` (the default) follows the output (see :mod:`edgeopt.measure.judge`): class
    scores are judged by accuracy with labels, else by agreement where the original is confident;
    a text encoder's token states or embeddings (the data has an attention mask) by the
    nearest-neighbour agreement of the pooled sentence embeddings (``neighbours``: what a retrieval
    user sees: 0.01 = one query in a hundred may get another nearest sentence; a change to one the
    original rates within 0.01 cosine of its own nearest is a near-tie and counts as kept); other
    embeddings, hidden states and heads by the cosine of the outputs to the original's.
    Whatever the metric, a candidate whose mean cosine to the original is below ``min_cosine`` is
    never chosen: a model can keep every top-1 and still have lost its outputs.

    Example:
        >>> Budget(metric="accuracy", max_drop=0.01).allows(0.990, 0.982)
        True
        >>> Budget().allows(1.0, 1.0, cosine=0.6)
        False
    """

    metric: Metric = "auto"
    max_drop: float = 0.01
    min_cosine: float = DEFAULT_MIN_COSINE

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0.0 <= self.max_drop < 1.0:
            raise ConfigError(f"--max-drop must be in [0, 1) (0.01 = 1 point), got {self.max_drop}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")

    def drop(self, baseline: float, candidate: float) -> float:
        return baseline - candidate

    def allows(self, baseline: float, candidate: float, *, cosine: float | None = None) -> bool:
        if cosine is not None and not self.cosine_ok(cosine):
            return False
        return self.drop(baseline, candidate) <= self.max_drop + 1e-12

    def cosine_ok(self, cosine: float) -> bool:
        return cosine >= self.min_cosine - 1e-12

    def for_outputs(self, outputs: np.ndarray, labels: np.ndarray | None, *, name: str | None = None,
                    masked: bool = False) -> Budget:
        """This budget with ``auto`` resolved for the reference's ``outputs`` (and an accuracy budget
        without labels turned into agreement, or cosine for non-class outputs).

        ``masked``: the data has an attention mask that fits the outputs (a text encoder), so pooled
        sentence embeddings and their nearest neighbours can be computed; ``auto`` then judges
        ``neighbours``. ``neighbours`` asked on outputs without 3 samples falls back to cosine.
        """
        from edgeopt.measure.judge import output_kind

        kind = output_kind(outputs, name=name)
        metric = self.metric
        text = kind == "other" and masked and len(outputs) >= 3
        if metric == "auto":
            metric = ("neighbours" if text else "cosine") if kind == "other" else \
                ("accuracy" if labels is not None else "agreement")
        elif metric == "accuracy" and labels is None:
            metric = "cosine" if kind == "other" else "agreement"
        elif metric == "neighbours" and (kind != "other" or len(outputs) < 3):
            metric = "cosine" if kind == "other" else ("accuracy" if labels is not None else "agreement")
        return replace(self, metric=metric)

    def describe(self) -> str:
        return f"{self.metric} drop <= {100 * self.max_drop:.2f} pt, mean cosine >= {self.min_cosine:g}"


def judge_note(asked: str, budget: Budget, outputs: np.ndarray, labelled: bool) -> str:
    """One sentence for reports: what the budget judges and why."""
    from edgeopt.measure.judge import CONFIDENT_MARGIN, NN_MARGIN

    floor = f"; no variant with mean cosine to the original below {budget.min_cosine:g} is chosen"
    if budget.metric == "neighbours":
        why = "a text encoder: the data has an attention mask" if asked == "auto" else "as asked"
        return ("judged by nearest-neighbour agreement of the mask-mean-pooled sentence embeddings (" + why +
                "; what retrieval sees); a sentence's nearest neighbour may change only to one the original rates "
                f"within {NN_MARGIN:g} cosine of its own nearest (a near-tie: it flips under any change){floor}")
    if budget.metric == "cosine":
        why = ("the output is not class scores (shape " + "x".join(map(str, outputs.shape[1:])) + "): top-1 "
               "agreement means nothing there" if asked == "auto" else "as asked")
        return f"judged by mean cosine to the original ({why}){floor}"
    if budget.metric == "agreement":
        why = "no labels" if not labelled else "as asked"
        return (f"judged by top-1 agreement with the original ({why}), counted where the original's top-1 "
                f"probability beats its runner-up by >= {CONFIDENT_MARGIN:g}{floor}")
    return f"judged by accuracy against the labels{floor}"


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective
