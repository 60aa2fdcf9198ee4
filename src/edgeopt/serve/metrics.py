"""Prometheus metrics for the server, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from edgeopt.deps import require

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class ServeMetrics:
    """Requests by model and status, request latency, request decode time, batch sizes run, and queue
    depth per model. Decode time (body to input arrays, on the event loop) is Triton's "compute input"
    figure: what a JSON body costs beyond a binary one, read by the server itself."""

    def __init__(self) -> None:
        prom = require("prometheus_client", extra="serve")
        self._counters: dict[tuple[str, int], Any] = {}
        self._latencies: dict[str, Any] = {}
        self._decodes: dict[str, Any] = {}
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("edgeopt_requests", "Inference requests by model and HTTP status.",
                                     ["model", "code"], registry=self.registry)
        self.latency = prom.Histogram("edgeopt_request_latency_seconds",
                                      "Time from receiving an inference request to its response.",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode = prom.Histogram("edgeopt_request_decode_seconds",
                                     "Time to parse and check an inference request's body into input arrays.",
                                     ["model"], buckets=DECODE_BUCKETS, registry=self.registry)
        self.batch_size = prom.Histogram("edgeopt_batch_size", "Samples per runtime call (after merging).",
                                         ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = prom.Gauge("edgeopt_queue_depth", "Requests waiting for the model's batcher.",
                                      ["model"], registry=self.registry)

    def observe_request(self, model: str, code: int, seconds: float, decode_seconds: float | None = None) -> None:
        counter = self._counters.get((model, code))
        if counter is None:  # label lookups cost more than the increment: keep the children
            counter = self._counters[(model, code)] = self.requests.labels(model=model, code=str(code))
        counter.inc()
        if code == 200:
            histogram = self._latencies.get(model)
            if histogram is None:
                histogram = self._latencies[model] = self.latency.labels(model=model)
            histogram.observe(seconds)
            if decode_seconds is not None:
                decode = self._decodes.get(model)
                if decode is None:
                    decode = self._decodes[model] = self.decode.labels(model=model)
                decode.observe(decode_seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        prom: Any = self._prom
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
