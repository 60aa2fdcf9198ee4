"""What a pipeline run measured, and what the plan predicted for it.

Shared by the local socket pipeline (:mod:`edgeopt.split.pipeline`) and stages on OIP v2 servers
(:mod:`edgeopt.split.remote`), so both report the same figures the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.errors import BadInput, ModelError

if TYPE_CHECKING:
    from edgeopt.model import Model


@dataclass
class PipelineResult:
    """Measured end-to-end latency per item (one in flight), throughput (streamed), fidelity."""

    stages: int
    devices: list[str]
    items: int
    latency_ms: dict[str, float]
    throughput_ips: float
    max_abs_diff: float | None
    predicted_latency_ms: float
    predicted_throughput_ips: float
    simulate_link: bool
    simulate_devices: bool
    link: dict[str, float]
    threads: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    in_flight: int | None = None
    remote: list[dict[str, Any]] | None = None

    @property
    def latency_error(self) -> float:
        """(predicted - measured) / measured for the median item (the profile's statistic too)."""
        return (self.predicted_latency_ms - self.latency_ms["p50"]) / self.latency_ms["p50"]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "devices": self.devices, "items": self.items,
                "latency_ms": self.latency_ms, "throughput_ips": self.throughput_ips,
                "max_abs_diff": self.max_abs_diff, "predicted_latency_ms": self.predicted_latency_ms,
                "predicted_throughput_ips": self.predicted_throughput_ips,
                "latency_prediction_error": self.latency_error, "simulate_link": self.simulate_link,
                "simulate_devices": self.simulate_devices, "link": self.link, "threads": self.threads,
                **({"in_flight": self.in_flight, "remote": self.remote} if self.remote is not None else {})}


def feeds_for_items(first: Model, data: Dataset | None, items: int) -> list[dict[str, np.ndarray]]:
    """``items`` batch-1 feeds for the first stage: rows of ``data`` (cycled), else random inputs."""
    from edgeopt.measure.bench import example_feeds

    if data is None:
        return [example_feeds(first, batch=1, seed=i) for i in range(items)]
    fitted = data.feeds_for(first)
    if len(fitted) == 0:
        raise BadInput(f"{data.source} is empty")
    return [{k: np.ascontiguousarray(v[i % len(fitted): i % len(fitted) + 1]) for k, v in fitted.inputs.items()}
            for i in range(items)]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """p50, p90, mean and min of per-item times in ms."""
    ms = np.array(latencies_ms)
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "mean": float(ms.mean()), "min": float(ms.min())}


def max_abs_diff_vs_whole(plan: dict[str, Any], folder: Path, reference: str | Path | None,
                          inputs: list[dict[str, np.ndarray]],
                          runs: list[dict[int, dict[str, np.ndarray]]]) -> float | None:
    """Largest |pipeline - whole model| over every item of every run; inf on a missing or misshapen output."""
    from edgeopt.model import load_model
    from edgeopt.runtimes.sessions import open_session, resolve_settings

    source = reference if reference is not None else plan.get("model", {}).get("path")
    if source is None or not Path(source).is_file():
        return None
    whole = load_model(source)
    if whole.format != "onnx":
        raise ModelError(f"reference {source} must be the ONNX model that was split")
    session = open_session(whole, resolve_settings(whole, runtime="onnxruntime", threads=1))
    worst = 0.0
    for i, feeds in enumerate(inputs):
        expected = dict(zip(session.output_names, session.run(feeds), strict=True))
        for run in runs:
            for name, value in run[i].items():
                if name not in expected or expected[name].shape != value.shape:
                    return float("inf")
                worst = max(worst, float(np.max(np.abs(expected[name].astype(np.float64) - value))))
    return worst


def _run_ms(stage: dict[str, Any], simulate_devices: bool) -> float:
    """What a stage's compute should take in this run: host time, slowed to the device when simulated."""
    speed = float(stage.get("relative_speed", 1.0))
    return float(stage["host_ms"]) * (1.0 / speed if simulate_devices and speed < 1.0 else 1.0)


def predicted_latency(plan: dict[str, Any], simulate_link: bool, simulate_devices: bool) -> float:
    total = 0.0
    for stage in plan["stages"]:
        total += _run_ms(stage, simulate_devices)
        if simulate_link:
            total += stage["transfer_ms"]
    return total


def predicted_throughput(plan: dict[str, Any], simulate_link: bool, simulate_devices: bool) -> float:
    worst = 0.0
    for stage in plan["stages"]:
        worst = max(worst, _run_ms(stage, simulate_devices))
        if simulate_link:
            worst = max(worst, stage["wire_ms"])
    return 1000.0 / worst if worst > 0 else float("inf")
