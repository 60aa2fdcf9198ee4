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
# The default floor never asks for more than this (an exact float copy of the model reaches it).
AGREEMENT_FLOOR_CAP = 0.999


def default_floor(metric: str, max_drop: float) -> float:
    """The cosine floor when the user names none: 0.99, and ``1 - max_drop / 2`` (at most 0.999)
    when the budget is top-1 agreement.

    Agreement is counted only where the original's decision is clear, so it cannot see the
    near-ties that most samples of a many-class model are (on EfficientNet-Lite1's ImageNet scores
    every INT8 variant kept 100 % of the clear crops while 10 % of all crops changed top-1). There
    the floor carries the budget: a user who allows 1 pt gets outputs within 0.995 cosine, one who
    allows 3 pt the plain 0.99. Accuracy (with labels), cosine and neighbours see every sample and
    keep 0.99.

    Example:
        >>> default_floor("agreement", 0.01), default_floor("agreement", 0.05), default_floor("accuracy", 0.01)
        (0.995, 0.99, 0.99)
    """
    if metric == "agreement":
        return round(min(AGREEMENT_FLOOR_CAP, max(DEFAULT_MIN_COSINE, 1.0 - max_drop / 2)), 6)
    return DEFAULT_MIN_COSINE


@dataclass(frozen=True)
class Budget:
    """``max_drop`` in absolute points of ``metric`` (0.01 = 1 point); ``min_cosine`` a floor
    (None: :func:`default_floor` of the metric judged, see :attr:`floor`).

    ``metric="auto"`` (the default) follows the output (see :mod:`edgeopt.measure.judge`): class
    scores are judged by accuracy with labels, else by agreement where the original is confident;
    a text encoder's token states or embeddings (the data has an attention mask) by the
    nearest-neighbour agreement of the pooled sentence embeddings (``neighbours``: what a retrieval
    user sees: 0.01 = one query in a hundred may get another nearest sentence; a change to one the
    original rates within 0.01 cosine of its own nearest is a near-tie and counts as kept); other
    embeddings, hidden states and heads by the cosine of the outputs to the original's.
    Whatever the metric, a candidate whose mean cosine to the original is below ``min_cosine`` is
    never chosen: a model can keep every top-1 and still have lost its outputs. Judged by
    ``neighbours``, a candidate whose plain nearest-neighbour agreement, as expected (near-ties
    included: :func:`edgeopt.measure.judge.nn_expected_agreement`), is below :attr:`nn_floor`
    (``1 - 2 max_drop``) by more than its 90 % interval over the judged samples is never chosen
    either: near-ties may flip, but they may cost at most as much again as the budget. The interval
    is the judge's noise: which sentences of a set have near-ties moves the expectation by up to
    1 pt between sets of 145 (all-MiniLM-L6-v2), and a floor decided inside that noise would turn
    one set's choice into FP32 and the next set's into INT8. Between variants as fast and as small,
    though, the one whose expectation itself reaches the floor is chosen (``engine.choose``).

    Example:
        >>> Budget(metric="accuracy", max_drop=0.01).allows(0.990, 0.982)
        True
        >>> Budget().allows(1.0, 1.0, cosine=0.6)
        False
    """

    metric: Metric = "auto"
    max_drop: float = 0.01
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0.0 <= self.max_drop < 1.0:
            raise ConfigError(f"--max-drop must be in [0, 1) (0.01 = 1 point), got {self.max_drop}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")

    @property
    def floor(self) -> float:
        """The cosine floor in force: ``min_cosine`` as given, else the metric's default."""
        return self.min_cosine if self.min_cosine is not None else default_floor(self.metric, self.max_drop)

    @property
    def nn_floor(self) -> float | None:
        """The floor on expected plain nearest-neighbour agreement (``neighbours`` budgets only)."""
        return round(max(0.0, 1.0 - 2 * self.max_drop), 6) if self.metric == "neighbours" else None

    def drop(self, baseline: float, candidate: float) -> float:
        return baseline - candidate

    def allows(self, baseline: float, candidate: float, *, cosine: float | None = None,
               nn_expected: float | None = None, nn_margin: float = 0.0) -> bool:
        if cosine is not None and not self.cosine_ok(cosine):
            return False
        if nn_expected is not None and not self.neighbours_ok(nn_expected, nn_margin):
            return False
        return self.drop(baseline, candidate) <= self.max_drop + 1e-12

    def neighbours_ok(self, nn_expected: float, margin: float = 0.0) -> bool:
        """Expected plain NN agreement not shown below :attr:`nn_floor` (``margin``: its 90 % half-width)."""
        return self.nn_floor is None or nn_expected + margin >= self.nn_floor - 1e-12

    def cosine_ok(self, cosine: float) -> bool:
        return cosine >= self.floor - 1e-12

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
        nn = f", expected plain NN agreement >= {100 * self.nn_floor:g} %" if self.nn_floor is not None else ""
        return f"{self.metric} drop <= {100 * self.max_drop:.2f} pt, mean cosine >= {self.floor:g}{nn}"


def judge_note(asked: str, budget: Budget, outputs: np.ndarray, labelled: bool) -> str:
    """One sentence for reports: what the budget judges and why."""
    from edgeopt.measure.judge import CONFIDENT_MARGIN, NN_MARGIN

    floor = f"; no variant with mean cosine to the original below {budget.floor:g} is chosen"
    if budget.min_cosine is None and budget.floor != DEFAULT_MIN_COSINE:
        floor += (f" (1 - half the {100 * budget.max_drop:g} pt budget: agreement cannot see near-ties; "
                  "--min-cosine sets another)")
    if budget.metric == "neighbours":
        why = "a text encoder: the data has an attention mask" if asked == "auto" else "as asked"
        return ("judged by nearest-neighbour agreement of the mask-mean-pooled sentence embeddings (" + why +
                "; what retrieval sees); a sentence's nearest neighbour may change only to one the original rates "
                f"within {NN_MARGIN:g} cosine of its own nearest (a near-tie: it flips under any change), and the "
                f"plain agreement, as expected over changes of each variant's size, may fall at most twice the "
                f"budget (>= {100 * (budget.nn_floor or 0):g} % within its 90 % interval; of variants as fast and as "
                "small, one whose expectation itself reaches it is preferred){floor}")
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
