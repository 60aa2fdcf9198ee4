"""Keras (``.keras`` / ``.h5``) -> ``.tflite`` with TensorFlow's own TFLiteConverter, verified in LiteRT.

This is the path TFLite's documentation shows, so a Keras user gets exactly the variants they know:
``none`` (float32), ``dynamic`` (``Optimize.DEFAULT``: int8 weights), ``int8`` (full integer with a
representative dataset, int8 inputs and outputs) and ``fp16`` (``supported_types=[tf.float16]``).
Needs the ``[tensorflow]`` extra; legacy TF-Keras ``.h5`` files that Keras 3 cannot read are loaded
with ``tf-keras``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation, first_line
from edgeopt.model import Model
from edgeopt.transforms.tflite import TfliteCheck, TfliteExport, _check

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_UNSUPPORTED = re.compile(r"'(tf\.\w+)' op is neither a custom op nor a flex op")


def load_keras(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """A Keras model from ``.keras`` (Keras 3) or ``.h5`` (Keras 3, else legacy tf-keras).

    A ``Lambda`` layer stores Python bytecode that runs when the model does; it is refused
    unless ``trust_pickle`` (``--trust-pickle``): Keras 3's safe mode for ``.keras``, a check of
    the model config for ``.h5`` (whose legacy loaders have no safe mode).

    Raises:
        ModelError: the file is missing, holds code without ``trust_pickle``, or neither Keras
            can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Keras model file not found: {path}")
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelError(f"{path.name} is not a Keras model file ({', '.join(KERAS_SUFFIXES)})")
    if path.suffix.lower() == ".h5" and not trust_pickle:
        _refuse_h5_code(path)
    tf = require("tensorflow", extra="tensorflow")
    try:
        return tf.keras.models.load_model(path, compile=False, safe_mode=not trust_pickle)
    except Exception as exc:
        if path.suffix.lower() == ".keras":
            raise ModelError(f"cannot load Keras model {path}: {first_line(exc)}") from exc
        first = exc
    tf_keras = require("tf_keras", extra="tensorflow")
    try:
        return tf_keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ModelError(f"cannot load Keras model {path}: {first_line(first)}") from exc


def _refuse_h5_code(path: Path) -> None:
    """Read the .h5 model config (JSON) and refuse layers that carry Python code (Lambda)."""
    import json

    h5py = require("h5py", extra="tensorflow")
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load Keras model {path}: {first_line(exc)}") from exc
    if raw is None:
        return
    try:
        config = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: its model_config is not JSON") from exc
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda" or "function_type" in node:
                raise ModelError(f"{path.name} has a Lambda layer, whose Python bytecode runs with the model; "
                                 "pass --trust-pickle if you trust the file")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def keras_to_tflite(keras_model: Any, config: TfliteExport | None = None, *, data: Dataset | None = None,
                    source: str = "keras model") -> tuple[Model, TfliteCheck]:
    """Convert a Keras model (or a ``.keras``/``.h5`` path) with TFLiteConverter and verify it.

    Args:
        keras_model: a ``keras.Model`` or a path to one.
        config: the variant (``quantize`` none | dynamic | int8 | fp16) and fidelity floor.
        data: inputs in the Keras model's layout (e.g. NHWC) for the representative dataset
            (``int8``) and for verification; random inputs of the input shape otherwise.
        source: a name for messages when ``keras_model`` is an object.

    Returns:
        The ``.tflite`` Model and its check against the Keras outputs.

    Raises:
        UnsupportedOperation: the converter cannot handle an operator (named in the message).
        BadInput: ``int8`` without data, or outputs below the cosine floor.

    Example:
        >>> tfl, check = keras_to_tflite("model.keras", TfliteExport("dynamic"))  # doctest: +SKIP
    """
    cfg = config or TfliteExport()
    if isinstance(keras_model, str | Path):
        source = str(keras_model)
        keras_model = load_keras(keras_model)
    tf = require("tensorflow", extra="tensorflow")
    if cfg.quantize == "int8" and data is None:
        raise BadInput("--quantize int8 (full integer) needs calibration data: pass --data CAL.npz")
    inputs = _inputs(keras_model, data, cfg.verify_samples, source)
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if cfg.quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if cfg.quantize == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if cfg.quantize == "int8":
        calibration = _inputs(keras_model, data, cfg.calibration_samples, source)

        def representative() -> Any:
            for i in range(len(calibration[0])):
                yield [a[i:i + 1] for a in calibration]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        payload = converter.convert()
    except Exception as exc:
        match = _UNSUPPORTED.search(str(exc))
        if match:
            raise UnsupportedOperation(f"TFLite export of {source}: the converter cannot handle operator "
                                       f"{match.group(1)}") from exc
        raise UnsupportedOperation(f"TFLite export of {source} failed: {first_line(exc)}") from exc
    out = Model.from_tflite(bytes(payload), source=f"{source} (tflite {cfg.quantize})")
    ref = keras_model(*inputs, training=False) if len(inputs) > 1 else keras_model(inputs[0], training=False)
    ref = np.asarray(ref[0] if isinstance(ref, list | tuple) else ref, dtype=np.float32)
    return out, _check(out, cfg, inputs, ref, "keras")


def _inputs(keras_model: Any, data: Dataset | None, n: int, source: str) -> list[np.ndarray]:
    shapes = [tuple(t.shape) for t in keras_model.inputs]
    if data is not None:
        arrays = list(data.inputs.values())
        if len(arrays) != len(shapes):
            raise DataError(f"{data.source} has {len(arrays)} input arrays; {source} takes {len(shapes)}")
        for array, shape in zip(arrays, shapes, strict=True):
            want = tuple(shape[1:])
            if len(want) != array.ndim - 1 or any(w is not None and w != g for w, g in zip(want, array.shape[1:], strict=True)):
                raise DataError(f"{data.source}: samples have shape {'x'.join(map(str, array.shape[1:]))} but "
                                f"{source} expects {'x'.join('?' if w is None else str(w) for w in want)} "
                                "(Keras models are usually channels-last)")
        return [np.ascontiguousarray(a[:n], dtype=np.float32) for a in arrays]
    rng = np.random.default_rng(0)
    out = []
    for shape in shapes:
        if any(d is None for d in shape[1:]):
            raise BadInput(f"{source} has a dynamic input shape {shape}; pass --data")
        out.append(rng.standard_normal((n, *shape[1:])).astype(np.float32))
    return out
