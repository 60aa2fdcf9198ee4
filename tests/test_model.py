from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import ModelError
from edgeopt.model import load_model


def test_onnx_model_describes_io_size_and_hash(digits_onnx: Path) -> None:
    model = load_model(digits_onnx)
    assert model.format == "onnx"
    assert model.inputs[0].name == "input"
    assert model.inputs[0].shape[1:] == (1, 32, 32)
    assert isinstance(model.inputs[0].shape[0], str)  # dynamic batch
    assert model.inputs[0].dtype == "float32"
    assert model.outputs[0].shape[1:] == (10,)
    assert model.size_bytes == digits_onnx.stat().st_size
    assert len(model.sha256) == 64
    assert model.sha256 == load_model(digits_onnx).sha256


def test_metadata_roundtrips_through_save(tiny_onnx: Path, tmp_path: Path) -> None:
    model = load_model(tiny_onnx).with_metadata(runtime="onnxruntime", threads="1")
    saved = model.save(tmp_path / "m.onnx")
    again = load_model(saved.path)
    assert again.metadata == {"edgeopt.runtime": "onnxruntime", "edgeopt.threads": "1"}
    assert again.runtime_hint() == "onnxruntime"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_random_bytes_named_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a valid ONNX"):
        load_model(bad)


def test_truncated_onnx(tmp_path: Path, digits_onnx: Path) -> None:
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(digits_onnx.read_bytes()[:5000])
    with pytest.raises(ModelError, match="not a valid ONNX"):
        load_model(bad)


def test_pickled_module_refused_without_trust(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_bytes(b"whatever")
    with pytest.raises(ModelError, match="--trust-pickle"):
        load_model(f)


def test_unsupported_suffix(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported model file"):
        load_model(f)


class TestTorch:
    torch = pytest.importorskip("torch")

    def test_factory_with_weights_matches_onnx(self, digits_factory, digits_onnx, digits_test_npz) -> None:
        import onnxruntime as ort

        spec, weights = digits_factory
        model = load_model(spec, weights=weights)
        assert model.format == "torch"
        assert model.inputs[0].shape[1:] == (1, 32, 32)  # from INPUT_SHAPE in the factory file
        x = np.load(digits_test_npz)["x"][:16]
        with self.torch.no_grad():
            out = model.module(self.torch.from_numpy(x)).numpy()
        ref = ort.InferenceSession(str(digits_onnx)).run(None, {"input": x})[0]
        np.testing.assert_allclose(out, ref, atol=1e-4)

    def test_factory_that_raises(self, tmp_path: Path) -> None:
        f = tmp_path / "m.py"
        f.write_text("def build():\n    raise ValueError('bad width')\n")
        with pytest.raises(ModelError, match="raised ValueError: bad width"):
            load_model(f"{f}:build")

    def test_weights_that_do_not_match(self, tmp_path: Path, digits_factory) -> None:
        spec, _ = digits_factory
        w = tmp_path / "w.pt"
        self.torch.save({"features.0.0.weight": self.torch.zeros(3, 3)}, w)
        with pytest.raises(ModelError, match="do not match"):
            load_model(spec, weights=w)

    def test_pickled_object_in_weights_needs_trust(self, tmp_path: Path, digits_factory) -> None:
        spec, weights = digits_factory
        model = load_model(spec, weights=weights)
        w = tmp_path / "full.pt"
        self.torch.save(model.module, w)
        with pytest.raises(ModelError, match="--trust-pickle"):
            load_model(spec, weights=w)
        trusted = load_model(spec, weights=w, trust_pickle=True)
        assert trusted.format == "torch"

    def test_pt2_archive(self, tmp_path: Path, digits_factory) -> None:
        spec, weights = digits_factory
        model = load_model(spec, weights=weights)
        example = self.torch.zeros(1, 1, 32, 32)
        program = self.torch.export.export(model.module, (example,))
        path = tmp_path / "m.pt2"
        self.torch.export.save(program, str(path))
        loaded = load_model(path)
        assert loaded.format == "torch"
        assert loaded.inputs[0].shape[1:] == (1, 32, 32)
        with self.torch.no_grad():
            np.testing.assert_allclose(loaded.module(example).numpy(), model.module(example).numpy(), atol=1e-5)
