"""The one measure-and-report step every technique's command uses: what a technique's result
costs and gains against the model it came from.

A technique (prune, distill, quantize ...) returns a model and its own facts; it never times or
evaluates. This step judges the original and the result on the same held-out data and times them
interleaved in one run, through the search engine's own measurement (``search/engine.py``:
``baseline_result``, ``evaluate_candidate``, ``time_candidates``), so a model a command reports and
a candidate ``optimize`` chooses are measured the same way. The report blocks keep the fields the
commands have always written (``accuracy``: before/after/drop_pts/agreement/samples; ``latency``:
runtime/threads/batch/interleaved/before_ms/after_ms/speedup_p50/runs; ``evaluation``: quantize's
every-figure block, gathered by ``measure/evaluate.py`` ``figures_of`` inside the engine's judging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeopt.data import Dataset
from edgeopt.model import Model


@dataclass
class Outcome:
    """The original (``before``) and the result (``after``) as the engine measured them
    (:class:`edgeopt.search.engine.CandidateResult`), on ``samples`` judged samples; ``runs`` timed runs each."""

    before: Any
    after: Any
    samples: int | None = None
    runs: tuple[int, int] | None = None
    timed: list[Any] | None = None  # the harness's BenchResults (original, result) when timed
    data_source: str | None = None  # the judged data's source

    def evaluation_block(self) -> dict[str, Any] | None:
        """Every figure of the result against the original on the judged data (None without data):
        the original's accuracy, the result's ``EvalResult`` figures (accuracy, top5, agreement,
        cosine, min_cosine, cosine_p5, the output kind's own ...) and the accuracy drop."""
        if self.after.figures is None:
            return None
        base, ev = self.before.figures.accuracy, self.after.figures.accuracy
        return {"data": self.data_source, "fp32_accuracy": base, **self.after.figures.to_dict(),
                "drop": None if base is None or ev is None else round(base - ev, 6)}

    def accuracy_block(self) -> dict[str, Any] | None:
        """Accuracy before/after on the labels (None without labels) and top-1 agreement with the original."""
        if self.before.accuracy is None or self.after.accuracy is None:
            return None
        return {"before": self.before.accuracy, "after": self.after.accuracy,
                "drop_pts": round(100.0 * (self.before.accuracy - self.after.accuracy), 3),
                "agreement": self.after.agreement, "samples": self.samples}

    def latency_block(self) -> dict[str, Any] | None:
        """Batch-1 latency of both, interleaved in one run, and the p50 speed-up (None when not timed)."""
        if not self.before.latency_ms or not self.after.latency_ms:
            return None
        p0, p1 = self.before.latency_ms["p50"], self.after.latency_ms["p50"]
        return {"runtime": self.before.runtime, "threads": self.before.threads, "batch": 1, "interleaved": True,
                "before_ms": self.before.latency_ms, "after_ms": self.after.latency_ms,
                "speedup_p50": round(p0 / p1, 3) if p1 > 0 else None,
                "runs": list(self.runs) if self.runs else None}


def measure_outcome(original: Model, result: Model, *, data: Dataset | None = None, latency: bool = True,
                    bench: Any = None, device: Any = None, threads: int | None = None,
                    timing_data: Dataset | None = None, name: str = "result") -> Outcome:
    """Judge ``result`` against ``original`` on ``data`` (when given) and time both interleaved.

    Args:
        original, result: runnable models (ONNX, TFLite, .pte ...) with the same outputs.
        data: held-out samples that chose nothing; accuracy needs labels, agreement and cosine do not.
        latency: time both (batch 1, interleaved with ``measure.compare``).
        bench: ``BenchSettings`` for that timing (default: >= 100 runs and >= 1 s each).
        device, threads: the device profile and intra-op threads both run with.
        timing_data: time on these samples instead of random inputs (token ids, masks: text models).

    Example:
        >>> o = measure_outcome(load_model("fp32.onnx"), load_model("int8.onnx"), data=load_data("test.npz"))  # doctest: +SKIP
        >>> o.accuracy_block()["drop_pts"], o.latency_block()["speedup_p50"]
    """
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.measure.evaluate import figures_of
    from edgeopt.search.budget import Budget
    from edgeopt.search.engine import CandidateResult, baseline_result, evaluate_candidate, time_candidates

    budget = Budget()
    after = CandidateResult(name=name, recipe={}, model=result, size_bytes=result.size_bytes)
    if data is not None:
        before, outputs, metric = baseline_result(original, data, budget, device=device, threads=threads)
        before.figures = figures_of(outputs, data)  # labels the outputs cannot have: one clear DataError
        evaluate_candidate(after, result, eval_data=data, budget=budget, baseline_outputs=outputs,
                           baseline_metric=metric, device=device, threads=threads)
    else:
        before = CandidateResult(name="original", recipe={}, model=original, size_bytes=original.size_bytes,
                                 status="baseline")
    runs = timed = None
    if latency:
        timed = time_candidates(before, [after], bench=bench or BenchSettings(min_runs=100, min_seconds=1.0),
                                device=device, threads=threads, data=timing_data)
        runs = (timed[0].runs, timed[1].runs)
    return Outcome(before=before, after=after, samples=len(data) if data is not None else None, runs=runs,
                   timed=timed, data_source=data.source if data is not None else None)
