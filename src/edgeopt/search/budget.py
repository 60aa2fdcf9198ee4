"""The accuracy budget: how much of a metric a candidate may lose, in absolute points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeopt.errors import ConfigError

Metric = Literal["accuracy", "agreement", "cosine"]
Objective = Literal["latency", "size", "memory"]
OBJECTIVES: tuple[str, ...] = ("latency", "size", "memory")


@dataclass(frozen=True)
class Budget:
    """``max_drop`` in absolute points of ``metric`` (0.01 = 1 point).

    ``agreement`` (same top-1 as the original) and ``cosine`` (mean cosine similarity of the
    outputs to the original's) need no labels; cosine suits models whose top-1 is not
    meaningful, e.g. random-weight benchmark networks with near-tied classes.

    Example:
        >>> Budget(metric="accuracy", max_drop=0.01).allows(0.990, 0.982)
        True
    """

    metric: Metric = "accuracy"
    max_drop: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "agreement", "cosine"):
            raise ConfigError(f"budget metric must be accuracy, agreement or cosine, got {self.metric!r}")
        if not 0.0 <= self.max_drop < 1.0:
            raise ConfigError(f"--max-drop must be in [0, 1) (0.01 = 1 point), got {self.max_drop}")

    def drop(self, baseline: float, candidate: float) -> float:
        return baseline - candidate

    def allows(self, baseline: float, candidate: float) -> bool:
        return self.drop(baseline, candidate) <= self.max_drop + 1e-12


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return objective
