"""edgeopt export: verified PyTorch -> ONNX, and PyTorch/ONNX/TFLite -> .tflite variants (LiteRT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeopt.fileio import report_path

pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")

from edgeopt.data import load_data  # noqa: E402
from edgeopt.errors import BadInput  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.transforms.tflite import TfliteExport, export_tflite, to_tflite  # noqa: E402

NET = '''
import torch

INPUT_SHAPE = (1, 1, 16, 16)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def build():
    return Net()


class Det(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.det(x.reshape(-1, 16, 16))


def bad():
    return Det()
'''


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A small CNN factory with seeded weights, and calibration data labelled with its own predictions."""
    import torch

    root = tmp_path_factory.mktemp("export_net")
    (root / "net.py").write_text(NET)
    model = load_model(f"{root / 'net.py'}:build")
    torch.manual_seed(0)
    module = model.module
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.save(module.state_dict(), root / "w.pt")
    x = np.random.default_rng(3).random((48, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        y = module(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(root / "cal.npz", x=x, y=y)
    return {"root": root, "spec": f"{root / 'net.py'}:build", "bad": f"{root / 'net.py'}:bad",
            "weights": root / "w.pt", "cal": root / "cal.npz"}


@pytest.fixture(scope="module")
def variants(net):
    model = load_model(net["spec"], weights=net["weights"])
    return model, export_tflite(model, [TfliteExport(m) for m in ("none", "dynamic", "int8", "fp16")],
                                data=load_data(net["cal"]))


# -- ONNX ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_export(net, tmp_path_factory: pytest.TempPathFactory):
    """``edgeopt export --to onnx`` run once, as a user runs it: (result, output path)."""
    from typer.testing import CliRunner

    from edgeopt.cli import app

    out = tmp_path_factory.mktemp("onnx_out") / "net.onnx"
    result = CliRunner().invoke(app, ["export", net["spec"], "--weights", str(net["weights"]), "--to", "onnx",
                                      "-o", str(out)], catch_exceptions=False)
    return result, out


def test_export_onnx_cli_verified_dynamic_batch(onnx_export, net) -> None:
    import onnxruntime as ort
    import torch

    result, out = onnx_export
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path(out).read_text())
    assert report["check"]["max_abs_diff"] <= 1e-4
    assert report["check"]["cosine"] > 0.99999
    assert report["dynamic_batch"] is True and report["size_bytes"] == out.stat().st_size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    x = np.random.default_rng(0).random((5, 1, 16, 16)).astype(np.float32)
    module = load_model(net["spec"], weights=net["weights"]).module
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], want, atol=1e-4)


def test_verify_export_rejects_a_mismatch(onnx_export, net) -> None:
    import torch

    from edgeopt.transforms.export import verify_export

    _, out = onnx_export
    exported = load_model(out)
    model = load_model(net["spec"], weights=net["weights"])
    feeds = {"input": np.random.default_rng(1).random((3, 1, 16, 16)).astype(np.float32)}
    assert verify_export(model, exported, feeds, atol=1e-4).max_abs_diff <= 1e-4
    with torch.no_grad():
        model.module.head.bias.add_(0.01)  # the PyTorch model drifts from the exported file
    with pytest.raises(BadInput, match=r"does not match PyTorch: max abs diff 0.01 > tolerance"):
        verify_export(model, exported, feeds, atol=1e-4)


