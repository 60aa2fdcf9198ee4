"""Per-segment latency on this host, measured with the one harness (measure.compare).

The graph is cut at every candidate position into small segments; all segments, an
``Identity`` model and the whole model are timed interleaved in one run, one call each per round
(``round_seconds=0``): segments then run in graph order, as in the real model, so no segment
finds its weights hot in cache from having just run itself (that made a first version of this
profile ~2-3x optimistic for MobileNetV2). The Identity's time is the per-call cost
of a session (binding inputs and outputs), so a stage made of segments ``a..b`` costs
``sum(segment - call) + call``: the call cost is paid once per stage, not once per segment.
Timings are host timings at ``threads`` intra-op threads; the planner scales them by each
device profile's ``relative_speed``.

Segment times do not always add up to the whole model's: for ResNet18 the sum was within 3% of
the whole model, for MobileNetV2 (many small depthwise layers) 33% below it, and pipeline
stages ran at the whole model's pace, not the segments'. So by default segment bodies are
scaled by ``(whole - call) / (sum - call)``, measured in the same interleaved run; ``scale``
and ``details`` (whole model, raw segment sum) go into plan.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeopt.measure.bench import BenchSettings, compare
from edgeopt.model import Model
from edgeopt.split.graph import CutPoint, GraphCuts
from edgeopt.split.partition import extract


@dataclass
class SegmentProfile:
    """Host timings: ``segment_ms[j]`` is the part between boundary j and j+1 (cuts in order)."""

    cuts: list[CutPoint]
    segment_ms: list[float]
    call_ms: float
    threads: int
    runtime: str = "onnxruntime"
    details: dict[str, Any] = field(default_factory=dict)

    scale: float = 1.0

    def stage_host_ms(self, first: int, last: int) -> float:
        """Host time of the stage made of segments ``first..last`` (inclusive)."""
        body = sum(max(0.0, self.segment_ms[j] - self.call_ms) for j in range(first, last + 1))
        return body * self.scale + self.call_ms

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "runtime": self.runtime, "call_ms": self.call_ms, "scale": self.scale,
                "segments": [{"after_cut": None if j == 0 else self.cuts[j - 1].index,
                              "to_cut": self.cuts[j].index if j < len(self.cuts) else None,
                              "host_ms": ms} for j, ms in enumerate(self.segment_ms)],
                **self.details}


def profile_segments(cuts: GraphCuts, positions: list[CutPoint], *, threads: int = 1,
                     settings: BenchSettings | None = None, calibrate: bool = True) -> SegmentProfile:
    """Time the segments between consecutive ``positions`` interleaved, at ``threads`` threads.

    Args:
        cuts: the analysed graph.
        positions: valid cuts in increasing order; ``len(positions) + 1`` segments are timed.
        threads: intra-op threads per segment (a pipeline stage runs with the same number).
        settings: harness settings; default: short (>= 30 runs and 0.05 s per segment).
        calibrate: scale segment times so they add up to the whole model's measured time.

    Returns:
        The segment timings and the per-call cost.

    Example:
        >>> prof = profile_segments(cuts, cuts.valid(), threads=1)  # doctest: +SKIP
        >>> sum(prof.segment_ms)
    """
    bounds: list[CutPoint | None] = [None, *positions, None]
    models = [Model.from_onnx(extract(cuts, bounds[j], bounds[j + 1], name=f"segment_{j}"),
                              source=f"segment_{j}") for j in range(len(bounds) - 1)]
    n = len(models)
    models += [_identity_model(), Model.from_onnx(cuts.proto, source="whole model")]
    cfg = settings or BenchSettings(warmup=3, min_runs=30, min_seconds=0.05, max_seconds=5.0, round_seconds=0.0)
    results = compare(models, settings=cfg, runtime="onnxruntime", threads=threads)
    segment_ms = [r.latency_ms["p50"] for r in results[:n]]
    call = results[n].latency_ms["p50"]
    whole = results[n + 1].latency_ms["p50"]
    profile = SegmentProfile(cuts=list(positions), segment_ms=segment_ms, call_ms=call, threads=threads)
    parts = profile.stage_host_ms(0, n - 1)
    if calibrate and parts > call:
        profile.scale = max(0.0, whole - call) / (parts - call)
    profile.details = {"whole_model_ms": whole, "segments_sum_ms": parts,
                       "runs_per_segment_min": min(r.runs for r in results)}
    return profile


def _identity_model() -> Model:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "call_cost",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, onnx.IR_VERSION)
    return Model.from_onnx(proto, source="call cost (Identity)")
