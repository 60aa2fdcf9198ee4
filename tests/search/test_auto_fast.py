"""What keeps ``quantize --mode auto`` within minutes: the quick speed screen before judging, mixed
precision by graph edits of one INT8 model (fewest float layers by 1-2-4 + bisection), symmetric
ranges derived from the cached asymmetric ones."""

from __future__ import annotations

import numpy as np
import pytest

import edgeopt.search.auto_quantize as aq
from edgeopt.data import Dataset
from edgeopt.measure.evaluate import predict
from edgeopt.search.engine import CandidateResult
from edgeopt.search.recipe import Recipe
from edgeopt.search.recovery import _revert_search
from edgeopt.transforms.quantize import DynamicInt8, StaticInt8, quantize
from tests.transforms.test_int8_recovery import deep_mlp

pytest.importorskip("onnxruntime.quantization")


def _data(n: int = 64) -> Dataset:
    return Dataset({"input": np.random.default_rng(1).standard_normal((n, 16)).astype(np.float32)}, None, "x")


def test_variants_slower_than_fp32_in_the_quick_timing_are_not_judged(monkeypatch) -> None:
    model = deep_mlp(3)
    speed = {"int8-qdq": 1.6, "int8-dynamic": 0.4}

    def fake_time(base, results, **kw):  # the screen's timing, deterministic
        for r in results:
            r.speedup, r.latency_ms = speed[r.name], {"p50": 1.0 / speed[r.name]}
        base.latency_ms = {"p50": 1.0}

    judged: list[str] = []
    real_eval = aq.evaluate_candidate

    def spy_eval(r, model, **kw):
        judged.append(r.name)
        real_eval(r, model, **kw)

    monkeypatch.setattr(aq, "plain_recipes", lambda *a, **k: [
        Recipe("int8-qdq", (StaticInt8(),), needs=("calibration",)), Recipe("int8-dynamic", (DynamicInt8(),))])
    monkeypatch.setattr(aq, "time_candidates", fake_time)
    monkeypatch.setattr(aq, "evaluate_candidate", spy_eval)
    result = aq.auto_quantize(model, _data(), eval_data=_data(40), threads=1, metric="cosine", max_drop=0.5,
                              min_cosine=0.0, runtimes=("onnxruntime",), mixed=False)
    assert judged == ["int8-qdq"]
    dyn = next(r for r in result.results if r.name == "int8-dynamic")
    assert dyn.status == "rejected" and dyn.reason.startswith("slower than FP32 in a quick timing (0.40x")
    assert dyn.cosine is None and dyn.model is None
    assert any(n.startswith("quick timing before judging: 1 variant(s) slower than FP32") for n in result.notes)
    assert result.chosen is not None and result.chosen.name == "int8-qdq"


def _started(model, data) -> CandidateResult:
    int8 = quantize(model, StaticInt8(), data=data)
    return CandidateResult(name="int8-qdq-u8s8-perchannel", recipe={}, model=int8)


@pytest.mark.parametrize("needed", [1, 3, 5])
def test_revert_search_finds_the_fewest_float_layers_by_doubling_then_bisecting(needed: int) -> None:
    model, data = deep_mlp(12), _data()
    start = _started(model, data)
    order = [f"fc{i}" for i in range(12)]
    seen: list[int] = []

    def judge(recipe: Recipe, m, seconds: float) -> CandidateResult:
        floats = m.metadata["edgeopt.float_layers"].split(",")
        assert floats == order[:len(floats)]
        seen.append(len(floats))
        ok = len(floats) >= needed
        return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), model=m, meets_budget=ok,
                               drop=0.0 if ok else 0.1, cosine=1.0)

    steps: list[dict] = []
    found = _revert_search(start, StaticInt8(), model, order, dict.fromkeys(order, 0.1), judge=judge, steps=steps)
    assert found is not None and found.name == f"int8-mixed-{needed}-float"
    assert found.recipe["steps"][0]["fields"]["exclude_nodes"] == order[:needed]
    assert seen == {1: [1], 3: [1, 2, 4, 3], 5: [1, 2, 4, 6, 5]}[needed]
    assert [s["float_layers"] for s in steps] == [order[:k] for k in seen]
    assert all(s["start"] == "int8-qdq-u8s8-perchannel" for s in steps)


