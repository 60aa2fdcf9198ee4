"""NNCF INT8 for OpenVINO: a smaller model that keeps accuracy and really runs INT8 kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeopt.data import Dataset, load_data
from edgeopt.errors import BadInput, ConfigError, DataError
from edgeopt.measure import evaluate
from edgeopt.model import Model, load_model
from edgeopt.runtimes import get_runtime
from edgeopt.search.recipe import Recipe, apply_recipe
from edgeopt.transforms.config import TransformContext, config_from_dict, config_to_dict

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from edgeopt.transforms.nncf_quantize import NncfInt8, nncf_quantize  # noqa: E402


@pytest.fixture(scope="module")
def digits(digits_onnx: Path) -> Model:
    return load_model(digits_onnx)


@pytest.fixture(scope="module")
def calibration(digits_train_npz: Path) -> Dataset:
    return load_data(digits_train_npz).take(slice(0, 200))


@pytest.fixture(scope="module")
def int8(digits: Model, calibration: Dataset) -> Model:
    return nncf_quantize(digits, NncfInt8(subset_size=200), data=calibration)


def test_int8_digits_is_smaller_and_accurate(digits: Model, int8: Model, digits_onnx: Path,
                                            digits_test_npz: Path) -> None:
    test = load_data(digits_test_npz)
    assert digits.size_bytes / int8.size_bytes >= 3.5
    assert int8.metadata["edgeopt.runtime"] == "openvino"
    assert int8.metadata["edgeopt.quantization"] == "nncf-int8-performance"
    assert digits.onnx.SerializeToString() == onnx.load(str(digits_onnx)).SerializeToString()  # input untouched
    ops = {n.op_type for n in int8.onnx.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32 = evaluate(digits, test, runtime="onnxruntime", threads=1)
    q = evaluate(int8, test, reference=digits, threads=1)  # runs in OpenVINO (stored hint)
    assert fp32.accuracy is not None and q.accuracy is not None
    assert fp32.accuracy - q.accuracy <= 0.01
    assert q.agreement is not None and q.agreement >= 0.99
    assert q.cosine is not None and q.cosine >= 0.99


def test_openvino_executes_int8_kernels(int8: Model) -> None:
    session = get_runtime("openvino").load(int8, threads=1)
    precisions = session.details["compute_precisions"]
    # every convolution and the classifier run on 8-bit integers, none in float
    assert sum(precisions.get(p, 0) for p in ("u8", "i8")) == 4, precisions
    out = session.run({"input": np.zeros((2, 1, 32, 32), np.float32)})[0]
    assert out.shape == (2, 10)


def test_ignored_scope_keeps_a_layer_in_float(digits: Model, calibration: Dataset) -> None:
    first_conv = "/features/features.0/features.0.0/Conv"
    q = nncf_quantize(digits, NncfInt8(subset_size=32, ignored_scope=(first_conv,)), data=calibration)
    precisions = get_runtime("openvino").load(q, threads=1, options={"precision": "f32"}).details["compute_precisions"]
    assert precisions.get("f32") == 1 and sum(precisions.get(p, 0) for p in ("u8", "i8")) == 3, precisions


def test_recipe_applies_and_records_the_runtime(digits: Model, calibration: Dataset) -> None:
    recipe = Recipe("openvino-nncf-int8", (NncfInt8(subset_size=16),), runtime="openvino", needs=("calibration",))
    out = apply_recipe(digits, recipe, TransformContext(calibration=calibration, progress=False))
    assert out.runtime_hint() == "openvino"
    assert out.metadata["edgeopt.recipe"] == "NncfInt8 @ openvino"
    with pytest.raises(DataError, match="needs calibration data"):
        apply_recipe(digits, recipe, TransformContext())


def test_config_round_trips_and_validates() -> None:
    cfg = NncfInt8(preset="mixed", subset_size=64, model_type="transformer", ignored_scope=("a", "b"))
    payload = json.loads(json.dumps(config_to_dict(cfg)))
    assert payload["fields"]["ignored_scope"] == ["a", "b"]
    assert config_from_dict(payload) == cfg
    for bad, message in [({"preset": "fast"}, "preset must be one of performance, mixed"),
                         ({"subset_size": 0}, "subset_size must be an integer >= 1"),
                         ({"model_type": "cnn"}, "model_type must be null or 'transformer'"),
                         ({"ignored_scope": "conv1"}, "ignored_scope must be a list of node names")]:
        with pytest.raises(ConfigError, match=message):
            NncfInt8(**bad)


def test_bad_inputs_are_one_line_errors(digits: Model, int8: Model, calibration: Dataset) -> None:
    with pytest.raises(BadInput, match="is already quantized .*QuantizeLinear"):
        nncf_quantize(int8, data=calibration)
    with pytest.raises(BadInput, match=r"ignored_scope names not in .*\['conv9'\]"):
        nncf_quantize(digits, NncfInt8(ignored_scope=("conv9",)), data=calibration)
    wrong = Dataset({"x": np.zeros((4, 1, 16, 16), np.float32)}, None, source="wrong.npz")
    with pytest.raises(DataError, match="expects 1x32x32"):
        nncf_quantize(digits, data=wrong)
    with pytest.raises(DataError, match="is empty"):
        nncf_quantize(digits, data=calibration.take(slice(0, 0)))
    torch_like = Model(format="torch", source="net.py:Net", inputs=[], outputs=[], module=object())
    with pytest.raises(BadInput, match="export it first"):
        nncf_quantize(torch_like, data=calibration)


def test_saved_int8_model_benches_in_openvino_by_default(cli, int8: Model, tmp_path: Path) -> None:
    path = tmp_path / "digits_int8.onnx"
    int8.save(path)
    out = tmp_path / "b.json"
    result = cli("bench", path, "--threads", "1", "--runs", "10", "--seconds", "0.1", "--json", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["runtime"] == "openvino"
    assert payload["size_bytes"] == path.stat().st_size == int8.size_bytes


def test_missing_nncf_names_the_extra(digits: Model, calibration: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edgeopt.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependency, match=r"'nncf', which is not installed: run pip install 'edgeopt\[openvino\]'"):
        nncf_quantize(digits, data=calibration)


def _spiky(n: int, seed: int) -> Dataset:
    """Smooth images where one value in 1,000 is 8x larger: extremes that vary from sample to sample."""
    from tests.transforms.test_weight_rounding import smooth_images

    x = smooth_images(n, seed).inputs["input"].copy()
    x[np.random.default_rng(seed + 100).random(x.shape) < 0.001] *= 8.0
    return Dataset({"input": x}, None, source=f"spiky-{seed}")


def test_histogram_activation_ranges_keep_the_extremes_the_mean_of_maxima_clips() -> None:
    from onnx import numpy_helper

    from edgeopt.measure.evaluate import predict
    from tests.transforms.test_weight_rounding import depthwise_cnn

    model, cal, held = depthwise_cnn(seed=3), _spiky(64, 1), _spiky(64, 2)
    ref = predict(model, held)
    mse, input_scale = {}, {}
    for estimator in ("mean-minmax", "histogram"):
        q = nncf_quantize(model, NncfInt8(activation_range=estimator), data=cal)
        inits = {i.name: numpy_helper.to_array(i) for i in q.onnx.graph.initializer}
        input_scale[estimator] = next(float(inits[n.input[1]]) for n in q.onnx.graph.node
                                      if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        mse[estimator] = float(np.mean((predict(q, held) - ref) ** 2))
    # NNCF's default range is the mean over samples of each sample's max: the rare large inputs are
    # clipped; the histogram's MSE-optimal range keeps them and the output is much closer to FP32
    assert input_scale["histogram"] > 2 * input_scale["mean-minmax"]
    assert mse["histogram"] < 0.5 * mse["mean-minmax"]
    assert config_from_dict(config_to_dict(NncfInt8(activation_range="histogram"))) == NncfInt8(
        activation_range="histogram")
    with pytest.raises(ConfigError, match="activation_range must be one of"):
        NncfInt8(activation_range="percentile")  # type: ignore[arg-type]
