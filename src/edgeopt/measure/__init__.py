"""Measurement: one latency harness (bench) and one accuracy/fidelity harness (evaluate)."""

from edgeopt.measure.bench import BenchResult, BenchSettings, benchmark, compare, example_feeds
from edgeopt.measure.evaluate import EvalResult, evaluate, fidelity, predict
from edgeopt.runtimes.sessions import RunSettings, open_session, resolve_settings

__all__ = ["BenchResult", "BenchSettings", "EvalResult", "RunSettings", "benchmark", "compare",
           "evaluate", "example_feeds", "fidelity", "open_session", "predict", "resolve_settings"]
