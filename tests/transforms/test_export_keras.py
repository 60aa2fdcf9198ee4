"""Keras (.keras / .h5) -> .tflite with TFLiteConverter: the variants TFLite's docs show, verified in LiteRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeopt.fileio import report_path

pytestmark = pytest.mark.slow  # importing TensorFlow alone takes several seconds

tf = pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from edgeopt.errors import ModelError, UnsupportedOperation  # noqa: E402
from edgeopt.transforms.keras import keras_to_tflite, load_keras  # noqa: E402
from edgeopt.transforms.tflite import TfliteExport  # noqa: E402


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small channels-last CNN built in-process, saved as .keras and legacy .h5, with NHWC data."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((12, 12, 1))
    x = tf.keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(10)(x)
    model = tf.keras.Model(inputs, outputs)
    root = tmp_path_factory.mktemp("keras")
    model.save(root / "m.keras")
    model.save(root / "m.h5")
    xs = np.random.default_rng(0).random((32, 12, 12, 1)).astype(np.float32)
    np.savez(root / "cal.npz", x=xs)
    return {"keras": root / "m.keras", "h5": root / "m.h5", "cal": root / "cal.npz", "root": root}


def test_keras_cli_dynamic_and_int8(cli, keras_files, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "k.tflite"
    result = cli("export", keras_files["keras"], "--to", "tflite", "-o", out, "--quantize", "none,dynamic,int8",
                 "--data", keras_files["cal"], "--no-bench")
    assert result.exit_code == 0, result.stderr
    rows = {r["quantize"]: r for r in json.loads(report_path(out).read_text())["variants"]}
    assert rows["none"]["check"]["reference"] == "keras" and rows["none"]["check"]["cosine"] > 0.99999
    assert rows["dynamic"]["size_vs_first"] < 0.35 and rows["dynamic"]["check"]["cosine"] > 0.98
    assert rows["int8"]["check"]["cosine"] > 0.98 and "latency_ms" not in rows["int8"]
    raw = Interpreter(model_path=str(tmp_path / "k_int8.tflite")).get_input_details()[0]
    assert raw["dtype"] == np.int8  # full integer: int8 in and out, as TFLite's int8 recipe makes it
    assert rows["int8"]["inputs"][0]["shape"] == [1, 12, 12, 1]


def test_keras_fp16_and_legacy_h5(keras_files) -> None:
    fp16, check = keras_to_tflite(keras_files["h5"], TfliteExport("fp16"))
    fp32, _ = keras_to_tflite(load_keras(keras_files["keras"]), TfliteExport("none"))
    assert check.cosine > 0.9999 and check.reference == "keras"
    assert 0.4 * fp32.size_bytes < fp16.size_bytes < 0.65 * fp32.size_bytes


def test_keras_unsupported_op_is_named(keras_files) -> None:
    class Det(tf.keras.layers.Layer):
        def call(self, x):
            return tf.linalg.det(tf.reshape(x, (-1, 4, 4)))

    inputs = tf.keras.Input((16,))
    with pytest.raises(UnsupportedOperation, match="cannot handle operator tf.MatrixDeterminant"):
        keras_to_tflite(tf.keras.Model(inputs, Det()(inputs)))


def test_keras_bad_inputs(cli, keras_files, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="Keras model file not found"):
        load_keras(tmp_path / "missing.keras")
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, x=np.zeros((4, 1, 12, 12), np.float32))
    result = cli("export", keras_files["keras"], "--to", "tflite", "-o", tmp_path / "k.tflite", "--data", nchw)
    assert result.exit_code == 2 and "channels-last" in result.stderr
    assert not (tmp_path / "k.tflite").exists()
