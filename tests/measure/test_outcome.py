"""The one measure-and-report step (measure/outcome.py): original vs result, judged and timed as the engine does."""

from __future__ import annotations

import pytest

from edgeopt.data import load_data
from edgeopt.measure.bench import BenchSettings
from edgeopt.measure.evaluate import evaluate
from edgeopt.measure.outcome import measure_outcome
from edgeopt.model import load_model

pytest.importorskip("onnxruntime.quantization")

FAST = BenchSettings(warmup=2, min_runs=20, min_seconds=0.05, max_seconds=1.0)


def test_outcome_agrees_with_eval_and_times_both_interleaved(digits_onnx, digits_test_npz) -> None:
    from edgeopt.transforms.quantize import DynamicInt8, quantize

    original, data = load_model(digits_onnx), load_data(digits_test_npz)
    int8 = quantize(original, DynamicInt8())
    outcome = measure_outcome(original, int8, data=data, bench=FAST, threads=1)
    # the same figures `edgeopt eval` gives, on the same samples
    before = evaluate(original, data, threads=1, keep_outputs=True)
    after = evaluate(int8, data, threads=1, reference=before.outputs)
    acc = outcome.accuracy_block()
    assert acc["before"] == pytest.approx(before.accuracy) and acc["after"] == pytest.approx(after.accuracy)
    assert acc["agreement"] == pytest.approx(after.agreement) and acc["samples"] == len(data)
    assert acc["drop_pts"] == pytest.approx(round(100 * (before.accuracy - after.accuracy), 3))
    lat = outcome.latency_block()
    assert lat["batch"] == 1 and lat["interleaved"] and lat["runtime"] == "onnxruntime" and lat["threads"] == 1
    assert lat["runs"][0] >= 20 and lat["runs"][1] >= 20
    assert lat["speedup_p50"] == pytest.approx(lat["before_ms"]["p50"] / lat["after_ms"]["p50"], rel=1e-2)
    assert outcome.after.size_bytes == int8.size_bytes < original.size_bytes


def test_without_labels_or_timing_the_blocks_say_so(digits_onnx, digits_test_npz) -> None:
    original = load_model(digits_onnx)
    unlabelled = load_data(digits_test_npz)
    unlabelled = type(unlabelled)(unlabelled.inputs, None, "unlabelled")
    outcome = measure_outcome(original, original, data=unlabelled, latency=False, threads=1)
    assert outcome.accuracy_block() is None and outcome.latency_block() is None
    assert outcome.after.agreement == 1.0 and outcome.after.cosine == pytest.approx(1.0)
    timed_only = measure_outcome(original, original, bench=FAST, threads=1)
    assert timed_only.accuracy_block() is None and timed_only.latency_block()["runs"][1] >= 20
