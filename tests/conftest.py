"""Shared fixtures: the bundled digits example, tiny ONNX models built in-process, a CLI runner.

Everything here is built in well under a second; models that need torch live in the test
modules that need them (they import torch lazily via pytest.importorskip).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_onnx() -> Path:
    """The bundled digits CNN (ONNX, dynamic batch, input 'input' 1x32x32)."""
    return EXAMPLE / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_test_npz() -> Path:
    return EXAMPLE / "test.npz"


@pytest.fixture(scope="session")
def digits_train_npz() -> Path:
    return EXAMPLE / "train.npz"


@pytest.fixture(scope="session")
def digits_factory() -> tuple[str, Path]:
    """(``file.py:factory`` spec, state_dict path) of the bundled digits CNN."""
    return f"{EXAMPLE / 'digits_cnn.py'}:DigitsCNN", EXAMPLE / "digits_cnn.pt"


def make_onnx_cnn(path: Path, *, channels: int = 8, classes: int = 10, size: int = 16,
                  batch: int | str = "batch", seed: int = 0) -> Path:
    """A tiny Conv-Relu-GlobalAveragePool-Gemm classifier with random weights, written to ``path``."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.standard_normal((classes, channels)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializer=[w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    return make_onnx_cnn(tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.standard_normal((40, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, size=40))
    return path


@pytest.fixture
def cli():
    """Run the CLI in-process like a user would; returns the click Result."""
    from typer.testing import CliRunner

    from edgeopt.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


# -- edgeopt serve subprocesses (test_serve_process.py, test_split_remote.py) ----------------------
class Server:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"127.0.0.1:{port}"


def start_server(*args: str, timeout: float = 60.0) -> Server:
    """Start ``edgeopt serve ... --port 0`` and wait until it is ready; the port is read from stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeopt", "serve", *args, "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    port = int(line.split("http://127.0.0.1:")[1].split()[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return Server(proc, port)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server never became ready")


def stop(server: Server) -> tuple[int, str]:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        _, err = server.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        _, err = server.proc.communicate()
    return server.proc.returncode, err