def test_revert_search_from_an_openvino_start_records_the_nncf_rebuild_and_f32() -> None:
    model, data = deep_mlp(4), _data()
    start = _started(model, data)
    start.model = start.model.with_metadata(runtime="openvino")
    order = [f"fc{i}" for i in range(4)]

    def judge(recipe: Recipe, m, seconds: float) -> CandidateResult:
        return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), model=m, meets_budget=True, drop=0.0)

    found = _revert_search(start, None, model, order, dict.fromkeys(order, 0.0), judge=judge, steps=[])
    assert found is not None and found.name == "openvino-nncf-int8-mixed-1-float"
    assert found.recipe["runtime"] == "openvino" and found.recipe["runtime_options"] == {"precision": "f32"}
    assert found.recipe["steps"][0]["fields"]["ignored_scope"] == ["fc0"]
    assert found.model.metadata["edgeopt.runtime_options"] == '{"precision": "f32"}'


def test_no_float_layer_set_meets_the_budget_returns_the_best_try() -> None:
    model, data = deep_mlp(8), _data()
    start = _started(model, data)
    order = [f"fc{i}" for i in range(8)]

    def judge(recipe: Recipe, m, seconds: float) -> CandidateResult:
        k = len(m.metadata["edgeopt.float_layers"].split(","))
        return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), model=m, meets_budget=False,
                               drop=0.1 / k, cosine=0.9)

    steps: list[dict] = []
    found = _revert_search(start, StaticInt8(), model, order, {}, judge=judge, steps=steps)
    assert [len(s["float_layers"]) for s in steps] == [1, 2, 4]  # at most half the layers float
    assert found is not None and found.name == "int8-mixed-4-float"


def test_symmetric_minmax_ranges_come_from_the_asymmetric_cache_and_match_a_fresh_calibration() -> None:
    import edgeopt.transforms.quantize as tq

    model, data = deep_mlp(4), _data()
    cfg = StaticInt8(activation_type="s8", symmetric_activations=True)
    tq._CACHE_DIR = None
    fresh = predict(quantize(model, cfg, data=data), data)
    tq._CACHE_DIR = None
    quantize(model, StaticInt8(activation_type="s8"), data=data)  # asymmetric ranges cached
    calls = []
    real = tq._symmetric_from_minmax

    def spy(*a, **k):
        calls.append(not a[3].is_file())
        real(*a, **k)
        calls.append(a[3].is_file())

    tq._symmetric_from_minmax = spy
    try:
        derived = predict(quantize(model, cfg, data=data), data)
    finally:
        tq._symmetric_from_minmax = real
    assert calls == [True, True]  # no cache before, written from the asymmetric one
    np.testing.assert_array_equal(derived, fresh)


def test_revert_search_from_ort_qdq_run_by_openvino_keeps_openvino_in_the_recipe() -> None:
    model, data = deep_mlp(4), _data()
    start = _started(model, data)
    start.model = start.model.with_metadata(runtime="openvino")
    start.recipe = Recipe("int8-qdq-u8s8-perchannel-openvino", (StaticInt8(),), runtime="openvino").to_dict()
    order = [f"fc{i}" for i in range(4)]

    def judge(recipe: Recipe, m, seconds: float) -> CandidateResult:
        return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), model=m, meets_budget=True, drop=0.0)

    found = _revert_search(start, StaticInt8(), model, order, {}, judge=judge, steps=[])
    assert found is not None and found.name == "int8-mixed-1-float-openvino"
    assert found.recipe["runtime"] == "openvino" and found.recipe["runtime_options"] == {"precision": "f32"}
    assert found.recipe["steps"][0]["fields"]["exclude_nodes"] == ["fc0"]


