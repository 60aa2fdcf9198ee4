"""The one latency harness: warm-up, timed runs, percentiles; several models interleaved.

Timings from two separate runs on a shared machine are not comparable, so :func:`compare`
loads every model first and then times them in rounds (A, B, A, B, ...): whatever the machine
is doing affects all candidates alike, and the ratios are what a user can trust.

Each round's median is kept too: round i of two models ran moments apart, so the per-round
ratios are paired samples of the speed-up, and :func:`speedup_interval` turns them into a
confidence interval. A search that only asks "is the p50 ratio above 1.03?" lets a candidate
through that is 1.07x faster by luck on a loaded machine; the interval's lower bound does not.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.devices import DeviceProfile
from edgeopt.errors import BadInput, DataError
from edgeopt.measure import harness
from edgeopt.model import Model
from edgeopt.runtimes.sessions import RunSettings, open_session, resolve_settings


@dataclass(frozen=True)
class BenchSettings:
    """How long to time: at least ``min_runs`` runs and ``min_seconds`` per model, at most ``max_seconds``.

    ``dynamic_dim``: without data, the size given to dynamic non-batch dimensions (e.g. a
    transformer's sequence length) of the random inputs; None refuses such models (pass data).
    """

    warmup: int = 10
    min_runs: int = 100
    min_seconds: float = 2.0
    max_seconds: float = 60.0
    round_seconds: float = 0.05
    dynamic_dim: int | None = None

    def __post_init__(self) -> None:
        if self.min_runs < 1:
            raise BadInput(f"--runs must be >= 1, got {self.min_runs}")
        if self.warmup < 0 or self.min_seconds < 0 or self.max_seconds <= 0:
            raise BadInput("warm-up and durations must be non-negative")


@dataclass
class BenchResult:
    """Latency of one model in ms (p50/p90/p99/mean), throughput, memory and size."""

    model: str
    format: str
    runtime: str
    threads: int
    batch: int
    size_bytes: int
    latency_ms: dict[str, float]
    throughput_ips: float
    peak_rss_mb: float
    model_memory_mb: float
    runs: int
    options: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list, repr=False)
    round_p50_ms: list[float] = field(default_factory=list, repr=False)  # one median per interleaved round
    runtime_details: dict[str, Any] = field(default_factory=dict)  # what the runtime compiled, e.g. precision
    measured_on: dict[str, Any] = field(default_factory=dict)  # device name, CPU, runtime version

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "format": self.format, "runtime": self.runtime,
            "threads": self.threads, "batch": self.batch, "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms, "throughput_ips": self.throughput_ips,
            "peak_rss_mb": self.peak_rss_mb, "model_memory_mb": self.model_memory_mb,
            "runs": self.runs, "runtime_options": self.options, "runtime_details": self.runtime_details,
            "measured_on": self.measured_on,
        }


def _check_fits_memory(model: Model, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A batch of inputs bigger than half the machine's memory is a typo (--batch 65536 of images)."""
    from edgeopt.data import memory_bytes

    limit = memory_bytes()
    need = math.prod(shape) * max(dtype.itemsize, 8)  # standard_normal draws float64 first
    if limit is not None and need > limit // 2:
        raise BadInput(f"{model.source}: a batch of input '{name}' shaped {'x'.join(map(str, shape))} needs "
                       f"{need / 2**30:.1f} GB, more than half this machine's {limit / 2**30:.1f} GB; use a "
                       "smaller --batch")


def example_feeds(model: Model, *, batch: int = 1, data: Dataset | None = None,
                  seed: int = 0, dynamic_dim: int | None = None) -> dict[str, np.ndarray]:
    """Inputs for timing: the first ``batch`` samples of ``data``, else random data of the input's shape
    (dynamic non-batch dimensions set to ``dynamic_dim`` when given; integer inputs such as token ids
    and masks get 1s, a valid id and a full mask)."""
    if batch < 1:
        raise BadInput(f"--batch must be >= 1, got {batch}")
    for spec in model.inputs:
        first = spec.shape[0] if spec.shape else None
        if isinstance(first, int) and first > 0 and first != batch:
            raise BadInput(f"model input '{spec.name}' has a fixed batch size of {first}; use --batch {first}")
    if data is not None:
        fitted = data.feeds_for(model)
        if len(fitted) == 0:
            raise DataError(f"{data.source} is empty")
        idx = np.arange(batch) % len(fitted)
        return {k: np.ascontiguousarray(v[idx]) for k, v in fitted.inputs.items()}
    if not model.inputs:
        raise BadInput(f"{model.source}: input shape unknown; pass --data (or define INPUT_SHAPE in the factory file)")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = spec.fixed_shape(batch)
        if shape is None and dynamic_dim is not None and spec.shape:
            shape = tuple(batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) and d > 0
                          else dynamic_dim) for i, d in enumerate(spec.shape))
        if shape is None:
            raise BadInput(f"input '{spec.name}' has dynamic dimensions {list(spec.shape)}; pass --data "
                           "so edgeopt knows the real shape")
        dtype = np.dtype(spec.dtype)
        _check_fits_memory(model, spec.name, shape, dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif dynamic_dim is not None:
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def compare(models: list[Model], *, settings: BenchSettings | None = None, batch: int = 1,
            data: Dataset | None = None, runtime: str | None = None, threads: int | None = None,
            device: str | DeviceProfile | None = None,
            run_settings: list[RunSettings] | None = None) -> list[BenchResult]:
    """Time several models interleaved in one process; results are in the order given.

    With a remote device profile (``edgeopt devices add NAME --ssh ...``) the same harness
    (measure/harness.py) runs on the device over SSH and the figures are the device's.

    Args:
        models: the models to time; the first is usually the baseline.
        settings: warm-up and duration (defaults: 10 warm-up, >= 100 runs and >= 2 s each).
        batch: samples per run.
        data: real inputs (the first ``batch`` samples); random inputs of the model's shape otherwise.
        runtime, threads, device: as for ``edgeopt bench``; each model's stored metadata otherwise.
        run_settings: per-model runtime settings, overriding runtime/threads/device.

    Example:
        >>> base, q = compare([fp32, int8])  # doctest: +SKIP
        >>> base.latency_ms["p50"] / q.latency_ms["p50"]  # speed-up
    """
    cfg = settings or BenchSettings()
    if run_settings is not None and len(run_settings) != len(models):
        raise BadInput("run_settings must have one entry per model")
    all_settings = run_settings if run_settings is not None else [
        resolve_settings(m, runtime=runtime, threads=threads, device=device) for m in models]
    feeds = [example_feeds(m, batch=batch, data=data, dynamic_dim=cfg.dynamic_dim) for m in models]
    targets = {rs.remote.name if rs.remote else None for rs in all_settings}
    if len(targets) > 1:
        raise BadInput("models timed together must run on one device; time each device separately")
    remote = all_settings[0].remote if all_settings else None
    if remote is not None:
        from edgeopt.runtimes.remote import remote_device

        measured = remote_device(remote).bench(models, feeds, all_settings, cfg)
        where = measured["measured_on"]
        raw = measured["results"]
    else:
        where = measured_here(all_settings[0].runtime if all_settings else "onnxruntime", device)
        raw = _time_here(models, feeds, all_settings, cfg)
    results = []
    for model, rs, entry in zip(models, all_settings, raw, strict=True):
        ms = np.asarray(entry["times_ms"], dtype=float)
        mean = float(ms.mean())
        results.append(BenchResult(
            model=model.source, format=model.format, runtime=rs.runtime,
            threads=int(entry.get("threads") or rs.threads), batch=batch, size_bytes=model.size_bytes,
            latency_ms={"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                        "p99": float(np.percentile(ms, 99)), "mean": mean},
            throughput_ips=batch * 1000.0 / mean if mean > 0 else float("inf"),
            peak_rss_mb=round(entry["peak_rss_mb"], 1), model_memory_mb=round(entry["model_memory_mb"], 1),
            runs=len(ms), options=dict(rs.options), times_ms=ms.tolist(),
            round_p50_ms=list(entry["round_p50_ms"]), runtime_details=dict(entry.get("details") or {}),
            measured_on=dict(where)))
    return results


def _time_here(models: list[Model], feeds: list[dict[str, np.ndarray]], all_settings: list[RunSettings],
               cfg: BenchSettings) -> list[dict[str, Any]]:
    """Load and warm every model on this host, then time them interleaved (harness.interleaved)."""
    loaded = []
    for model, rs, f in zip(models, all_settings, feeds, strict=True):
        session, peak, model_mb = harness.open_warm(lambda m=model, r=rs: open_session(m, r),
                                                    lambda s, f=f: s.run(f), cfg.warmup)
        loaded.append((session, f, peak, model_mb))
    times, rounds = harness.interleaved([lambda s=s, f=f: s.run(f) for s, f, _, _ in loaded],
                                        min_runs=cfg.min_runs, min_seconds=cfg.min_seconds,
                                        max_seconds=cfg.max_seconds, round_seconds=cfg.round_seconds)
    return [{"times_ms": [t * 1000.0 for t in own], "round_p50_ms": med, "peak_rss_mb": peak,
             "model_memory_mb": model_mb, "details": dict(getattr(session, "details", None) or {})}
            for own, med, (session, _, peak, model_mb) in zip(times, rounds, loaded, strict=True)]


def measured_here(runtime: str, device: str | DeviceProfile | None = None) -> dict[str, Any]:
    """Where a host figure was measured: profile name, CPU, usable cores and the runtime's version."""
    from edgeopt.devices import get_device

    return where_from_info(get_device(device).name, _host_info(), runtime, remote=False)


@functools.lru_cache(maxsize=1)
def _host_info() -> dict[str, Any]:
    return harness.device_info()


def where_from_info(name: str, info: dict[str, Any], runtime: str, *, remote: bool) -> dict[str, Any]:
    rt = (info.get("runtimes") or {}).get(runtime) or {}
    return {"device": name, "remote": remote, "hostname": info.get("hostname"), "cpu": info.get("cpu"),
            "machine": info.get("machine"), "usable_cores": info.get("usable_cores"), "isa": info.get("isa"),
            "runtime": runtime, "runtime_version": rt.get("version"), "python": info.get("python")}


def speedup_interval(baseline: BenchResult, candidate: BenchResult, *, confidence: float = 0.9,
                     resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """A ``confidence`` bootstrap interval of the median per-round speed-up (baseline / candidate).

    Returns None with fewer than 5 paired rounds (too few to say anything beyond the p50 ratio).
    """
    n = min(len(baseline.round_p50_ms), len(candidate.round_p50_ms))
    if n < 5:
        return None
    ratios = np.asarray(baseline.round_p50_ms[:n]) / np.asarray(candidate.round_p50_ms[:n])
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, n, size=(resamples, n))], axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def benchmark(model: Model, *, settings: BenchSettings | None = None, batch: int = 1,
              data: Dataset | None = None, runtime: str | None = None, threads: int | None = None,
              device: str | DeviceProfile | None = None) -> BenchResult:
    """Time one model: see :func:`compare`."""
    return compare([model], settings=settings, batch=batch, data=data, runtime=runtime,
                   threads=threads, device=device)[0]


def cpu_count() -> int:
    return os.cpu_count() or 1
