"""Model segmentation: cut an ONNX model across devices and run the parts as a pipeline.

``split_model`` finds the single-tensor cut positions (graph.py), times the segments between
them on this host (profile.py), picks the cuts for the devices and link (planner.py), and
writes one ONNX sub-model per stage with a ``plan.json`` (partition.py). ``run_pipeline``
(pipeline.py) runs the stages as processes connected by TCP and measures them; ``run_remote``
(remote.py) drives stages served by Open Inference Protocol v2 servers on other hosts instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.errors import BadInput, ModelError

if TYPE_CHECKING:
    from edgeopt.devices import DeviceProfile
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import Model
    from edgeopt.split.planner import Objective, Plan
    from edgeopt.split.results import PipelineResult


def split_model(model: str | os.PathLike[str] | Model, devices: list[str | DeviceProfile], *,
                out_dir: str | os.PathLike[str], link_mbps: float | None = None, link_latency_ms: float = 0.0,
                objective: Objective = "latency", cuts: list[int] | None = None, threads: int = 1,
                settings: BenchSettings | None = None) -> Plan:
    """Plan where to cut ``model`` for ``devices`` in order, and write the stages.

    Args:
        model: an ONNX model (path or Model).
        devices: device profile names or profiles, one per stage, in pipeline order.
        out_dir: where ``stage_k.onnx`` and ``plan.json`` go (created; must be writable).
        link_mbps: bandwidth between consecutive stages; default: the slowest ``link_mbps``
            of the device profiles.
        link_latency_ms: one-way link latency.
        objective: ``latency`` (one item end to end) or ``throughput`` (pipeline bottleneck).
        cuts: node positions to cut after, instead of planning (must be single-tensor cuts).
        threads: intra-op threads per stage, for profiling and for ``split run``.
        settings: harness settings for the segment timings.

    Returns:
        The plan; ``plan.json`` holds the same plus the model and profile.

    Raises:
        ModelError: not an ONNX model. DeviceError: an unknown device. BadInput: a cut that
        needs more than one tensor, a bad link or objective, an unwritable ``out_dir``.

    Example:
        >>> plan = split_model("resnet18.onnx", ["rpi4", "gateway-x86"], link_mbps=50,
        ...                    out_dir="split/")  # doctest: +SKIP
        >>> plan.cuts, plan.predicted_latency_ms
    """
    from edgeopt.devices import get_device
    from edgeopt.fileio import check_writable_dir, write_json
    from edgeopt.model import load_model
    from edgeopt.split.graph import GraphCuts
    from edgeopt.split.partition import extract, write_stage
    from edgeopt.split.planner import OBJECTIVES, Link, fixed_plan, plan_cuts
    from edgeopt.split.profile import profile_segments

    loaded = load_model(model)
    if loaded.format != "onnx":
        raise ModelError(f"edgeopt split cuts ONNX models; {loaded.source} is {loaded.format}: "
                         f"export it first with edgeopt export {loaded.source} --to onnx -o model.onnx")
    profiles = [get_device(d) for d in devices]
    if not profiles:
        raise BadInput("--devices needs at least one device profile, e.g. --devices rpi4,gateway-x86")
    if threads < 1:
        raise BadInput(f"--threads must be >= 1, got {threads}")
    if objective not in OBJECTIVES:
        raise BadInput(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    link = Link(_link_mbps(link_mbps, profiles), float(link_latency_ms))
    folder = check_writable_dir(out_dir)

    graph = GraphCuts(loaded.onnx)
    n_nodes = len(graph.nodes)
    common = {"n_nodes": n_nodes, "inputs": graph.input_names, "outputs": graph.output_names}
    if cuts is not None:
        chosen = graph.check(list(cuts))
        if len(chosen) != len(profiles) - 1:
            raise BadInput(f"{len(profiles)} devices need {len(profiles) - 1} cut(s); --cuts gave {len(chosen)}")
        profile = profile_segments(graph, chosen, threads=threads, settings=settings)
        profiles, measured = measure_remote_speeds(graph.proto, profiles, profile.details["whole_model_ms"],
                                                   threads=threads, settings=settings)
        plan = fixed_plan(profile, profiles, link, objective=objective, **common)
    else:
        candidates = graph.valid()
        if len(candidates) < len(profiles) - 1:
            raise BadInput(f"{len(profiles)} devices need {len(profiles) - 1} cut(s) but {loaded.source} has "
                           f"only {len(candidates)} single-tensor cut position(s)")
        profile = profile_segments(graph, candidates if len(profiles) > 1 else [], threads=threads,
                                   settings=settings)
        profiles, measured = measure_remote_speeds(graph.proto, profiles, profile.details["whole_model_ms"],
                                                   threads=threads, settings=settings)
        plan = plan_cuts(profile, profiles, link, objective=objective, **common)

    bounds = [None, *(graph.cuts[c] for c in plan.cuts), None]
    for k, stage in enumerate(plan.stages):
        stage.path = f"stage_{k}.onnx"
        write_stage(extract(graph, bounds[k], bounds[k + 1], name=f"stage_{k}"), folder / stage.path)
    payload: dict[str, Any] = {
        "model": {"source": loaded.source, "path": str(Path(loaded.path).resolve()) if loaded.path else None,
                  "sha256": loaded.sha256, "nodes": n_nodes},
        **plan.to_dict(),
        "cut_tensors": [graph.cuts[c].to_dict() for c in plan.cuts],
        "valid_cuts": [c.index for c in graph.valid()],
        "profile": profile.to_dict(),
    }
    if measured:
        payload["measured_speeds"] = measured
    write_json(folder / "plan.json", payload)
    return plan


def _link_mbps(value: float | None, profiles: list[DeviceProfile]) -> float:
    if value is not None:
        return float(value)
    known = [p.link_mbps for p in profiles if p.link_mbps]
    if len(profiles) > 1 and len(known) < len(profiles):
        raise BadInput("give --link-mbps: not every device profile names its link_mbps")
    return float(min(known)) if known else 1000.0


def run_split(out_dir: str | os.PathLike[str], *, stage_urls: str | None = None, **options: Any) -> PipelineResult:
    """Run a split directory as a multi-process pipeline (:func:`edgeopt.split.pipeline.run_pipeline`),
    or, given ``stage_urls``, on OIP v2 servers (:func:`edgeopt.split.remote.run_remote`)."""
    if stage_urls is not None:
        from edgeopt.split.remote import run_remote

        return run_remote(out_dir, stage_urls, **options)
    from edgeopt.split.pipeline import run_pipeline

    return run_pipeline(out_dir, **options)


__all__ = ["run_split", "split_model"]


def measure_remote_speeds(proto: Any, profiles: list[DeviceProfile], host_whole_ms: float, *, threads: int,
                          settings: BenchSettings | None = None) -> tuple[list[DeviceProfile], dict[str, Any]]:
    """A remote (SSH) device's ``relative_speed`` is measured, not assumed: the whole model is timed on
    the device with the same harness, and its speed is the host's whole-model time over the device's.

    Returns the profiles (remote ones with the measured speed) and, per remote device, what was measured.
    """
    from dataclasses import replace

    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.model import Model

    measured: dict[str, Any] = {}
    out = []
    for p in profiles:
        if p.ssh:
            if p.name not in measured:
                cfg = settings or BenchSettings(warmup=3, min_runs=30, min_seconds=0.2, max_seconds=5.0)
                r = compare([Model.from_onnx(proto, source="whole model")], settings=cfg, runtime="onnxruntime",
                            threads=threads, device=p)[0]
                measured[p.name] = {"device_whole_model_ms": r.latency_ms["p50"], "host_whole_model_ms": host_whole_ms,
                                    "relative_speed": host_whole_ms / r.latency_ms["p50"],
                                    "profile_relative_speed": p.relative_speed, "measured_on": r.measured_on}
            p = replace(p, relative_speed=measured[p.name]["relative_speed"])
        out.append(p)
    return out, measured
