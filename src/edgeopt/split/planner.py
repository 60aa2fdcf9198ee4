"""Choose the cuts: dynamic programming over valid cut positions for K devices in order.

Stage k runs on device k; its compute time is the host time of its segments divided by the
device's ``relative_speed``. Between stages a link of ``mbps`` carries the cut tensor:
``bytes * 8 / (mbps * 1e6)`` seconds on the wire plus ``latency_ms`` of propagation.

- ``latency``: minimise the time of one item end to end, ``sum(compute) + sum(transfer)``.
- ``throughput``: minimise the pipeline's bottleneck, ``max(compute_k, wire_k)`` (propagation
  delay does not limit a pipeline), with end-to-end latency as the tie-break.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgeopt.devices import DeviceProfile
from edgeopt.errors import BadInput
from edgeopt.split.graph import CutPoint
from edgeopt.split.profile import SegmentProfile

Objective = Literal["latency", "throughput"]
OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class Link:
    """A network link between consecutive stages: bandwidth in Mbit/s and one-way latency in ms."""

    mbps: float
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.mbps, int | float) and math.isfinite(self.mbps) and self.mbps > 0):
            raise BadInput(f"--link-mbps must be a positive number, got {self.mbps!r}")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise BadInput(f"--link-latency-ms must be >= 0, got {self.latency_ms!r}")

    def wire_ms(self, nbytes: int) -> float:
        """Time the link is busy sending ``nbytes``."""
        return nbytes * 8 / (self.mbps * 1e6) * 1000.0

    def transfer_ms(self, nbytes: int) -> float:
        """Time from the first byte sent to the last byte received."""
        return self.wire_ms(nbytes) + self.latency_ms


@dataclass
class StagePlan:
    """One stage: its device, node range, tensors in and out, predicted times in ms."""

    index: int
    device: str
    relative_speed: float
    first_node: int
    last_node: int
    inputs: list[str]
    outputs: list[str]
    host_ms: float
    compute_ms: float
    out_bytes: int
    transfer_ms: float
    wire_ms: float
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """The chosen split with its predictions (what ``plan.json`` holds)."""

    objective: str
    devices: list[str]
    link: Link
    cuts: list[int]
    stages: list[StagePlan]
    predicted_latency_ms: float
    predicted_throughput_ips: float
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "devices": self.devices,
                "link": {"mbps": self.link.mbps, "latency_ms": self.link.latency_ms},
                "cuts": self.cuts, "threads": self.threads,
                "predicted_latency_ms": self.predicted_latency_ms,
                "predicted_throughput_ips": self.predicted_throughput_ips,
                "stages": [s.to_dict() for s in self.stages]}


def plan_cuts(profile: SegmentProfile, devices: list[DeviceProfile], link: Link, *,
              objective: Objective = "latency", n_nodes: int, inputs: list[str],
              outputs: list[str]) -> Plan:
    """Pick ``len(devices) - 1`` cuts among ``profile.cuts`` for the objective.

    Args:
        profile: host timings of the segments between the candidate cuts.
        devices: one device profile per stage, in pipeline order.
        link: the link between consecutive stages.
        objective: ``latency`` or ``throughput``.
        n_nodes: nodes in the whole graph (the last stage ends at ``n_nodes - 1``).
        inputs, outputs: the whole graph's input and output names.

    Returns:
        The plan with per-stage predictions.

    Raises:
        BadInput: unknown objective, or fewer candidate cuts than needed.

    Example:
        >>> plan = plan_cuts(prof, [get_device("rpi4"), get_device("gateway-x86")], Link(100),
        ...                  n_nodes=49, inputs=["input"], outputs=["logits"])  # doctest: +SKIP
    """
    if objective not in OBJECTIVES:
        raise BadInput(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    k_stages = len(devices)
    m = len(profile.cuts)
    if k_stages < 1:
        raise BadInput("give at least one device")
    if m < k_stages - 1:
        raise BadInput(f"{k_stages} devices need {k_stages - 1} cut(s) but the graph has only {m} valid "
                       "single-tensor cut(s)")
    speeds = [d.relative_speed for d in devices]

    def stage_ms(u: int, v: int, k: int) -> float:  # boundaries u < v; segments u..v-1
        return profile.stage_host_ms(u, v - 1) / speeds[k]

    def out_bytes(v: int) -> int:
        return int(profile.cuts[v - 1].bytes or 0)

    # best[k][v]: (score, latency, back-pointer) for stages 0..k ending at boundary v (1..m+1)
    inf = (math.inf, math.inf)
    best: list[dict[int, tuple[tuple[float, float], int]]] = [{} for _ in range(k_stages)]
    last = m + 1
    for k in range(k_stages):
        ends = [last] if k == k_stages - 1 else range(k + 1, m + 1)
        for v in ends:
            choice: tuple[tuple[float, float], int] = (inf, -1)
            starts = [0] if k == 0 else range(k, v)
            for u in starts:
                prev = (0.0, 0.0) if k == 0 else best[k - 1].get(u, (inf, -1))[0]
                if prev[1] == math.inf:
                    continue
                comp = stage_ms(u, v, k)
                send = link.transfer_ms(out_bytes(v)) if v != last else 0.0
                wire = link.wire_ms(out_bytes(v)) if v != last else 0.0
                latency = prev[1] + comp + send
                score = latency if objective == "latency" else max(prev[0], comp, wire)
                key = (score, latency)
                if key < choice[0]:
                    choice = (key, u)
            best[k][v] = choice
    if best[k_stages - 1][last][1] < 0:
        raise BadInput("no feasible split for these devices")
    bounds = [last]
    for k in range(k_stages - 1, 0, -1):
        bounds.append(best[k][bounds[-1]][1])
    bounds.append(0)
    bounds.reverse()
    return _build_plan(profile, devices, link, objective, bounds, n_nodes=n_nodes, inputs=inputs,
                       outputs=outputs)


def fixed_plan(profile: SegmentProfile, devices: list[DeviceProfile], link: Link, *, objective: Objective,
               n_nodes: int, inputs: list[str], outputs: list[str]) -> Plan:
    """The plan for exactly the cuts in ``profile.cuts`` (manual ``--cuts``)."""
    if len(profile.cuts) != len(devices) - 1:
        raise BadInput(f"{len(devices)} devices need {len(devices) - 1} cut(s); --cuts gave {len(profile.cuts)}")
    bounds = list(range(len(profile.cuts) + 2))
    return _build_plan(profile, devices, link, objective, bounds, n_nodes=n_nodes, inputs=inputs,
                       outputs=outputs)


def _build_plan(profile: SegmentProfile, devices: list[DeviceProfile], link: Link, objective: str,
                bounds: list[int], *, n_nodes: int, inputs: list[str], outputs: list[str]) -> Plan:
    stages = []
    last = len(profile.cuts) + 1
    for k, (u, v) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        start: CutPoint | None = profile.cuts[u - 1] if u > 0 else None
        end: CutPoint | None = profile.cuts[v - 1] if v < last else None
        host = profile.stage_host_ms(u, v - 1)
        nbytes = int(end.bytes or 0) if end is not None else 0
        stages.append(StagePlan(
            index=k, device=devices[k].name, relative_speed=devices[k].relative_speed,
            first_node=start.index + 1 if start else 0, last_node=end.index if end else n_nodes - 1,
            inputs=list(start.tensors) if start else list(inputs),
            outputs=list(end.tensors) if end else list(outputs),
            host_ms=host, compute_ms=host / devices[k].relative_speed, out_bytes=nbytes,
            transfer_ms=link.transfer_ms(nbytes) if end is not None else 0.0,
            wire_ms=link.wire_ms(nbytes) if end is not None else 0.0))
    latency = sum(s.compute_ms + s.transfer_ms for s in stages)
    bottleneck = max(max(s.compute_ms, s.wire_ms) for s in stages)
    return Plan(objective=objective, devices=[d.name for d in devices], link=link,
                cuts=[s.last_node for s in stages[:-1]], stages=stages, predicted_latency_ms=latency,
                predicted_throughput_ips=1000.0 / bottleneck if bottleneck > 0 else math.inf,
                threads=profile.threads)
