"""How far the judge can be trusted: the 90 % interval of a drop, and when two figures are a tie.

A budget of 1 point judged on 32 samples is decided by one sample (3 points). The drop a search
reports is an estimate from n held-out samples; its interval says how much of it is sampling
noise, so reports give both, warn when the interval is wider than the budget, and the choice
treats candidates whose accuracy differs by less than the judge can tell apart as equal (the
smaller, then faster, one wins: one sample in 2,000 must not pick a 3x larger model).
"""

from __future__ import annotations

import math

import numpy as np

Z90 = 1.645  # two-sided 90 %


def wilson(k: int, n: int, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (sensible at 0 and n, unlike the normal one)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def drop_interval(metric: str, outputs: np.ndarray, reference: np.ndarray, *, labels: np.ndarray | None = None,
                  confident: np.ndarray | None = None, cosines: np.ndarray | None = None
                  ) -> tuple[float, float, int]:
    """(low, high, n judged) of the drop a candidate shows on ``metric`` against the reference.

    - ``accuracy``: the paired difference of per-sample correctness (the original's minus the
      candidate's); normal interval with the McNemar variance, Wilson on the discordant share
      when no sample differs.
    - ``agreement``: the share of disagreeing samples (counted where ``confident`` is True, when
      given), Wilson interval.
    - ``cosine``: the mean of 1 - per-sample cosine (``cosines``), normal interval.

    Example:
        >>> ref = np.eye(4)[[0, 1, 2, 3] * 25]
        >>> low, high, n = drop_interval("agreement", ref, ref)
        >>> (low, n), round(high, 3)
        ((0.0, 100), 0.026)
    """
    a = outputs.reshape(len(outputs), -1)
    b = reference.reshape(len(reference), -1)
    if metric == "accuracy" and labels is not None:
        d = (np.argmax(b, axis=1) == labels).astype(float) - (np.argmax(a, axis=1) == labels).astype(float)
        n = len(d)
        discordant = int(np.count_nonzero(d))
        if discordant == 0:
            return 0.0 - wilson(0, n)[1], wilson(0, n)[1], n
        mean, var = float(d.mean()), float(discordant / n - d.mean() ** 2)
        half = Z90 * math.sqrt(max(var, 0.0) / n)
        return mean - half, mean + half, n
    if metric == "cosine" and cosines is not None:
        d = 1.0 - np.asarray(cosines, dtype=float)
        n = len(d)
        half = Z90 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
        return float(d.mean()) - half, float(d.mean()) + half, n
    differ = np.argmax(a, axis=1) != np.argmax(b, axis=1)
    if confident is not None:
        differ = differ[confident]
    low, high = wilson(int(differ.sum()), len(differ))
    return low, high, len(differ)


def tell_apart(quality: float, n: int, z: float = Z90) -> float:
    """The smallest difference in a proportion near ``quality`` that ``n`` samples can tell apart
    (90 %): ``z * sqrt(2 q (1 - q) / n)``, at least one sample (``1 / n``).

    Example:
        >>> round(tell_apart(0.991, 2000), 4)  # the MNIST case: 99.10 % vs 99.05 % is one sample
        0.0049
    """
    if n <= 0:
        return 0.0
    q = min(max(quality, 0.0), 1.0)
    return max(z * math.sqrt(2 * q * (1 - q) / n), 1.0 / n)
