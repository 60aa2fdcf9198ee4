"""quantize --mode dynamic needs no data, even when the sequence length is dynamic."""

from __future__ import annotations

import json

from edgeopt.model import load_model
from edgeopt.transforms.quantize import weight_nodes


def test_dynamic_without_data_on_a_dynamic_sequence_model(cli, tiny_transformer, tmp_path) -> None:
    enc, _ = tiny_transformer
    out = tmp_path / "dyn.onnx"
    res = cli("quantize", enc, "-o", out, "--mode", "dynamic", "--threads", "1", "--seconds", "0.2",
              "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    q = load_model(out)
    ops = {n.op_type for n in q.onnx.graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert q.inputs[0].shape[1] == "seq"  # still takes any sequence length
    payload = json.loads((tmp_path / "r.json").read_text())
    assert "evaluation" not in payload  # no data: nothing judged, and it says so
    assert any("accuracy and fidelity were not measured" in n for n in payload["notes"])
    assert payload["timed_shapes"] == {"input_ids": [1, 128], "attention_mask": [1, 128]}
    assert "set to 128" in res.stdout
    assert payload["quantized"]["latency_ms"]["p50"] > 0 and payload["size_ratio"] > 1.5
    assert len(weight_nodes(load_model(enc).onnx)) == 12  # 6 MatMuls a layer, 2 layers


def test_dynamic_with_data_judges_by_cosine(cli, tiny_transformer, tmp_path) -> None:
    enc, npz = tiny_transformer
    res = cli("quantize", enc, "-o", tmp_path / "dyn.onnx", "--mode", "dynamic", "--data", npz, "--threads", "1",
              "--seconds", "0.2", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert ev["output_kind"] == "other" and ev["n"] == 60
    assert ev["cosine"] > 0.95 and ev["nn_agreement"] is not None
    assert "timed_shapes" not in json.loads((tmp_path / "r.json").read_text())


def test_quantizing_leaves_nothing_in_the_working_directory(tiny_transformer, tmp_path, monkeypatch) -> None:
    from edgeopt.transforms import quantize as q

    enc, _ = tiny_transformer
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(q, "_PREPARED", {})

    def gives_up(*args, **kwargs):  # what ONNX Runtime does when symbolic shape inference is incomplete
        import onnx

        onnx.save_model(load_model(enc).onnx, "sym_shape_infer_temp.onnx", save_as_external_data=True,
                        all_tensors_to_one_file=True, location="0f1e-uuid.data")
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr("onnxruntime.quantization.shape_inference.quant_pre_process", gives_up)
    out = q.quantize(load_model(enc), q.DynamicInt8())
    assert any(n.op_type == "MatMulInteger" for n in out.onnx.graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
