from pathlib import Path

import numpy as np
import pytest

from edgeopt.data import Dataset, load_data, resize_images
from edgeopt.errors import DataError
from edgeopt.model import load_model


def test_npz_loads_x_and_y(digits_test_npz: Path) -> None:
    data = load_data(digits_test_npz)
    assert data.inputs["x"].shape[1:] == (1, 32, 32)
    assert data.inputs["x"].dtype == np.float32
    assert data.labels is not None and data.labels.dtype == np.int64
    assert len(data) == len(data.labels) == 539


def test_split_is_disjoint_and_stratified() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(200, dtype=np.float32).reshape(200, 1)
    y = rng.integers(0, 4, size=200)
    a, b = Dataset({"x": x}, y, "t").split(0.3, seed=1)
    ids_a, ids_b = set(a.inputs["x"][:, 0].tolist()), set(b.inputs["x"][:, 0].tolist())
    assert not ids_a & ids_b
    assert len(ids_a) + len(ids_b) == 200
    assert set(np.unique(a.labels)) == set(np.unique(b.labels)) == {0, 1, 2, 3}
    assert 50 <= len(a) <= 70


def test_split_without_labels_and_determinism() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    a1, _ = Dataset({"x": x}, None, "t").split(0.5, seed=3)
    a2, _ = Dataset({"x": x}, None, "t").split(0.5, seed=3)
    assert np.array_equal(a1.inputs["x"], a2.inputs["x"])
    assert len(a1) == 5


def test_npz_without_x(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, y=np.arange(3))
    with pytest.raises(DataError, match="no input arrays"):
        load_data(p)


def test_npz_unnamed_array(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, np.zeros((3, 2)))
    with pytest.raises(DataError, match="unnamed array"):
        load_data(p)


def test_corrupt_npz(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(p)


def test_shape_mismatch_names_both_shapes(tmp_path: Path, digits_onnx: Path) -> None:
    data = Dataset({"x": np.zeros((4, 3, 28, 28), np.float32)}, None, "d.npz")
    with pytest.raises(DataError, match=r"3x28x28 but model input 'input' expects 1x32x32"):
        data.feeds_for(load_model(digits_onnx))


def test_one_array_feeds_a_one_input_model_whatever_its_key(digits_onnx: Path) -> None:
    """A converter may rename the input (LiteRT: `serving_default_args_0`); one array still feeds it."""
    x = np.ones((4, 1, 32, 32), np.float32)
    model = load_model(digits_onnx)
    for key in ("x", "input", "serving_default_args_0"):
        fed = Dataset({key: x}, None, "d.npz").feeds_for(model).inputs
        assert list(fed) == ["input"] and np.array_equal(fed["input"], x)
    with pytest.raises(DataError, match="expects 1x32x32"):
        Dataset({"pixels": np.ones((4, 3, 8, 8), np.float32)}, None, "d.npz").feeds_for(model)


def test_dtype_mismatch(digits_onnx: Path) -> None:
    data = Dataset({"x": np.zeros((4, 1, 32, 32), np.uint8)}, None, "d.npz")
    with pytest.raises(DataError, match="uint8 but model input 'input' expects float32"):
        data.feeds_for(load_model(digits_onnx))


def test_float64_is_cast(digits_onnx: Path) -> None:
    data = Dataset({"x": np.zeros((4, 1, 32, 32), np.float64)}, None, "d.npz")
    assert data.feeds_for(load_model(digits_onnx)).inputs["input"].dtype == np.float32


def test_sklearn_digits_resized_like_the_example(digits_test_npz: Path) -> None:
    pytest.importorskip("sklearn")
    data = load_data("sklearn:digits", input_size=(1, 32, 32))
    assert data.inputs["x"].shape == (1797, 1, 32, 32)
    assert 0.0 <= data.inputs["x"].min() and data.inputs["x"].max() <= 1.0
    # the bundled test split is a subset of exactly these arrays
    test_x = np.load(digits_test_npz)["x"]
    assert any(np.array_equal(test_x[0], row) for row in data.inputs["x"][:1797])


def test_resize_bilinear_keeps_constant_images() -> None:
    x = np.full((2, 1, 8, 8), 0.25, np.float32)
    out = resize_images(x, (3, 32, 32))
    assert out.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_image_folder(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_data(tmp_path, input_size=(3, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert data.inputs["x"].shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(data.inputs["x"][0], -1.0, atol=1e-6)
    np.testing.assert_allclose(data.inputs["x"][-1], 1.0, atol=1e-6)


def test_image_folder_needs_input_size(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="--input-size"):
        load_data(tmp_path)
