"""edgeopt check: per-target operator coverage with node names; exit 0 deploys, 3 fallbacks, 2 cannot export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeopt.check import TARGETS, check, parse_targets
from edgeopt.errors import BadInput
from edgeopt.model import load_model

NETS = '''
import torch

INPUT_SHAPE = (1, 1, 16, 16)


class Pooled(torch.nn.Module):
    """Conv + global mean without keepdim: every runtime runs it; XNNPACK leaves the mean outside."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Inverse(torch.nn.Module):
    """torch.linalg.inv: no TFLite lowering, no ONNX function."""

    def forward(self, x):
        m = x[:, 0, :4, :4] + 4 * torch.eye(4)
        return torch.linalg.inv(m).flatten(1)


def pooled():
    torch.manual_seed(0)
    return Pooled()


def inverse():
    return Inverse()
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("check")
    (root / "nets.py").write_text(NETS)
    return {"pooled": f"{root / 'nets.py'}:pooled", "inverse": f"{root / 'nets.py'}:inverse", "root": str(root)}


def test_onnx_file_deploys_on_onnxruntime_exit_0(cli, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    result = cli("check", tiny_onnx, "--target", "onnxruntime", "--json", out)
    assert result.exit_code == 0, result.stderr
    payload = json.loads(out.read_text())
    ort = payload["targets"][0]
    assert payload["exit_code"] == 0 and ort["verdict"] == "deploys"
    assert ort["node_counts"]["native"] == len(load_model(tiny_onnx).onnx.graph.node)
    assert {o["op"] for o in ort["ops"]} >= {"Conv", "Relu"}


def test_onnx_op_without_a_cpu_kernel_is_named_exit_2(cli, tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tiny_onnx))
    node = proto.graph.node[0]
    node.op_type, node.domain, node.name = "Frobnicate", "com.example", "my_frob"
    proto.opset_import.add(domain="com.example", version=1)
    bad = tmp_path / "custom.onnx"
    onnx.save(proto, str(bad))
    report = check(load_model(bad), ["onnxruntime"])
    ort = report.targets[0]
    assert report.exit_code == 2 and ort.verdict == "cannot export"
    assert ort.by_status("unsupported")[0].op == "com.example.Frobnicate"
    assert ort.by_status("unsupported")[0].nodes == ["my_frob"]
    assert "no CPU kernel for operator(s) com.example.Frobnicate (node my_frob)" in ort.message()


@pytest.mark.slow
def test_pytorch_model_deploys_on_onnxruntime_and_openvino(cli, nets, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    out = tmp_path / "c.json"
    result = cli("check", nets["pooled"], "--target", "onnxruntime,openvino", "--json", out)
    assert result.exit_code == 0, result.stderr
    targets = {t["target"]: t for t in json.loads(out.read_text())["targets"]}
    assert targets["onnxruntime"]["verdict"] == targets["openvino"]["verdict"] == "deploys"
    assert targets["openvino"]["node_counts"]["native"] >= 3


@pytest.mark.slow
def test_op_xnnpack_does_not_delegate_is_a_fallback_exit_3(cli, nets, tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    out = tmp_path / "c.json"
    result = cli("check", nets["pooled"], "--target", "executorch", "--json", out)
    assert result.exit_code == 3, result.stderr
    et = json.loads(out.read_text())["targets"][0]
    assert et["verdict"] == "fallback" and et["node_counts"]["fallback"] == 1
    fallback = [o for o in et["ops"] if o["status"] == "fallback"]
    assert fallback == [{"op": "aten.mean.dim", "status": "fallback", "count": 1, "nodes": ["aten_mean_dim"]}]
    delegated = {o["op"] for o in et["ops"] if o["status"] == "delegated"}
    assert {"aten.convolution.default", "aten.linear.default"} <= delegated
    assert "portable kernels" in result.stderr and "aten_mean_dim" in result.stderr


@pytest.mark.slow
def test_linalg_inv_cannot_export_to_tflite_or_onnx_exit_2(cli, nets, tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    out = tmp_path / "c.json"
    result = cli("check", nets["inverse"], "--target", "tflite,onnxruntime", "--json", out)
    assert result.exit_code == 2
    targets = {t["target"]: t for t in json.loads(out.read_text())["targets"]}
    tfl = targets["tflite"]
    assert tfl["verdict"] == "cannot export"
    assert [o["op"] for o in tfl["ops"] if o["status"] == "unsupported"] == ["aten.linalg_inv_ex.default"]
    assert "linalg_inv_ex" in tfl["message"]
    assert targets["onnxruntime"]["verdict"] == "cannot export"
    assert "aten.linalg_inv_ex.default" in targets["onnxruntime"]["error"]


@pytest.mark.slow
def test_export_stops_before_converting_with_the_check_message(cli, nets, tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    out = tmp_path / "inv.tflite"
    result = cli("export", nets["inverse"], "--to", "tflite", "-o", out)
    assert result.exit_code == 2
    assert "export stopped before converting" in result.stderr and "linalg_inv_ex" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_targets_are_validated(cli, tiny_onnx: Path) -> None:
    assert parse_targets("tflite, executorch,tflite") == ["tflite", "executorch"]
    with pytest.raises(BadInput, match="--target takes onnxruntime, openvino, tflite, executorch"):
        parse_targets("coreml")
    result = cli("check", tiny_onnx, "--target", "tensorrt")
    assert result.exit_code == 2 and "--target takes" in result.stderr
    assert TARGETS == ("onnxruntime", "openvino", "tflite", "executorch")


def test_pytorch_model_without_shape_is_bad_input(nets, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "noshape.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    with pytest.raises(BadInput, match="--input-shape"):
        check(load_model(f"{tmp_path / 'noshape.py'}:build"), ["onnxruntime"])
    report = check(load_model(f"{tmp_path / 'noshape.py'}:build", input_shape=(1, 4)), ["onnxruntime"])
    assert report.exit_code == 0 and report.targets[0].verdict == "deploys"
    assert sum(o.count for o in report.targets[0].ops) >= 1 and report.targets[0].seconds > 0
