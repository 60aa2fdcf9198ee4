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
    assert lat["speedup_p50"] == pytest.approx(lat["before_ms"]["p50"] / lat["after_ms"]["p50"], rel=1e-2, abs=1e-3)
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


def test_quantize_reports_through_the_one_step(cli, tmp_path, monkeypatch, digits_onnx, digits_test_npz) -> None:
    """`edgeopt quantize` (non-auto) times once, through the engine, and its evaluation block holds
    every figure `evaluate` gives on the same samples (top5, min_cosine, the class-score extras)."""
    import importlib
    import json

    ev_module = importlib.import_module("edgeopt.measure.evaluate")  # the module, not the function of that name
    engine = importlib.import_module("edgeopt.search.engine")

    real_compare, real_evaluate, calls = engine.compare, ev_module.evaluate, []
    monkeypatch.setattr(engine, "compare", lambda models, **kw: calls.append(len(models)) or real_compare(models, **kw))

    def no_evaluate(*args, **kwargs):  # the command must not judge on the side
        raise AssertionError("quantize called evaluate() itself")

    monkeypatch.setattr(ev_module, "evaluate", no_evaluate)
    out = tmp_path / "int8.onnx"
    result = cli("quantize", digits_onnx, "-o", out, "--mode", "dynamic", "--eval-data", digits_test_npz,
                 "--threads", "1", "--seconds", "0.1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert calls == [2]  # FP32 and the result, interleaved in one run, once
    report = json.loads((tmp_path / "int8.report.json").read_text())
    got = report["evaluation"]
    original, data = load_model(digits_onnx), load_data(digits_test_npz)
    base = real_evaluate(original, data, threads=1, keep_outputs=True)
    want = real_evaluate(load_model(out), data, threads=1, reference=base.outputs).to_dict()
    assert set(want) | {"data", "fp32_accuracy", "drop"} == set(got)
    assert got["output_kind"] == "classes" and got["n"] == len(data) == 539 and got["top5"] >= got["accuracy"]
    for key, value in want.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert got["fp32_accuracy"] == pytest.approx(base.accuracy)
    assert got["drop"] == pytest.approx(round(base.accuracy - want["accuracy"], 6))
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert "p50 ms" in result.stdout and "cosine" in result.stdout and f"{got['cosine']:.5f}" in result.stdout


def test_labels_the_outputs_cannot_have_are_one_clear_error(cli, tmp_path, digits_onnx, digits_test_npz) -> None:
    import numpy as np

    data = load_data(digits_test_npz)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=next(iter(data.inputs.values())), y=np.where(data.labels == 0, 12, data.labels))
    out = tmp_path / "q.onnx"
    result = cli("quantize", digits_onnx, "-o", out, "--mode", "dynamic", "--eval-data", bad, "--threads", "1")
    assert result.exit_code == 2 and "labels range 1..12 but the model has 10 outputs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
