import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeopt.data import load_data
from edgeopt.errors import BadInput, DataError
from edgeopt.measure import BenchSettings, benchmark, compare, evaluate
from edgeopt.measure.bench import BenchResult, speedup_interval
from edgeopt.model import load_model
from tests.conftest import make_onnx_cnn

FAST = BenchSettings(warmup=2, min_runs=20, min_seconds=0.05, max_seconds=2.0)


def test_benchmark_reports_percentiles_in_order(tiny_onnx: Path) -> None:
    r = benchmark(load_model(tiny_onnx), settings=FAST, threads=1)
    lat = r.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert r.runs >= 20
    assert r.threads == 1 and r.batch == 1 and r.runtime == "onnxruntime"
    assert r.size_bytes == tiny_onnx.stat().st_size
    assert r.throughput_ips == pytest.approx(1000.0 / lat["mean"], rel=1e-6)
    assert r.peak_rss_mb > 0


def test_compare_interleaves_and_sees_a_bigger_model_is_slower(tmp_path: Path) -> None:
    small = load_model(make_onnx_cnn(tmp_path / "s.onnx", channels=4, size=16))
    big = load_model(make_onnx_cnn(tmp_path / "b.onnx", channels=64, size=64))
    rs = compare([small, big], settings=BenchSettings(warmup=2, min_runs=20, min_seconds=0.3), threads=1)
    assert [r.model for r in rs] == [small.source, big.source]
    assert rs[1].latency_ms["p50"] > 2 * rs[0].latency_ms["p50"]
    # one median per interleaved round (50 ms each), the same number for both: paired samples
    assert len(rs[0].round_p50_ms) == len(rs[1].round_p50_ms) >= 5
    low, high = speedup_interval(rs[1], rs[0], resamples=500)
    assert 2.0 < low <= high


def test_speedup_interval_is_narrow_for_a_steady_gain_and_wide_for_noise() -> None:
    def result(rounds: list[float]) -> BenchResult:
        return BenchResult(model="m", format="onnx", runtime="onnxruntime", threads=1, batch=1, size_bytes=1,
                           latency_ms={"p50": float(np.median(rounds))}, throughput_ips=1.0, peak_rss_mb=0.0,
                           model_memory_mb=0.0, runs=len(rounds), round_p50_ms=rounds)

    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 3.0, 40)  # the machine's load changes from round to round, for both models alike
    base = result(list(load))
    steady = result(list(load / 2 * rng.normal(1.0, 0.02, 40)))
    noisy = result(list(load / 1.05 * rng.normal(1.0, 0.15, 40)))
    low, high = speedup_interval(base, steady)
    assert 1.9 < low <= high < 2.1 and high - low < 0.05
    low, high = speedup_interval(base, noisy)
    assert low < 1.03 < high  # 1.05x on average, but not distinguishable from no gain
    assert speedup_interval(base, result([1.0] * 4)) is None  # too few rounds to say


def test_batch_is_honoured(tiny_onnx: Path) -> None:
    r = benchmark(load_model(tiny_onnx), settings=FAST, threads=1, batch=4)
    assert r.batch == 4
    assert r.throughput_ips == pytest.approx(4000.0 / r.latency_ms["mean"], rel=1e-6)


def test_fixed_batch_model_rejects_other_batch(tmp_path: Path) -> None:
    model = load_model(make_onnx_cnn(tmp_path / "f.onnx", batch=1))
    with pytest.raises(BadInput, match="fixed batch size of 1"):
        benchmark(model, settings=FAST, batch=8)


def test_threads_zero_is_bad_input(tiny_onnx: Path) -> None:
    with pytest.raises(BadInput, match="threads must be >= 1"):
        benchmark(load_model(tiny_onnx), settings=FAST, threads=0)


def test_evaluate_matches_a_direct_onnxruntime_run(digits_onnx: Path, digits_test_npz: Path) -> None:
    data = load_data(digits_test_npz)
    result = evaluate(load_model(digits_onnx), data)
    logits = ort.InferenceSession(str(digits_onnx)).run(None, {"input": data.inputs["x"]})[0]
    assert result.n == 539
    assert result.accuracy == pytest.approx(float(np.mean(logits.argmax(1) == data.labels)))
    assert result.accuracy > 0.97
    assert result.top5 is not None and result.top5 >= result.accuracy


def test_agreement_and_cosine_against_a_different_model(tmp_path: Path, tiny_npz: Path) -> None:
    a = load_model(make_onnx_cnn(tmp_path / "a.onnx", seed=0))
    b = load_model(make_onnx_cnn(tmp_path / "b.onnx", seed=5))
    data = load_data(tiny_npz)
    same = evaluate(a, data, reference=a)
    other = evaluate(a, data, reference=b)
    assert same.agreement == 1.0 and same.cosine == pytest.approx(1.0)
    assert other.agreement < 1.0 and other.cosine < 0.99


def test_evaluate_fixed_batch_model_pads_last_batch(tmp_path: Path, tiny_npz: Path) -> None:
    fixed = load_model(make_onnx_cnn(tmp_path / "f.onnx", batch=1))
    dynamic = load_model(make_onnx_cnn(tmp_path / "d.onnx"))
    data = load_data(tiny_npz)
    r = evaluate(fixed, data, reference=dynamic)
    assert r.n == 40 and r.agreement == 1.0


def test_labels_out_of_range(tiny_onnx: Path, tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 1, 16, 16), np.float32), y=np.array([0, 1, 12]))
    with pytest.raises(DataError, match="labels range 0..12"):
        evaluate(load_model(tiny_onnx), load_data(p))


def test_bench_json_has_contract_keys(cli, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = cli("bench", tiny_onnx, "--runs", "10", "--seconds", "0.05", "--threads", "1", "--json", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert {"model", "format", "runtime", "threads", "batch", "size_bytes", "latency_ms", "throughput_ips",
            "peak_rss_mb"} <= set(payload)
    assert set(payload["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert payload["threads"] == 1
    assert "p50 ms" in result.stdout


def test_bench_two_models_reports_the_speedup_with_its_interval(cli, tmp_path: Path) -> None:
    small = make_onnx_cnn(tmp_path / "s.onnx", channels=4, size=16)
    big = make_onnx_cnn(tmp_path / "b.onnx", channels=64, size=64)
    result = cli("bench", big, small, "--runs", "20", "--seconds", "0.3", "--threads", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload[0]["vs_first"] == {"speedup_p50": 1.0, "interval_90": None}
    vs = payload[1]["vs_first"]
    low, high = vs["interval_90"]
    assert 2.0 < low <= vs["speedup_p50"] * 1.1 and low <= high
    assert "90% interval" in result.stderr


def test_eval_json_contract(cli, digits_onnx: Path, digits_test_npz: Path) -> None:
    result = cli("eval", digits_onnx, "--data", digits_test_npz, "--reference", digits_onnx, "--json", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n"] == 539 and payload["agreement"] == 1.0 and payload["accuracy"] > 0.97
    assert payload["cosine"] == pytest.approx(1.0)