def test_export_onnx_static_batch_and_opset(cli, net, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "static.onnx"
    result = cli("export", net["spec"], "--weights", net["weights"], "--to", "onnx", "-o", out,
                 "--static-batch", "--opset", "18")
    assert result.exit_code == 0, result.stderr
    proto = onnx.load(out)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert json.loads(report_path(out).read_text())["opset"] == 18


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "coreml", "-o", "x.onnx"], "--to must be one of onnx, tflite"),
    (["--to", "onnx", "-o", "x.tflite"], "--out must end in .onnx"),
    (["--to", "tflite", "-o", "x.tflite", "--quantize", "int4"], "--quantize takes"),
    (["--to", "tflite", "-o", "x.tflite", "--quantize", "int8"], "needs calibration data"),
])
def test_export_bad_flags_one_line_exit_2(cli, net, tmp_path: Path, args: list[str], message: str) -> None:
    args = [a if not a.startswith("x.") else str(tmp_path / a) for a in args]
    result = cli("export", net["spec"], "--weights", net["weights"], *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_export_onnx_refuses_onnx_input(cli, tiny_onnx: Path, tmp_path: Path) -> None:
    result = cli("export", tiny_onnx, "--to", "onnx", "-o", tmp_path / "again.onnx")
    assert result.exit_code == 2 and "already onnx" in result.stderr


# -- TFLite -------------------------------------------------------------------------------------
def test_tflite_variants_fidelity_and_size(variants) -> None:
    _, results = variants
    by_mode = {check.quantize: (model, check) for model, check in results}
    fp32 = by_mode["none"][0].size_bytes
    assert by_mode["none"][1].cosine > 0.99999 and by_mode["none"][1].max_abs_diff < 1e-3
    assert by_mode["fp16"][1].cosine > 0.9999
    assert by_mode["dynamic"][1].cosine > 0.98 and by_mode["int8"][1].cosine > 0.98
    assert by_mode["dynamic"][0].size_bytes < 0.35 * fp32
    assert by_mode["int8"][0].size_bytes < 0.35 * fp32
    assert 0.4 * fp32 < by_mode["fp16"][0].size_bytes < 0.65 * fp32
    assert all(check.reference == "pytorch" and check.samples == 16 for _, check in results)


def test_tflite_int8_has_integer_io_but_float_interface(variants, net) -> None:
    from ai_edge_litert.interpreter import Interpreter

    _, results = variants
    int8 = next(m for m, c in results if c.quantize == "int8")
    raw = Interpreter(model_content=int8.serialized()).get_input_details()[0]
    assert raw["dtype"] == np.int8 and raw["quantization"][0] > 0
    assert int8.inputs[0].dtype == "float32"  # callers pass float32; the LiteRT session quantizes
    from edgeopt.measure.evaluate import evaluate

    result = evaluate(int8, load_data(net["cal"]), threads=1)
    assert result.accuracy >= 0.9  # labels are the float model's own predictions


def test_tflite_int8_without_data_is_bad_input(net) -> None:
    model = load_model(net["spec"], weights=net["weights"])
    with pytest.raises(BadInput, match="needs calibration data"):
        to_tflite(model, TfliteExport("int8"))


def test_tflite_unsupported_op_is_named(cli, net, tmp_path: Path) -> None:
    out = tmp_path / "bad.tflite"
    result = cli("export", net["bad"], "--to", "tflite", "-o", out, "--data", net["cal"])
    assert result.exit_code == 2
    assert "no lowering for operator" in result.stderr and "linalg_det" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_tflite_config_validates() -> None:
    with pytest.raises(BadInput, match="--quantize must be one of"):
        TfliteExport("int4")
    with pytest.raises(BadInput, match="calibration_samples"):
        TfliteExport("int8", calibration_samples=0)
    assert TfliteExport("int8").cosine_floor == 0.98 and TfliteExport("fp16").cosine_floor == 0.999


def test_tflite_quantize_existing_float_tflite(variants, tmp_path: Path) -> None:
    fp32 = variants[1][0][0].save(tmp_path / "fp32.tflite")
    dyn, check = to_tflite(load_model(tmp_path / "fp32.tflite"), TfliteExport("dynamic"))
    assert check.reference == "float tflite" and check.cosine > 0.98
    assert dyn.size_bytes < 0.35 * fp32.size_bytes


def test_tflite_cosine_floor_is_enforced(variants, tmp_path: Path) -> None:
    fp32 = load_model(variants[1][0][0].save(tmp_path / "fp32.tflite").path)
    with pytest.raises(BadInput, match=r"does not match float tflite: cosine .* < 1"):
        to_tflite(fp32, TfliteExport("dynamic", min_cosine=1.0, verify_samples=4))


@pytest.mark.slow
def test_export_tflite_cli_variants_timed(cli, net, tmp_path: Path) -> None:
    out = tmp_path / "net.tflite"
    result = cli("export", net["spec"], "--weights", net["weights"], "--to", "tflite", "-o", out,
                 "--quantize", "none,dynamic", "--seconds", "0.1", "--runs", "10",
                 "--threads", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path(out).read_text())
    rows = {r["quantize"]: r for r in report["variants"]}
    assert set(rows) == {"none", "dynamic"}
    for mode, row in rows.items():
        path = tmp_path / f"net_{mode}.tflite"
        assert row["output"] == str(path) and path.stat().st_size == row["size_bytes"]
        assert row["latency_ms"]["p50"] > 0 and row["bench"]["runtime"] == "litert"
        assert row["bench"]["threads"] == 1 and row["bench"]["runs"] >= 10
    assert rows["dynamic"]["size_vs_first"] < 0.35 and rows["none"]["speedup_vs_first"] == 1.0
    assert rows["dynamic"]["speedup_vs_first"] == pytest.approx(
        rows["none"]["latency_ms"]["p50"] / rows["dynamic"]["latency_ms"]["p50"])
    assert rows["dynamic"]["check"]["cosine"] >= 0.98
    assert not out.exists()  # several variants: one file each, named by mode


def test_quantizer_progress_bar_is_silenced_during_calibration_only() -> None:
    """ai-edge-quantizer's own tqdm bar would print beside edgeopt's; the override is undone after."""
    pytest.importorskip("ai_edge_quantizer")
    from ai_edge_quantizer.utils import progress_utils

    from edgeopt.transforms.tflite import _quiet_calibration

    before = progress_utils.ProgressBar
    with _quiet_calibration():
        with progress_utils.ProgressBar(500, "Running Calibration:") as bar:
            assert bar._progress_bar.disable
    assert progress_utils.ProgressBar is before
    with progress_utils.ProgressBar(500, "x", enable=True) as bar:
        assert not bar._progress_bar.disable
