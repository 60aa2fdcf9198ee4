"""Per-layer sensitivity (edgeopt analyze); greedy mixed precision is tests/search/test_mixed_precision.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.data import Dataset, load_data
from edgeopt.errors import DataError
from edgeopt.model import Model, load_model
from edgeopt.transforms.quantize import StaticInt8
from edgeopt.transforms.sensitivity import analyze

pytest.importorskip("onnxruntime.quantization")


def fragile_mlp() -> tuple[Model, Dataset]:
    """Two MatMul layers; the second sees one huge-outlier input feature, so per-tensor INT8 of it alone
    crushes the small features and costs agreement, while the first layer quantizes harmlessly."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((32, 10)).astype(np.float32)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    scale = np.ones(32, np.float32)
    scale[0] = 500.0  # feature 0 after layer 1 is an outlier the second layer's input range must cover
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
             helper.make_node("MatMul", ["hs", "w2"], ["logits"], name="fc2")]
    w2[0, :] = 0.001  # the outlier barely matters to the logits; the small features decide them
    graph = helper.make_graph(nodes, "fragile",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                                           numpy_helper.from_array(scale, "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return Model.from_onnx(proto, source="fragile"), Dataset({"x": x}, None, "mlp-data")


def test_analyze_ranks_the_fragile_layer_first() -> None:
    model, data = fragile_mlp()
    rows = analyze(model, data, config=StaticInt8(per_channel=False), threads=1)
    assert [r.node for r in rows] == ["fc2", "fc1"]
    fc2, fc1 = rows
    assert fc2.cosine < fc1.cosine
    assert fc2.drop > fc1.drop  # no labels: drop is agreement lost vs FP32
    assert fc1.cosine > 0.99
    assert fc2.all_but_cosine > fc1.all_but_cosine  # keeping fc2 float recovers more
    assert fc2.params == 320 and fc2.op_type == "MatMul"
    assert fc2.accuracy is None


def test_analyze_digits_with_labels(digits_onnx, digits_train_npz) -> None:
    rows = analyze(load_model(digits_onnx), load_data(digits_train_npz), threads=1, all_but=False, max_eval=128)
    assert len(rows) == 4
    assert {r.op_type for r in rows} == {"Conv", "Gemm"}
    assert all(r.accuracy is not None and r.cosine > 0.99 for r in rows)
    assert all(r.all_but_cosine is None for r in rows)


def test_analyze_needs_enough_data() -> None:
    model, data = fragile_mlp()
    with pytest.raises(DataError, match="at least 20"):
        analyze(model, data.take(slice(0, 10)))


def test_cli_analyze_json(cli, tmp_path, digits_onnx, digits_train_npz) -> None:
    out = tmp_path / "sens.json"
    result = cli("analyze", digits_onnx, "--data", digits_train_npz, "--threads", "1", "--method", "exhaustive",
                 "--only", "--max-eval", "64", "--json", out)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    assert set(rows[0]) >= {"node", "op_type", "params", "accuracy", "agreement", "cosine", "drop"}
    assert rows[0]["node"] in result.stdout


def test_cli_analyze_bad_data(cli, tmp_path, digits_onnx) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((30, 2, 5), np.float32))
    result = cli("analyze", digits_onnx, "--data", wrong)
    assert result.exit_code == 2
    assert "expects 1x32x32" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_auto_adds_mixed_precision_when_plain_int8_misses_the_budget() -> None:
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.search.auto_quantize import auto_quantize

    model, data = fragile_mlp()
    result = auto_quantize(model, data, max_drop=0.05, threads=1, runtimes=("onnxruntime",),
                           bench=BenchSettings(warmup=2, min_runs=20, min_seconds=0.05, max_seconds=1.0))
    assert result.budget.metric == "agreement"  # no labels
    by_name = {r.name: r for r in result.results}
    assert not by_name["int8-qdq-u8s8-pertensor"].meets_budget
    mixed = [r for r in result.results if r.name.startswith("int8-mixed-")]
    assert len(mixed) == 1 and mixed[0].meets_budget and mixed[0].latency_ms  # the fewest float layers, timed
    assert mixed[0].recipe["steps"][0]["fields"]["exclude_nodes"] == ["fc2"]
    assert "int8-qdq-u8s8-perchannel-entropy" in [s["variant"] for s in result.steps]
    assert any("mixed precision" in n for n in result.notes)
    # the recovery steps, in order, each measured
    steps = [s["step"] for s in result.steps]
    assert steps[0] == "0 plain" and result.steps[0]["status"] == "misses budget"
    assert steps.index("1 calibration") < steps.index("2 bias correction") < steps.index("3 mixed precision")
    tried = [s for s in result.steps if s["step"] == "3 mixed precision"]
    assert tried[0]["float_layers"] == ["fc2"] and tried[0]["status"] == "meets budget"
    judged = {s["judged"] for s in result.steps if s.get("judged") is not None}
    assert len(judged) == 1 and 20 < judged.pop() <= 100  # the confident share of the 100 held-out samples
    assert any(n.startswith("judged on ") and "90% interval" in n for n in result.notes)


def test_cli_analyze_one_pass_is_the_default(cli, tmp_path, digits_onnx, digits_train_npz) -> None:
    out = tmp_path / "one.json"
    result = cli("analyze", digits_onnx, "--data", digits_train_npz, "--max-eval", "64", "--json", out)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and {r["op_type"] for r in rows} == {"Conv", "Gemm"}
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert all(r["sqnr_db"] > 20 and r["cosine"] > 0.99 for r in rows)
    assert "one pass" in result.stdout
    bad = cli("analyze", digits_onnx, "--data", digits_train_npz, "--method", "guess")
    assert bad.exit_code == 2 and "--method must be one-pass or exhaustive" in bad.stderr