@pytest.mark.parametrize(("hist_drop", "rounded_drop"), [(0.0, 0.0), (1 / 87, 0.0), (0.1, 0.0), (0.1, 0.1)])
def test_nncf_start_is_rebuilt_and_kept_only_when_the_judge_says_closer(hist_drop: float, rounded_drop: float) -> None:
    pytest.importorskip("nncf")
    from edgeopt.measure.evaluate import fidelity
    from edgeopt.search.recovery import HISTOGRAM_ROUNDED, ROUNDED, _rounded_start
    from tests.transforms.test_weight_rounding import depthwise_cnn, smooth_images

    model, cal, held = depthwise_cnn(), smooth_images(32, seed=1), smooth_images(32, seed=2)
    int8 = quantize(model, StaticInt8(), data=cal).with_metadata(runtime="openvino")
    ref = predict(model, held)
    _, cosine, _ = fidelity(predict(int8, held), ref)
    start = CandidateResult(name="openvino-nncf-int8", recipe={"runtime": "openvino"}, model=int8, drop=0.0,
                            cosine=cosine)

    def judge(recipe: Recipe, m, seconds: float) -> CandidateResult:
        _, cos, _ = fidelity(predict(m, held), ref)
        # one flipped sample of 87 is within the judge's noise (the cosine decides); 10 pt of 87 is not
        drop = hist_drop if recipe.name == HISTOGRAM_ROUNDED else rounded_drop
        return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), model=m, drop=drop, judged=87, cosine=cos)

    steps: list[dict] = []
    got = _rounded_start(start, model, cal, judge=judge, steps=steps)
    assert steps[0]["step"] == "3 activation ranges + weight rounding" and steps[0]["variant"] == HISTOGRAM_ROUNDED
    assert all(row["start"] == "openvino-nncf-int8" and row["cosine"] is not None for row in steps)
    if hist_drop < 0.1:  # histogram ranges + re-rounded weights: closer to FP32 on held-out samples
        assert got.name == HISTOGRAM_ROUNDED and len(steps) == 1 and got.cosine > cosine
        assert steps[0]["kept"] == "start of the float-layer search"
        fields = got.recipe["steps"][0]["fields"]
        assert fields["weight_rounding"] is True and fields["activation_range"] == "histogram"
        found = _revert_search(got, None, model, ["project"], {}, judge=lambda r, m, s: CandidateResult(
            name=r.name, recipe=r.to_dict(), model=m, meets_budget=True, drop=0.0), steps=steps)
        assert found is not None and found.name == f"{HISTOGRAM_ROUNDED}-mixed-1-float"
        assert found.recipe["steps"][0]["fields"] == {**fields, "ignored_scope": ["project"]}
        return
    assert steps[0]["kept"] == "no: openvino-nncf-int8 is as good"
    assert steps[1]["step"] == "3 weight rounding" and steps[1]["variant"] == ROUNDED
    if rounded_drop < 0.1:
        assert got.name == ROUNDED and steps[1]["kept"] == "start of the float-layer search"
        assert got.cosine > cosine  # re-rounded weights: closer to FP32 on held-out samples
        assert got.recipe["steps"][0]["fields"]["weight_rounding"] is True
        found = _revert_search(got, None, model, ["project"], {}, judge=lambda r, m, s: CandidateResult(
            name=r.name, recipe=r.to_dict(), model=m, meets_budget=True, drop=0.0), steps=steps)
        assert found is not None and found.name == "openvino-nncf-int8-rounded-mixed-1-float"
        assert found.recipe["steps"][0]["fields"] == {**found.recipe["steps"][0]["fields"],
                                                       "ignored_scope": ["project"], "weight_rounding": True}
    else:
        assert got is start and steps[1]["kept"] == "no: openvino-nncf-int8 is as good"
