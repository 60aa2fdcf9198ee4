"""Structured pruning to a measured latency target: time a few candidates, keep the least pruned that meets it.

Exporting and timing every step of a 40-step schedule would take minutes, so the search times a
few points of that grid (``ratio * k / 40``) and brackets the target. Each candidate is pruned in
one shot from a copy of the original, not by stepping one model forward: a step cannot be taken
back, and latency is not smooth in channel counts (counts that suit the runtime's kernels can run
faster than fewer channels that do not; see docs/prune.md), so a forward-only search that jumps
past the target removes channels for nothing. Without fine-tuning between steps, one shot gives
the same channel counts as many small steps and mostly the same channels (at 40 %, the first
layer keeps 37 of the same 38 on the digits CNN, 32 of 38 on ResNet18).

The original is timed first (if it meets the target, nothing is pruned). The first guess assumes
latency proportional to MACs and MACs to the square of the channels kept (both sides of most
layers shrink); after that the guess is interpolated between the most pruned candidate that missed
and the least pruned that met, kept inside the middle half of that bracket so that it shrinks
even where latency is not a line. The search ends when the two are neighbours on the grid, or after
``max_timings`` candidates with the least pruned one that met; when nothing has met by then, the
model at the ``ratio`` limit is timed last, and the target is out of reach if it misses too.

A candidate's latency is its p50 scaled by ``original_ms / the original's p50 in the same run``,
``original_ms`` being the original's p50 in the first timing. On a shared machine, absolute times
drift by tens of percent between runs seconds apart, while the ratio of two models timed
interleaved hardly moves; scaling puts every candidate on one baseline, so a burst of load during
one timing cannot make the search keep a model that is too slow or prune more than needed. On a
quiet device the factor is close to 1 and the figure is the plain p50 that ``edgeopt bench`` reports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeopt.model import Model

GRID = 40


@dataclass(frozen=True)
class LatencyTiming:
    """How candidates are timed: as ``edgeopt bench`` with these runtime/threads/device and settings.

    ``original`` is the original's verified ONNX export (exported by the search when None);
    ``max_timings`` caps the candidates timed (plus the model at the ratio limit if none met).
    """

    original: Model | None = None
    runtime: str | None = None
    threads: int | None = None
    device: Any = None
    settings: Any = None
    max_timings: int = 6


class LatencySearch:
    """Find the least pruned model on the grid that meets ``target_ms``; keep every timing for the report.

    ``prune(module, ratio)`` removes that fraction of channels from ``module`` in place;
    ``count(module)`` gives its MACs. The module given is never changed.

    Example:
        >>> search = LatencySearch(module, example, target_ms=5.0, timing=LatencyTiming(),
        ...                        prune=one_shot, count=macs)  # doctest: +SKIP
        >>> ratio = search.run(ratio=0.5)  # 0.0: the original already meets the target
        >>> search.report()["met"]
    """

    def __init__(self, module: Any, example: Any, *, target_ms: float, timing: LatencyTiming,
                 prune: Callable[[Any, float], Any], count: Callable[[Any], int]) -> None:
        self.module = module
        self.target_ms = target_ms
        self.timing = timing
        self.prune = prune
        self.count = count
        self.input_shape = tuple(example.shape)
        self.original = timing.original
        self.original_ms = 0.0
        self.chosen: dict[str, Any] = {}
        self.timings: list[dict[str, Any]] = []
        self.settings: dict[str, Any] = {}

    def run(self, *, ratio: float) -> float:
        """The least pruned ratio on the grid ``ratio * k / 40`` that meets the target (or ``ratio``)."""
        if self.original is None:
            self.original = self._export(self.module)
        (result,) = self._compare([self.original])
        self.original_ms = result.latency_ms["p50"]
        self.settings = {"runtime": result.runtime, "threads": result.threads}
        latency = {0: self._record(0.0, self.count(self.module), self.original_ms, self.original_ms)}
        if latency[0]["met"]:
            self.chosen = latency[0]
            return 0.0
        lo, hi = 0, None
        while hi is None or hi - lo > 1:
            if sum(t["timed"] for t in self.timings) > self.timing.max_timings:
                if hi is not None or lo == GRID:
                    break
                k = GRID  # the last chance: the model at the ratio limit
            else:
                k = self._next(lo, hi, latency, ratio)
            latency[k] = self._candidate(ratio * k / GRID)
            if latency[k]["met"]:
                hi = k
            else:
                lo = k
                if k == GRID:
                    break
        k = hi if hi is not None else GRID
        self.chosen = latency[k]
        return ratio * k / GRID

    def report(self) -> dict[str, Any]:
        """Target, met, reached and original latency (ms), the ratio chosen, and every timing in order."""
        return {"target_ms": self.target_ms, "met": self.chosen["met"], "reached_ms": self.chosen["latency_ms"],
                "original_ms": self.original_ms, "ratio": self.chosen["ratio"], **self.settings, "batch": 1,
                "interleaved": True,
                "judged_on": "p50 x original_ms / the original's p50 in the same interleaved run",
                "timings": self.timings}

    def _next(self, lo: int, hi: int | None, latency: dict[int, dict[str, Any]], ratio: float) -> int:
        slow = latency[lo]["latency_ms"]
        if hi is None:
            kept = (1 - ratio * lo / GRID) * math.sqrt(self.target_ms / slow)
            return min(max(round((1 - kept) / ratio * GRID), lo + 1), GRID)
        fast = latency[hi]["latency_ms"]
        k = (lo + hi) / 2
        if slow > fast:
            k = lo + (slow - self.target_ms) / (slow - fast) * (hi - lo)
        margin = max(1, (hi - lo) // 4)
        return int(min(max(round(k), lo + margin), hi - margin))

    def _candidate(self, ratio: float) -> dict[str, Any]:
        module = copy.deepcopy(self.module)
        self.prune(module, ratio)
        macs = self.count(module)
        same = next((t for t in self.timings if t["macs"] == macs), None)
        if same is not None:  # round_to can map neighbouring ratios to one architecture: not timed again
            entry = {**same, "ratio": round(ratio, 6), "timed": False}
            self.timings.append(entry)
            return entry
        original, candidate = self._compare([self.original, self._export(module)])
        p50, base = candidate.latency_ms["p50"], original.latency_ms["p50"]
        return self._record(ratio, macs, p50, base)

    def _record(self, ratio: float, macs: int, p50: float, base: float) -> dict[str, Any]:
        latency = p50 * self.original_ms / base if base > 0 else p50
        entry = {"ratio": round(ratio, 6), "macs": macs, "p50_ms": p50, "original_p50_ms": base,
                 "latency_ms": latency, "met": latency <= self.target_ms, "timed": True}
        self.timings.append(entry)
        return entry

    def _compare(self, models: list[Model]) -> list[Any]:
        from edgeopt.measure.bench import compare

        t = self.timing
        return compare(models, settings=t.settings, batch=1, runtime=t.runtime, threads=t.threads, device=t.device)

    def _export(self, module: Any) -> Model:
        from edgeopt.transforms.export import to_onnx

        model = Model.from_torch(module, source="structured-pruning candidate", input_shape=self.input_shape)
        return to_onnx(model)[0]
