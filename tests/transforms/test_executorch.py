"""ExecuTorch: export to .pte (FP32 / INT8, XNNPACK), the delegation report, the runtime through the harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgeopt.data import load_data  # noqa: E402
from edgeopt.errors import BadInput, DataError, ModelError  # noqa: E402
from edgeopt.fileio import report_path  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.runtimes import runtime_for  # noqa: E402
from edgeopt.runtimes.executorch import ExecutorchRuntime  # noqa: E402
from edgeopt.transforms.executorch import ExecutorchExport, to_executorch  # noqa: E402

# The global average pool as mean over (2, 3) without keepdim is an op XNNPACK does not take:
# it stays on ExecuTorch's portable kernels, which the report must name.
NET = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture(scope="module")
def et(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """The net (no INPUT_SHAPE: --input-shape gives it), its data, and FP32 .pte exported by the CLI."""
    from typer.testing import CliRunner

    from edgeopt.cli import app

    root = tmp_path_factory.mktemp("executorch")
    (root / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.standard_normal((48, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, size=48))
    spec = f"{root / 'net.py'}:build"
    out = root / "net.pte"
    result = CliRunner().invoke(app, ["export", spec, "--to", "executorch", "-o", str(out),
                                      "--input-shape", "1x1x16x16"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return {"root": root, "spec": spec, "data": root / "data.npz", "fp32": out, "stderr": result.stderr}


def _torch_out(spec: str, x: np.ndarray) -> np.ndarray:
    import torch

    module = load_model(spec).module
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_cli_fp32_export_is_verified_and_names_the_portable_op(et) -> None:
    report = json.loads(report_path(et["fp32"]).read_text())
    assert report["to"] == "executorch" and report["quantize"] == "none" and report["batch"] == 1
    assert report["check"]["cosine"] > 0.99999 and report["check"]["max_abs_diff"] < 1e-4
    deleg = report["check"]["delegation"]
    assert deleg["delegated_nodes"] >= 6 and deleg["delegated_ops"]["aten.convolution.default"] == 2
    assert deleg["portable_nodes"] == 1 and deleg["portable_ops"] == {"aten.mean.dim": 1}
    assert deleg["portable_node_names"][0]["op"] == "aten.mean.dim"
    # the pre-check ran first and warned about the fallback; its report is kept
    assert report["operator_check"]["verdict"] == "fallback" and "aten.mean.dim" in et["stderr"]
    assert report["inputs"][0]["shape"] == [1, 1, 16, 16]


@pytest.mark.slow
def test_session_matches_pytorch_and_splits_batches(et) -> None:
    model = load_model(et["fp32"])
    assert model.format == "executorch" and runtime_for(model).name == "executorch"
    session = ExecutorchRuntime().load(model, threads=1)
    assert session.details == {"delegate_calls": {"XnnpackBackend": 2},
                               "portable_kernel_calls": {"aten.mean.out": 1}, "threads": 1}
    # the pool is process-wide and bound at load: a second size while this program lives is refused
    with pytest.raises(BadInput, match="load every .pte in one process with the same --threads"):
        ExecutorchRuntime().load(model, threads=2)
    assert ExecutorchRuntime().load(model, threads=None).details["threads"] == 1
    x = np.random.default_rng(1).standard_normal((5, 1, 16, 16)).astype(np.float32)
    batched = session.run({"input": x})[0]
    assert batched.shape == (5, 10)
    np.testing.assert_allclose(batched, _torch_out(et["spec"], x), atol=1e-4)
    with pytest.raises(DataError, match="exported for"):
        session.run({"input": x[:, :, :8]})
    with pytest.raises(DataError, match="missing input"):
        session.run({"other": x})


@pytest.mark.slow
def test_int8_export_is_smaller_and_close(et) -> None:
    model = load_model(et["spec"], input_shape=(1, 1, 16, 16))
    int8, check = to_executorch(model, ExecutorchExport("int8"), data=load_data(et["data"]))
    assert check.cosine > 0.98 and check.samples == 16
    ops = check.delegation.delegated_ops
    assert ops["quantized_decomposed.dequantize_per_channel.default"] >= 3  # conv + linear weights per channel
    assert int8.size_bytes < 0.6 * load_model(et["fp32"]).size_bytes
    out = ExecutorchRuntime().load(int8, threads=2).run({"input": load_data(et["data"]).inputs["x"][:4]})[0]
    ref = _torch_out(et["spec"], load_data(et["data"]).inputs["x"][:4])
    cos = np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.97


@pytest.mark.slow
def test_bench_and_eval_take_pte(cli, et, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = cli("bench", et["fp32"], "--runs", "5", "--seconds", "0", "--threads", "1", "--json", out)
    assert result.exit_code == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["runtime"] == "executorch" and payload["format"] == "executorch"
    assert payload["runs"] >= 5 and payload["latency_ms"]["p50"] > 0
    assert payload["runtime_details"]["delegate_calls"] == {"XnnpackBackend": 2}
    result = cli("eval", et["fp32"], "--data", et["data"], "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    want = _torch_out(et["spec"], load_data(et["data"]).inputs["x"]).argmax(1)
    assert ev["n"] == 48 and ev["accuracy"] == pytest.approx(float(np.mean(want == load_data(et["data"]).labels)))


@pytest.mark.parametrize(("args", "message"), [
    (["--quantize", "int8"], "needs calibration data"),
    (["--quantize", "dynamic"], "--quantize for executorch must be one of none, int8"),
    (["--input-shape", "1xax16"], "--input-shape takes dimensions"),
    (["--input-shape", "16"], "needs a batch and at least one more"),
])
def test_bad_flags_one_line_exit_2(cli, et, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "x.pte"
    result = cli("export", et["spec"], "--to", "executorch", "-o", out, "--input-shape", "1x1x16x16",
                 "--no-check", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_wrong_suffix_and_corrupt_pte(cli, tmp_path: Path) -> None:
    result = cli("export", "x.py:build", "--to", "executorch", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "--out must end in .pte" in result.stderr
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program" * 10)
    with pytest.raises(ModelError, match="not a valid ExecuTorch program"):
        load_model(bad)


def test_onnx_export_takes_input_shape_without_data(cli, et, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = cli("export", et["spec"], "--to", "onnx", "-o", out, "--input-shape", "1x1x16x16")
    assert result.exit_code == 0, result.stderr
    onnx_model = load_model(out)
    assert onnx_model.inputs[0].shape[1:] == (1, 16, 16)
    assert json.loads(report_path(out).read_text())["operator_check"]["verdict"] == "deploys"
    result = cli("export", et["spec"], "--to", "onnx", "-o", tmp_path / "n.onnx")
    assert result.exit_code == 2 and "--input-shape" in result.stderr


def test_config_validates_and_round_trips() -> None:
    from edgeopt.transforms.config import config_from_dict, config_to_dict

    with pytest.raises(BadInput, match="must be one of none, int8"):
        ExecutorchExport("fp16")
    with pytest.raises(BadInput, match="calibration_samples"):
        ExecutorchExport("int8", calibration_samples=0)
    cfg = ExecutorchExport("int8", per_channel=False)
    assert config_from_dict(config_to_dict(cfg)) == cfg and cfg.cosine_floor == 0.98


@pytest.mark.slow
def test_optimize_target_executorch_ends_in_pte(cli, et, tmp_path: Path) -> None:
    from edgeopt.search.recipe import Recipe

    (tmp_path / "net.py").write_text(NET + "\nINPUT_SHAPE = (1, 1, 16, 16)\n")
    recipes = tmp_path / "recipes.json"
    recipes.write_text(json.dumps([Recipe("executorch-int8-pertensor", (ExecutorchExport("int8", per_channel=False),),
                                          runtime="executorch", needs=("torch", "calibration")).to_dict()]))
    out = tmp_path / "opt"
    result = cli("optimize", f"{tmp_path / 'net.py'}:build", "--data", et["data"], "-o", out, "--target", "executorch",
                 "--recipes", recipes,
                 "--objective", "size", "--metric", "agreement", "--max-drop", "0.3", "--min-cosine", "0.9",
                 "--seconds", "0.2", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "executorch" and report["model"] == str(out / "model.pte")
    assert report["baseline"]["runtime"] == "executorch"  # judged against the FP32 .pte, not ONNX Runtime
    cand = report["candidates"][0]
    assert cand["runtime"] == "executorch" and cand["size_ratio"] > 1.5 and report["chosen"] == cand["name"]
    assert any(n.startswith("operator check: executorch:") for n in report["notes"])
    chosen = load_model(out / "model.pte")
    assert chosen.format == "executorch" and chosen.size_bytes == cand["size_bytes"]
    assert not (out / "model.onnx").exists()


def test_optimize_target_stops_on_the_operator_check(cli, tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    (tmp_path / "inv.py").write_text("import torch\nINPUT_SHAPE = (1, 4, 4)\n\nclass Inv(torch.nn.Module):\n"
                                     "    def forward(self, x):\n        return torch.linalg.inv(x + 4 * torch.eye(4))"
                                     ".flatten(1)\n\ndef build():\n    return Inv()\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 4, 4)).astype(np.float32), y=rng.integers(0, 4, 40))
    result = cli("optimize", f"{tmp_path / 'inv.py'}:build", "--data", tmp_path / "d.npz", "-o", tmp_path / "o",
                 "--target", "tflite")
    assert result.exit_code == 2
    assert "optimize stopped before building candidates" in result.stderr and "linalg_inv_ex" in result.stderr
    assert not (tmp_path / "o" / "model.tflite").exists()
    result = cli("optimize", f"{tmp_path / 'inv.py'}:build", "--data", tmp_path / "d.npz", "-o", tmp_path / "o",
                 "--target", "coreml")
    assert result.exit_code == 2 and "--target must be one of onnx, executorch, tflite" in result.stderr


@pytest.mark.slow
def test_serve_takes_pte(et) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from edgeopt.serve import ServeConfig, create_app, load_served

    served = load_served([str(et["fp32"])], threads=1, max_batch=4)
    x = np.random.default_rng(3).standard_normal((1, 1, 16, 16)).astype(np.float32)
    with TestClient(create_app(served, ServeConfig(max_batch=4, max_delay_ms=2))) as client:
        meta = client.get("/v2/models/net").json()
        assert meta["platform"] == "executorch_executorch" and meta["parameters"]["max_batch_size"] == 1
        r = client.post("/v2/models/net/infer", json={"inputs": [
            {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert r.status_code == 200
    out = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(out, _torch_out(et["spec"], x), atol=1e-4)


@pytest.mark.slow
def test_check_reads_what_a_pte_executes(et) -> None:
    from edgeopt.check import check

    report = check(load_model(et["fp32"]), ["executorch"])
    target = report.targets[0]
    assert report.exit_code == 3 and target.verdict == "fallback"
    assert [(o.op, o.count) for o in target.by_status("fallback")] == [("aten.mean.out", 1)]
    assert [(o.op, o.count) for o in target.by_status("delegated")] == [("XnnpackBackend delegate", 2)]
