"""The CLI bad-input sweep (issue #21): every command, every kind of broken model and data file.

Each case runs the command in-process as a user would and asserts what DESIGN promises for bad
input: exit code 2, one ``error:`` line on stderr, no traceback and no "internal error" (a bug).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest


def _onnx_truncated(folder: Path, digits_onnx: Path) -> Path:
    path = folder / "truncated.onnx"
    path.write_bytes(digits_onnx.read_bytes()[:5000])
    return path


BAD_MODELS = {
    "missing": lambda f, d: f / "missing.onnx",
    "random bytes .onnx": lambda f, d: _write(f / "random.onnx", np.random.default_rng(0).bytes(4096)),
    "empty .onnx": lambda f, d: _write(f / "empty.onnx", b""),
    "truncated .onnx": _onnx_truncated,
    "directory": lambda f, d: _mkdir(f / "folder.onnx"),
    "random bytes .pt2": lambda f, d: _write(f / "random.pt2", np.random.default_rng(1).bytes(2048)),
    "zip that is no .pt2": lambda f, d: _zip(f / "plain.pt2", {"a.txt": b"hello"}),
    "random bytes .tflite": lambda f, d: _write(f / "random.tflite", b"TFL3" + np.random.default_rng(2).bytes(512)),
    "pickled .pt": lambda f, d: _write(f / "model.pt", b"\x80\x04K\x01."),
    "unknown suffix": lambda f, d: _write(f / "model.bin", b"\x00" * 16),
    "python file without factory": lambda f, d: _write(f / "net.py", b"x = 1\n"),
    "factory that is missing": lambda f, d: _write(f / "net2.py", b"x = 1\n").with_name("net2.py:build"),
    "factory that raises": lambda f, d: _write(f / "net3.py", b"def build():\n    raise ValueError('no')\n"
                                                                  ).with_name("net3.py:build"),
    "factory returning no module": lambda f, d: _write(f / "net4.py", b"def build():\n    return 3\n"
                                                                         ).with_name("net4.py:build"),
}

BAD_DATA = {
    "missing": lambda f: f / "missing.npz",
    "random bytes .npz": lambda f: _write(f / "random.npz", np.random.default_rng(3).bytes(4096)),
    "empty .npz file": lambda f: _write(f / "empty.npz", b""),
    "npz without x": lambda f: _savez(f / "nox.npz", y=np.arange(4)),
    "npz of objects": lambda f: _zip(f / "obj.npz", {"x.npy": _npy_bytes(np.array([{"a": 1}], dtype=object))}),
    "wrong sample shape": lambda f: _savez(f / "shape.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.arange(4)),
    "NaN inputs": lambda f: _savez(f / "nan.npz", x=np.full((4, 1, 32, 32), np.nan, np.float32), y=np.arange(4)),
    "2-D labels": lambda f: _savez(f / "y2d.npz", x=np.zeros((4, 1, 32, 32), np.float32), y=np.zeros((4, 2))),
    "string labels": lambda f: _savez(f / "ystr.npz", x=np.zeros((4, 1, 32, 32), np.float32), y=np.array(list("abcd"))),
    "zero samples": lambda f: _savez(f / "zero.npz", x=np.zeros((0, 1, 32, 32), np.float32), y=np.zeros(0, np.int64)),
    "labels and samples disagree": lambda f: _savez(f / "len.npz", x=np.zeros((4, 1, 32, 32), np.float32),
                                                    y=np.arange(7)),
    "text data for an image model": lambda f: _write(f / "t.jsonl", b'{"text": "a", "label": 0}\n'),
    "folder without classes": lambda f: _mkdir(f / "images"),
    "unknown built-in": lambda f: "sklearn:imagenet",
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _savez(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def model_commands(model: str, data: Path, out: Path) -> dict[str, list[str]]:
    recipe = out.parent / "recipe.json"
    recipe.write_text(json.dumps({"name": "fp16", "steps": [{"type": "Fp16", "version": 1, "fields": {}}]}))
    return {
        "bench": ["bench", model, "--runs", "2", "--seconds", "0"],
        "eval": ["eval", model, "--data", data],
        "eval --reference": ["eval", str(data.parent / "good.onnx"), "--data", data, "--reference", model],
        "quantize": ["quantize", model, "-o", out, "--mode", "dynamic"],
        "analyze": ["analyze", model, "--data", data],
        "prune": ["prune", model, "-o", out, "--sparsity", "0.5", "--no-latency"],
        "export": ["export", model, "--to", "onnx", "-o", out],
        "export tflite": ["export", model, "--to", "tflite", "-o", out.with_suffix(".tflite"), "--no-bench"],
        "apply": ["apply", model, recipe, "-o", out],
        "optimize": ["optimize", model, "--data", data, "-o", out.parent / "opt"],
        "split": ["split", model, "--devices", "host,host", "-o", out.parent / "split"],
        "adapt": ["adapt", model, "--data", data, "-o", out],
        "distill": ["distill", "--teacher", model, "--student", "squeezenet1_1", "--data", data, "-o", out],
        "serve": ["serve", model, "--port", "0"],
    }


def data_commands(model: Path, factory: str, weights: Path, data: str, out: Path) -> dict[str, list[str]]:
    return {
        "bench --data": ["bench", model, "--data", data, "--runs", "2", "--seconds", "0"],
        "eval": ["eval", model, "--data", data],
        "quantize static": ["quantize", model, "-o", out, "--mode", "static", "--data", data],
        "quantize --eval-data": ["quantize", model, "-o", out, "--mode", "dynamic", "--eval-data", data],
        "analyze": ["analyze", model, "--data", data],
        "prune": ["prune", factory, "--weights", weights, "-o", out, "--sparsity", "0.3", "--data", data,
                  "--epochs", "1", "--no-latency"],
        "export --data": ["export", factory, "--weights", weights, "--to", "onnx", "-o", out, "--data", data],
        "optimize": ["optimize", model, "--data", data, "-o", out.parent / "opt"],
        "adapt": ["adapt", factory, "--weights", weights, "--data", data, "-o", out],
        "distill": ["distill", "--teacher", model, "--student", "squeezenet1_1", "--data", data, "-o", out],
    }


def assert_bad_input(result, what: str) -> None:
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err, (what, err)
    assert "internal error" not in err, (what, err)
    assert result.exit_code == 2, (what, result.exit_code, result.output)
    assert err.startswith("error:") and len(err.splitlines()) == 1, (what, err)


@pytest.mark.slow
@pytest.mark.parametrize("bad", list(BAD_MODELS))
def test_every_command_with_a_broken_model(cli, tmp_path: Path, digits_onnx: Path, digits_test_npz: Path,
                                           bad: str) -> None:
    import shutil

    shutil.copy(digits_onnx, tmp_path / "good.onnx")
    shutil.copy(digits_test_npz, tmp_path / "d.npz")
    model = str(BAD_MODELS[bad](tmp_path, digits_onnx))
    for name, args in model_commands(model, tmp_path / "d.npz", tmp_path / "out.onnx").items():
        assert_bad_input(cli(*args), f"{name} with {bad}")
        assert not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad", list(BAD_DATA))
def test_every_command_with_broken_data(cli, tmp_path: Path, digits_onnx: Path, digits_factory, bad: str) -> None:
    data = str(BAD_DATA[bad](tmp_path))
    spec, weights = digits_factory
    for name, args in data_commands(digits_onnx, spec, weights, data, tmp_path / "out.onnx").items():
        assert_bad_input(cli(*args), f"{name} with {bad}")
        assert not (tmp_path / "out.onnx").exists()


BAD_RECIPES = {
    "random bytes": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
    "empty": b"",
    "a list": b"[]",
    "steps not a list": b'{"name": "x", "steps": "abc"}',
    "unknown config": b'{"name": "x", "steps": [{"type": "Nope", "version": 1, "fields": {}}]}',
    "unknown field": b'{"name": "x", "steps": [{"type": "Fp16", "version": 1, "fields": {"bogus": 1}}]}',
    "field of the wrong type": b'{"name": "x", "steps": [{"type": "StaticInt8", "version": 1, "fields": {"samples": "many"}}]}',
    "step not an object": b'{"name": "x", "steps": [3]}',
    "no name": b'{"steps": []}',
}


@pytest.mark.slow
@pytest.mark.parametrize("bad", list(BAD_RECIPES))
def test_apply_and_optimize_with_broken_recipes(cli, tmp_path: Path, digits_onnx: Path, digits_test_npz: Path,
                                                bad: str) -> None:
    recipe = _write(tmp_path / "recipe.json", BAD_RECIPES[bad])
    assert_bad_input(cli("apply", digits_onnx, recipe, "-o", tmp_path / "o.onnx", "--data", digits_test_npz),
                     f"apply with {bad}")
    text = BAD_RECIPES[bad]
    listed = _write(tmp_path / "recipes.json", b"[" + text + b"]" if text.startswith(b"{") else text)
    assert_bad_input(cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "opt",
                         "--recipes", listed), f"optimize with {bad}")
    assert not (tmp_path / "o.onnx").exists()


BAD_PLANS = {
    "no plan.json": None,
    "garbage plan": b"{{{",
    "stages not a list": b'{"stages": 3, "link": {"mbps": 10}}',
    "no stages": b'{"stages": [], "link": {"mbps": 10}}',
    "stage file missing": b'{"stages": [{"path": "stage_9.onnx"}], "link": {"mbps": 10}}',
    "link speed is text": b'{"stages": [{"path": "stage_0.onnx"}], "link": {"mbps": "fast"}}',
    "stage outside the folder": b'{"stages": [{"path": "../good.onnx"}], "link": {"mbps": 10}}',
    "stage is a factory": b'{"stages": [{"path": "stage_0.py:build"}], "link": {"mbps": 10}}',
    "plan is a list": b"[1, 2]",
}


@pytest.mark.slow
@pytest.mark.parametrize("bad", list(BAD_PLANS))
def test_split_run_with_broken_plans(cli, tmp_path: Path, digits_onnx: Path, bad: str) -> None:
    import shutil

    shutil.copy(digits_onnx, tmp_path / "good.onnx")
    folder = _mkdir(tmp_path / "split")
    shutil.copy(digits_onnx, folder / "stage_0.onnx")
    if BAD_PLANS[bad] is not None:
        _write(folder / "plan.json", BAD_PLANS[bad])
    assert_bad_input(cli("split", "run", folder, "--items", "2", "--timeout", "20"), f"split run with {bad}")


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"{{{", b"- a\n- b\n", b"name: x\nthreads: lots\n", b"\x00\x01\x02"])
def test_broken_device_profile(cli, tmp_path: Path, digits_onnx: Path, content: bytes) -> None:
    profile = _write(tmp_path / "dev.yaml", content)
    assert_bad_input(cli("bench", digits_onnx, "--device", profile, "--runs", "2", "--seconds", "0"),
                     f"device profile {content!r}")
