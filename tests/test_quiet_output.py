"""No third-party log line reaches the user before edgeopt's own one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"


@pytest.mark.slow
def test_adapt_memory_error_is_the_only_line_on_stderr(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeopt", "adapt", f"{EXAMPLE / 'digits_cnn.py'}:DigitsCNN",
         "--weights", str(EXAMPLE / "digits_cnn.pt"), "--data", str(EXAMPLE / "test.npz"),
         "-o", str(tmp_path / "out.onnx"), "--memory-mb", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3  # the memory budget cannot be met
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no strategy fits in --memory-mb 1"), proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_native_stderr_is_restored_after_the_block(capfd) -> None:
    import os

    from edgeopt.progress import native_stderr_silenced

    with native_stderr_silenced():
        os.write(2, b"native noise\n")
    os.write(2, b"ours\n")
    assert capfd.readouterr().err == "ours\n"
