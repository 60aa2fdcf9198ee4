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

import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.devices import DeviceProfile
from edgeopt.errors import BadInput, DataError
from edgeopt.measure.sessions import RunSettings, open_session, resolve_settings
from edgeopt.model import Model


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "format": self.format, "runtime": self.runtime,
            "threads": self.threads, "batch": self.batch, "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms, "throughput_ips": self.throughput_ips,
            "peak_rss_mb": self.peak_rss_mb, "model_memory_mb": self.model_memory_mb,
            "runs": self.runs, "runtime_options": self.options, "runtime_details": self.runtime_details,
        }


def _rss_mb(field_name: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux), so peak RSS is this model's, not the process's past."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


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
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif dynamic_dim is not None:
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


@dataclass
class _Entry:
    model: Model
    settings: RunSettings
    session: Any
    feeds: dict[str, np.ndarray]
    batch: int
    peak_mb: float
    model_mb: float
    times: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)


def compare(models: list[Model], *, settings: BenchSettings | None = None, batch: int = 1,
            data: Dataset | None = None, runtime: str | None = None, threads: int | None = None,
            device: str | DeviceProfile | None = None,
            run_settings: list[RunSettings] | None = None) -> list[BenchResult]:
    """Time several models interleaved in one process; results are in the order given.

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
    entries: list[_Entry] = []
    for i, model in enumerate(models):
        rs = run_settings[i] if run_settings is not None else resolve_settings(
            model, runtime=runtime, threads=threads, device=device)
        feeds = example_feeds(model, batch=batch, data=data, dynamic_dim=cfg.dynamic_dim)
        gc.collect()
        base_mb = _rss_mb("VmRSS")
        exact = _reset_peak_rss()
        session = open_session(model, rs)
        for _ in range(max(1, cfg.warmup)):
            session.run(feeds)
        peak = _rss_mb("VmHWM") if exact else _rss_mb("VmRSS")
        entries.append(_Entry(model, rs, session, feeds, batch, peak_mb=peak, model_mb=max(0.0, peak - base_mb)))

    start = time.perf_counter()
    while True:
        for entry in entries:
            round_start = time.perf_counter()
            first = len(entry.times)
            while True:
                t0 = time.perf_counter()
                entry.session.run(entry.feeds)
                entry.times.append(time.perf_counter() - t0)
                if time.perf_counter() - round_start >= cfg.round_seconds:
                    break
            entry.rounds.append(float(np.median(entry.times[first:])) * 1000.0)
        elapsed = time.perf_counter() - start
        done = all(len(e.times) >= cfg.min_runs for e in entries) and elapsed >= cfg.min_seconds * len(entries)
        if done or elapsed >= cfg.max_seconds * len(entries):
            break

    results = []
    for entry in entries:
        ms = np.array(entry.times) * 1000.0
        mean = float(ms.mean())
        results.append(BenchResult(
            model=entry.model.source, format=entry.model.format, runtime=entry.settings.runtime,
            threads=entry.settings.threads, batch=entry.batch, size_bytes=entry.model.size_bytes,
            latency_ms={"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                        "p99": float(np.percentile(ms, 99)), "mean": mean},
            throughput_ips=entry.batch * 1000.0 / mean if mean > 0 else float("inf"),
            peak_rss_mb=round(entry.peak_mb, 1), model_memory_mb=round(entry.model_mb, 1),
            runs=len(entry.times), options=dict(entry.settings.options), times_ms=ms.tolist(),
            round_p50_ms=list(entry.rounds),
            runtime_details=dict(getattr(entry.session, "details", None) or {})))
    return results


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
