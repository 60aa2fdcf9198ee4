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

# On CI (CI=true) a skip that is not in tests/skip_policy.py's allowlist fails the run.
pytest_plugins = ["tests.skip_policy"]

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


def make_onnx_transformer(path: Path, *, hidden: int = 32, heads: int = 4, layers: int = 2, ffn: int = 64,
                          vocab: int = 100, max_len: int = 128, outlier: float = 12.0, seed: int = 0,
                          damage: float = 0.0) -> Path:
    """A tiny BERT-style encoder (random weights) as ONNX: ``input_ids``/``attention_mask`` (int64,
    dynamic batch and sequence) -> embeddings + LayerNorm -> ``layers`` x (self-attention with the
    padding mask, Add+LayerNorm, MatMul-Gelu(Erf)-MatMul, Add+LayerNorm) -> ``last_hidden_state``
    (batch, seq, hidden).

    Like real sentence encoders, the first token carries an ``outlier`` in one hidden dimension,
    so the argmax over the hidden state is the same for every input: top-1 agreement says
    nothing there. ``damage`` adds that much Gaussian noise (relative) to every weight of the
    layers, for a variant that keeps the argmax but not the outputs.
    """
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng(seed + 1000)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray, *, damaged: bool = False) -> str:
        value = value.astype(np.float32) if value.dtype.kind == "f" else value
        if damaged and damage:
            value = (value + damage * value.std() * noise.standard_normal(value.shape)).astype(np.float32)
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def dense(x: str, name: str, n_in: int, n_out: int) -> str:
        w = const(f"{name}.w", rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), damaged=True)
        b = const(f"{name}.b", 0.1 * rng.standard_normal(n_out), damaged=True)
        return node("Add", [node("MatMul", [x, w], f"{name}.mm"), b], f"{name}.out")

    def layer_norm(x: str, name: str) -> str:
        g = const(f"{name}.g", np.ones(hidden))
        b = const(f"{name}.beta", np.zeros(hidden))
        return node("LayerNormalization", [x, g, b], f"{name}.out", axis=-1, epsilon=1e-12)

    dh = hidden // heads
    const("shape_heads", np.array([0, 0, heads, dh], dtype=np.int64))
    const("shape_merge", np.array([0, 0, hidden], dtype=np.int64))
    const("scale", np.array(np.sqrt(dh)))
    const("one", np.array(1.0))
    const("neg", np.array(-10000.0))
    const("half", np.array(0.5))
    const("sqrt2", np.array(np.sqrt(2.0)))
    const("axes12", np.array([1, 2], dtype=np.int64))
    const("zero_i", np.array([0], dtype=np.int64))
    const("one_i", np.array([1], dtype=np.int64))
    const("minus1", np.array([-1], dtype=np.int64))
    word = node("Gather", [const("word_emb", rng.standard_normal((vocab, hidden))), "input_ids"], "word")
    seq = node("Shape", ["input_ids"], "ids_shape", start=1, end=2)
    positions = node("Range", [node("Squeeze", ["zero_i"], "zero_s"), node("Squeeze", [seq], "seq_s"),
                               node("Squeeze", ["one_i"], "one_s")], "positions")
    pos = node("Gather", [const("pos_emb", 0.5 * rng.standard_normal((max_len, hidden))), positions], "pos")
    x = layer_norm(node("Add", [word, pos], "emb"), "emb_ln")
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask_bias = node("Mul", [node("Sub", ["one", node("Unsqueeze", [mask_f, "axes12"], "mask_4d")], "mask_inv"),
                             "neg"], "mask_bias")
    for i in range(layers):
        def heads_of(t: str, name: str) -> str:
            return node("Transpose", [node("Reshape", [t, "shape_heads"], f"{name}.r")], f"{name}.t",
                        perm=[0, 2, 1, 3])

        q = heads_of(dense(x, f"l{i}.q", hidden, hidden), f"l{i}.qh")
        k = node("Transpose", [node("Reshape", [dense(x, f"l{i}.k", hidden, hidden), "shape_heads"], f"l{i}.kr")],
                 f"l{i}.kt", perm=[0, 2, 3, 1])
        v = heads_of(dense(x, f"l{i}.v", hidden, hidden), f"l{i}.vh")
        scores = node("Add", [node("Div", [node("MatMul", [q, k], f"l{i}.qk"), "scale"], f"l{i}.scaled"), mask_bias],
                      f"l{i}.masked")
        probs = node("Softmax", [scores], f"l{i}.probs", axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [probs, v], f"l{i}.ctx"), ], f"l{i}.ctxt",
                                    perm=[0, 2, 1, 3]), "shape_merge"], f"l{i}.ctxm")
        x = layer_norm(node("Add", [dense(ctx, f"l{i}.o", hidden, hidden), x], f"l{i}.res1"), f"l{i}.ln1")
        h = dense(x, f"l{i}.ffn1", hidden, ffn)
        erf = node("Erf", [node("Div", [h, "sqrt2"], f"l{i}.gdiv")], f"l{i}.erf")
        gelu = node("Mul", [node("Mul", [h, node("Add", [erf, "one"], f"l{i}.gadd")], f"l{i}.gmul"), "half"],
                    f"l{i}.gelu")
        x = layer_norm(node("Add", [dense(gelu, f"l{i}.ffn2", ffn, hidden), x], f"l{i}.res2"), f"l{i}.ln2")
    first = node("Unsqueeze", [node("Cast", [node("Equal", [positions, "zero_s"], "is_first")], "first_f",
                                    to=TensorProto.FLOAT), "minus1"], "first_col")
    spike = np.zeros(hidden)
    spike[0] = outlier
    x = node("Add", [x, node("Mul", [first, const("spike", spike)], "spike_at_first")], "with_spike")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        nodes, "tiny_bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_token_npz(path: Path, *, n: int = 60, seq: int = 16, vocab: int = 100, seed: int = 0) -> Path:
    """Token ids with padding (attention_mask 0 after each sample's length), no labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int64)
    lengths = rng.integers(seq // 3, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(path, input_ids=ids * mask, attention_mask=mask)
    return path


@pytest.fixture(scope="session")
def tiny_transformer(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny 2-layer BERT-style encoder .onnx, 60 padded token sequences .npz)."""
    root = tmp_path_factory.mktemp("tiny_transformer")
    return make_onnx_transformer(root / "encoder.onnx"), make_token_npz(root / "tokens.npz")


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


class RecordingTransport:
    """An asyncio transport stand-in that records what the client would receive, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"

