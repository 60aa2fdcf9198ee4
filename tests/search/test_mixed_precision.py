"""Greedy mixed precision (search/mixed_precision.py), judged by the engine's one budget metric."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import Dataset
from edgeopt.measure.evaluate import predict
from edgeopt.model import Model
from edgeopt.search.budget import Budget
from edgeopt.search.mixed_precision import mixed_precision
from edgeopt.transforms.quantize import StaticInt8
from edgeopt.transforms.sensitivity import analyze
from tests.transforms.test_analyze import fragile_mlp

pytest.importorskip("onnxruntime.quantization")


def test_mixed_precision_keeps_the_sensitive_layer_float() -> None:
    model, data = fragile_mlp()
    calib, held = data.split(0.5, seed=0)
    rows = analyze(model, calib, eval_data=held, config=StaticInt8(per_channel=False), threads=1, all_but=False)
    found = mixed_precision(model, StaticInt8(per_channel=False), calibration=calib, eval_data=held,
                            budget=Budget(metric="agreement", max_drop=0.05), ranking=rows)
    assert found.meets_budget
    assert found.config.exclude_nodes == ("fc2",)
    assert not found.steps[0]["meets_budget"] and found.steps[0]["drop"] > 0.2
    assert found.steps[-1]["cosine"] > 0.999
    float_nodes = {n.name for n in found.model.onnx.graph.node if n.op_type == "MatMul"}
    assert "fc2" in float_nodes


def test_mixed_precision_judges_like_the_engine() -> None:
    """The budget metric follows the output as optimize's does: an embedding output is judged by cosine
    (auto), labelled class scores by accuracy, and the cosine floor rejects whatever the metric."""
    model, data = fragile_mlp()
    emb = Model.from_onnx(_renamed_output(model, "sentence_embedding"), source="emb")
    calib, held = data.split(0.5, seed=0)
    rows = analyze(model, calib, eval_data=held, config=StaticInt8(per_channel=False), threads=1, all_but=False)
    found = mixed_precision(emb, StaticInt8(per_channel=False), calibration=calib, eval_data=held,
                            budget=Budget(max_drop=0.001), ranking=rows)
    first = found.steps[0]
    assert first["drop"] == pytest.approx(1.0 - first["cosine"]) and first["drop"] > 0.001
    assert first["confident_agreement"] is None and not first["meets_budget"]
    # labels: auto judges accuracy, the drop is accuracy points against FP32 on the same samples
    labels = np.argmax(predict(model, held), axis=1)
    labelled = Dataset(held.inputs, labels, "labelled")
    found = mixed_precision(model, StaticInt8(per_channel=False), calibration=calib, eval_data=labelled,
                            budget=Budget(max_drop=0.05), ranking=rows)
    assert found.steps[0]["drop"] == pytest.approx(1.0 - found.steps[0]["accuracy"])
    # a floor above every step's cosine: nothing meets the budget even with a generous drop
    floor = mixed_precision(model, StaticInt8(per_channel=False), calibration=calib, eval_data=held,
                            budget=Budget(metric="agreement", max_drop=0.9, min_cosine=1.0), ranking=rows)
    assert not floor.meets_budget and floor.steps[0]["drop"] < 0.9


def _renamed_output(model: Model, name: str):
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model.onnx)
    old = proto.graph.output[0].name
    proto.graph.output[0].name = name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    return proto
