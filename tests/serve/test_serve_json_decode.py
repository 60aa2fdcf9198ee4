"""JSON request bodies parsed straight into numpy (pysimdjson) give exactly what the general path gives.

Each body is parsed twice: as served (flat numeric ``data`` through pysimdjson's typed buffer) and
with pysimdjson switched off (orjson, then ``np.asarray``: the path before). Arrays, dtypes, every
other field, and for bad bodies the status and message, must be identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.model import TensorSpec
from edgeopt.serve import protocol
from edgeopt.serve.protocol import ProtocolError, parse_infer_request

pytest.importorskip("simdjson")

INPUTS = [TensorSpec("x", ("N", 4), "float32"), TensorSpec("ids", ("N", 4), "int64")]
OUTPUTS = [TensorSpec("y", ("N", 2), "float32")]


def _parse(body: bytes, typed: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if not typed:
            m.setattr(protocol, "simdjson", None)
        try:
            return parse_infer_request(body, header_length=None, inputs=INPUTS, outputs=OUTPUTS)
        except ProtocolError as exc:
            return (exc.status, str(exc))


def _body(x: object, ids: object = (1, 2, 3, 4), shape: tuple[int, ...] = (1, 4), **extra: object) -> bytes:
    def raw(v: object) -> str:  # JSON text as given, or a Python value written by json.dumps
        return v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v)

    inputs = (f'[{{"name": "x", "shape": {list(shape)}, "datatype": "FP32", "data": {raw(x)}}}, '
              f'{{"name": "ids", "shape": {list(shape)}, "datatype": "INT64", "data": {raw(ids)}}}]')
    rest = "".join(f', "{k}": {json.dumps(v)}' for k, v in extra.items())
    return f'{{"inputs": {inputs}{rest}}}'.encode()


def _same(a: object, b: object) -> None:
    if isinstance(a, tuple):
        assert a == b
        return
    assert not isinstance(b, tuple), b
    assert a.feeds.keys() == b.feeds.keys()
    for name in a.feeds:
        assert a.feeds[name].dtype == b.feeds[name].dtype and a.feeds[name].shape == b.feeds[name].shape
        # bit for bit: the sign of zero and every subnormal too
        assert a.feeds[name].tobytes() == b.feeds[name].tobytes(), name
    assert (a.batch, a.outputs, a.binary_outputs, a.id, a.parameters) == \
        (b.batch, b.outputs, b.binary_outputs, b.id, b.parameters)


def test_a_flat_numeric_body_is_parsed_into_arrays_without_python_floats() -> None:
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    body = _body(x.ravel().tolist(), list(range(8)), shape=(2, 4), id="r1")
    doc = protocol._loads_typed(body)
    assert isinstance(doc["inputs"][0]["data"], np.ndarray) and doc["inputs"][0]["data"].dtype == np.float64
    assert doc["inputs"][1]["data"].dtype == np.int64 and doc["id"] == "r1"
    req = parse_infer_request(body, header_length=None, inputs=INPUTS, outputs=OUTPUTS)
    np.testing.assert_array_equal(req.feeds["x"], x)  # float32 written as float64 text comes back exactly
    assert req.feeds["ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("x", [
    "[0.1, -0.0, 1e-400, 5e-324, 2.2250738585072011e-308]",  # sign of zero, underflow, subnormals
    "[1, 2, 3, 4]",  # integers for an FP32 input (int64 -> float32, as before)
    "[9007199254740993, 1.5, 1E2, -7]",  # an integer beyond 2**53 beside a float: rounded the same
    "[1.0000000000000000000000000001, 123456789012345678901234567890.5, 3.4028235e38, -1e-39]",
])
def test_numbers_come_out_bit_for_bit_as_on_the_general_path(x: str, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _body(x)
    assert protocol._loads_typed(body) is not None  # the typed path really took these
    _same(_parse(body, True, monkeypatch), _parse(body, False, monkeypatch))


def test_random_float32_tensors_match_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-30, 1e-3, 1.0, 1e6, 1e30):
        x = (rng.standard_normal((3, 4)) * scale).astype(np.float32)
        body = _body(x.ravel().tolist(), rng.integers(-2**62, 2**62, 12).tolist(), shape=(3, 4))
        _same(_parse(body, True, monkeypatch), _parse(body, False, monkeypatch))


@pytest.mark.parametrize(("x", "ids", "message"), [
    ("[1, [2], 3, 4]", "[1, 2, 3, 4]", "ragged nested list"),  # a list inside flat data: the general path
    ("[[], [1, 2], 3, 4]", "[1, 2, 3, 4]", "ragged nested list"),
    ("[1, 2, 3, 4]", "[1, 2, 3, 18446744073709551615]", "INT64 data contains non-integer numbers"),  # as before
    ("[1, 2, 3, 4]", "[1, 2, 3.5, 4]", "INT64 data contains non-integer numbers"),
    ("[1, 2, 3, 4]", "[1, 2, 3, -0.0]", "INT64 data contains non-integer numbers"),
    ('[1, 2, "3", 4]', "[1, 2, 3, 4]", "FP32 data contains strings"),
    ("[true, false, true, 1]", "[1, 2, 3, 4]", None),  # booleans: whatever the general path does
    ("[1, 2, null, 4]", "[1, 2, 3, 4]", "FP32 data contains mixed or out-of-range values"),
    ("[]", "[1, 2, 3, 4]", "needs 4 values, got 0"),
    ("[1, 2, 3]", "[1, 2, 3, 4]", "needs 4 values, got 3"),
    ("[NaN, 2, 3, 4]", "[1, 2, 3, 4]", None),  # a literal simdjson and orjson refuse: Python's parser
    ("[1e400, 2, 3, 4]", "[1, 2, 3, 4]", None),
])
def test_bodies_the_typed_path_passes_on_answer_as_before(x: str, ids: str, message: str | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    body = _body(x, ids)
    typed, general = _parse(body, True, monkeypatch), _parse(body, False, monkeypatch)
    _same(typed, general)
    if message is not None:
        assert isinstance(typed, tuple) and typed[0] == 400 and message in typed[1]


@pytest.mark.parametrize("body", [
    _body("[[1, 2, 3, 4]]"),  # regular nesting: accepted, by the general path
    _body("[[1, 2], [3, 4]]", "[[1, 2], [3, 4]]", shape=(1, 4)),
    _body("[1, 2, 3, 4]", outputs=[{"name": "y", "parameters": {"binary_data": True}}],
          parameters={"a": [1, [2, {"b": [[]]}]], "s": "[x]"}),  # lists and a "[" outside the data
    b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], '
    b'"data": [5, 6, 7, 8.5]}, {"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}',
    b'{"inputs": [], "inputs": ' + _body("[1, 2, 3, 4]")[len(b'{"inputs": '):],  # duplicate keys: the last wins
    b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, 7]}',
    b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": {"a": 1}}, '
    b'{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": "1234"}]}',
    b'{"inputs": [{"name": "x\\u005b", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
    b'{"inputs": [{"name": "\xff", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
    b'[{"inputs": []}]',
    b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}',
])
def test_any_other_shape_of_body_gets_the_general_paths_answer(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    _same(_parse(body, True, monkeypatch), _parse(body, False, monkeypatch))


def test_bracket_count_is_exact_up_to_its_limit() -> None:
    """The flatness check counts "[" with find() (memchr), stopping one past what it needs to know."""
    body = b'{"inputs":[{"data":[1,2,[3]],"name":"a[b"}]}'
    assert body.count(b"[") == 4
    assert [protocol._count_up_to(body, b"[", limit) for limit in (0, 1, 3, 4, 5, 100)] == [0, 1, 3, 4, 4, 4]
    assert protocol._count_up_to(b"", b"[", 5) == 0
    assert protocol._count_up_to(b"[" * 10_000, b"[", 3) == 3  # a body of brackets costs no more than needed
