"""Bad input: one line naming the problem, exit code 2, no traceback, no partial output."""

from pathlib import Path

import numpy as np
import pytest


def assert_clean_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert err.startswith("error:")
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_missing_model(cli, tmp_path: Path) -> None:
    assert_clean_error(cli("bench", tmp_path / "missing.onnx"), "model file not found")


def test_random_bytes_onnx(cli, tmp_path: Path) -> None:
    bad = tmp_path / "r.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    assert_clean_error(cli("bench", bad), "not a valid ONNX")


def test_truncated_onnx(cli, tmp_path: Path, digits_onnx: Path) -> None:
    bad = tmp_path / "t.onnx"
    bad.write_bytes(digits_onnx.read_bytes()[:3000])
    assert_clean_error(cli("eval", bad, "--data", tmp_path / "x.npz"), "not a valid ONNX")


def test_npz_without_x(cli, tmp_path: Path, digits_onnx: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, y=np.arange(4))
    assert_clean_error(cli("eval", digits_onnx, "--data", p), "no input arrays")


def test_data_shape_does_not_fit(cli, tmp_path: Path, digits_onnx: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 1, 28, 28), np.float32), y=np.arange(4))
    assert_clean_error(cli("eval", digits_onnx, "--data", p), "expects 1x32x32")


def test_data_dtype_does_not_fit(cli, tmp_path: Path, digits_onnx: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 1, 32, 32), np.uint8), y=np.arange(4))
    assert_clean_error(cli("eval", digits_onnx, "--data", p), "expects float32")


def test_unknown_device(cli, digits_onnx: Path) -> None:
    assert_clean_error(cli("bench", digits_onnx, "--device", "toaster"), "unknown device profile 'toaster'")


def test_threads_zero(cli, digits_onnx: Path) -> None:
    assert_clean_error(cli("bench", digits_onnx, "--threads", "0"), "--threads must be in [1, ")


@pytest.mark.parametrize("command", ["quantize", "prune", "adapt", "distill"])
def test_onnx_output_checks(cli, tmp_path: Path, digits_onnx: Path, command: str) -> None:
    args = {"quantize": [digits_onnx, "--mode", "dynamic"], "prune": ["m.py:f", "--sparsity", "0.5"],
            "adapt": ["m.py:f", "--data", tmp_path / "d.npz"],
            "distill": ["--teacher", digits_onnx, "--student", "squeezenet1_1", "--data", tmp_path / "d.npz"]}[command]
    assert_clean_error(cli(command, *args, "-o", tmp_path / "m.tflite"), "-o must name an .onnx file")
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    assert_clean_error(cli(command, *args, "-o", folder), f"-o {folder} is a directory")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert_clean_error(cli(command, *args, "-o", blocker / "m.onnx"), "is not writable")


def test_eval_without_labels_or_reference(cli, tmp_path: Path, digits_onnx: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 1, 32, 32), np.float32))
    assert_clean_error(cli("eval", digits_onnx, "--data", p), "no labels")


def test_no_partial_json_when_the_disk_fills_mid_write(cli, tmp_path: Path, monkeypatch) -> None:
    """The write itself fails halfway: the old file stays whole, no temp file is left, one line, exit 2."""
    import errno

    out = tmp_path / "out.json"
    out.write_text('{"previous": "run"}\n')
    real_write = Path.write_text

    def half_then_full(self: Path, text: str, *args, **kwargs) -> int:
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    result = cli("devices", "--json", out)
    monkeypatch.undo()
    assert_clean_error(result, f"cannot write {out}: No space left on device")
    assert out.read_text() == '{"previous": "run"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.slow
def test_subprocess_user_run_exit_codes(tmp_path: Path, digits_onnx: Path) -> None:
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "edgeopt", "bench", str(digits_onnx), "--runs", "5",
                         "--seconds", "0.01"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "edgeopt bench" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "edgeopt", "bench", str(tmp_path / "none.onnx")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: model file not found: {tmp_path / 'none.onnx'}"]
