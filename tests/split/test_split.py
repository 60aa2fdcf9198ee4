"""edgeopt split: cut analysis, planner, stage files, the multi-process pipeline and the CLI."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.devices import DeviceProfile
from edgeopt.errors import BadInput, DeviceError, ModelError, PipelineError
from edgeopt.measure.bench import BenchSettings
from edgeopt.split import split_model
from edgeopt.split.graph import GraphCuts
from edgeopt.split.pipeline import run_pipeline
from edgeopt.split.planner import Link, plan_cuts
from edgeopt.split.profile import SegmentProfile

FAST = BenchSettings(warmup=1, min_runs=5, min_seconds=0.01, max_seconds=1.0, round_seconds=0.005)


def make_residual_cnn(path: Path, *, c: int = 8, size: int = 16, classes: int = 10) -> Path:
    """stem Conv+Relu (nodes 0-1) | residual block Conv, Relu, Conv, Add, Relu (2-6) | Conv 2C stride 2 +
    Relu (7-8) | GlobalAveragePool, Flatten, Gemm (9-11). Node 1's output feeds both node 2 and the Add,
    so cuts after nodes 2-4 need two tensors."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [w("w0", c, 1, 3, 3), w("w1", c, c, 3, 3), w("w2", c, c, 3, 3), w("w3", 2 * c, c, 3, 3),
             w("fw", classes, 2 * c), w("fb", classes)]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["s"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
        helper.make_node("Conv", ["s_r", "w1"], ["b1"], pads=[1, 1, 1, 1], name="block_conv1"),
        helper.make_node("Relu", ["b1"], ["b1_r"], name="block_relu"),
        helper.make_node("Conv", ["b1_r", "w2"], ["b2"], pads=[1, 1, 1, 1], name="block_conv2"),
        helper.make_node("Add", ["b2", "s_r"], ["res"], name="block_add"),
        helper.make_node("Relu", ["res"], ["res_r"], name="block_out"),
        helper.make_node("Conv", ["res_r", "w3"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2], name="down"),
        helper.make_node("Relu", ["d"], ["d_r"], name="down_relu"),
        helper.make_node("GlobalAveragePool", ["d_r"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "residual_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def res_onnx(tmp_path: Path) -> Path:
    return make_residual_cnn(tmp_path / "res.onnx")


@pytest.fixture
def res_npz(tmp_path: Path) -> Path:
    path = tmp_path / "res.npz"
    np.savez(path, x=np.random.default_rng(3).standard_normal((6, 1, 16, 16)).astype(np.float32))
    return path


def _whole(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _chain(folder: Path, x: np.ndarray) -> np.ndarray:
    value = x
    for stage in json.loads((folder / "plan.json").read_text())["stages"]:
        sess = ort.InferenceSession(str(folder / stage["path"]), providers=["CPUExecutionProvider"])
        value = sess.run(None, {sess.get_inputs()[0].name: value})[0]
    return value


# -- cut analysis -------------------------------------------------------------------------------
def test_residual_block_interior_is_not_a_valid_cut(res_onnx: Path) -> None:
    cuts = GraphCuts(onnx.load(str(res_onnx)))
    assert [c.index for c in cuts.valid()] == [0, 1, 5, 6, 7, 8, 9, 10]
    inside = cuts.cuts[3]
    assert set(inside.tensors) == {"b1_r", "s_r"}  # the skip connection stays alive across the block
    assert cuts.cuts[1].tensors == ("s_r",) and cuts.cuts[1].bytes == 8 * 16 * 16 * 4
    assert cuts.cuts[8].bytes == 16 * 8 * 8 * 4
    assert cuts.cuts[10].bytes == 16 * 4


def test_multi_tensor_cut_is_rejected_with_the_valid_positions(res_onnx: Path) -> None:
    cuts = GraphCuts(onnx.load(str(res_onnx)))
    with pytest.raises(BadInput, match=r"cut after node 3 \(block_relu\) needs 2 tensors .* valid cuts: 0-1,5-10"):
        cuts.check([3])
    with pytest.raises(BadInput, match="strictly increasing"):
        cuts.check([6, 1])
    with pytest.raises(BadInput, match="outside the graph"):
        cuts.check([11])


# -- planner ------------------------------------------------------------------------------------
def _profile(res_onnx: Path, segment_ms: list[float]) -> tuple[GraphCuts, SegmentProfile]:
    cuts = GraphCuts(onnx.load(str(res_onnx)))
    return cuts, SegmentProfile(cuts=cuts.valid(), segment_ms=segment_ms, call_ms=0.0, threads=1)


def _brute_force(prof: SegmentProfile, speeds: list[float], link: Link, objective: str) -> tuple[float, float]:
    m, best = len(prof.cuts), (float("inf"), float("inf"))
    for chosen in itertools.combinations(range(1, m + 1), len(speeds) - 1):
        bounds = [0, *chosen, m + 1]
        comp = [prof.stage_host_ms(u, v - 1) / s for (u, v), s in zip(itertools.pairwise(bounds), speeds, strict=True)]
        sizes = [prof.cuts[b - 1].bytes or 0 for b in chosen]
        latency = sum(comp) + sum(link.transfer_ms(n) for n in sizes)
        score = latency if objective == "latency" else max([*comp, *(link.wire_ms(n) for n in sizes)])
        best = min(best, (score, latency))
    return best


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("n_devices", [2, 3])
def test_dynamic_programme_matches_brute_force(res_onnx: Path, objective: str, n_devices: int) -> None:
    rng = np.random.default_rng(n_devices)
    for mbps in (0.5, 10.0, 1000.0):
        cuts, prof = _profile(res_onnx, list(rng.uniform(0.1, 3.0, size=9)))
        speeds = list(rng.uniform(0.2, 2.0, size=n_devices))
        devices = [DeviceProfile(name=f"d{i}", description="", relative_speed=s) for i, s in enumerate(speeds)]
        link = Link(mbps, 0.3)
        plan = plan_cuts(prof, devices, link, objective=objective, n_nodes=12, inputs=["input"], outputs=["logits"])
        score, latency = _brute_force(prof, speeds, link, objective)
        got = plan.predicted_latency_ms if objective == "latency" else 1000.0 / plan.predicted_throughput_ips
        assert got == pytest.approx(score, rel=1e-9)
        assert len(plan.cuts) == n_devices - 1 and plan.cuts == sorted(plan.cuts)


def test_cut_moves_toward_the_slow_device_as_bandwidth_falls(res_onnx: Path) -> None:
    """A slow camera board + a fast gateway: a fat link sends early, a thin one sends the smallest tensor."""
    _, prof = _profile(res_onnx, [1.0, 1.0, 3.0, 0.2, 2.0, 0.2, 0.1, 0.1, 0.1])
    devices = [DeviceProfile(name="board", description="", relative_speed=0.1),
               DeviceProfile(name="gateway", description="", relative_speed=1.0)]
    chosen = {}
    for mbps in (10000.0, 10.0, 0.01):
        plan = plan_cuts(prof, devices, Link(mbps), n_nodes=12, inputs=["input"], outputs=["logits"])
        chosen[mbps] = plan.cuts[0]
    assert chosen[10000.0] == 0  # 8 KB input of stage 1 costs nothing on a 10 Gbit/s link: cut first
    assert chosen[0.01] in (9, 10)  # at 10 kbit/s only the 64-byte pooled vector is worth sending
    assert chosen[10000.0] <= chosen[10.0] <= chosen[0.01]


def test_throughput_objective_balances_equal_devices(res_onnx: Path) -> None:
    _, prof = _profile(res_onnx, [2.0, 2.0, 4.0, 2.0, 4.0, 2.0, 2.0, 1.0, 1.0])
    devices = [DeviceProfile(name=f"d{i}", description="", relative_speed=1.0) for i in range(2)]
    plan = plan_cuts(prof, devices, Link(1e6), objective="throughput", n_nodes=12, inputs=["input"],
                     outputs=["logits"])
    assert [s.compute_ms for s in plan.stages] == pytest.approx([10.0, 10.0])
    assert plan.predicted_throughput_ips == pytest.approx(100.0)


def test_link_rejects_bad_values() -> None:
    with pytest.raises(BadInput, match="--link-mbps must be a positive number"):
        Link(0)
    with pytest.raises(BadInput, match="--link-latency-ms must be >= 0"):
        Link(10, -1)
    assert Link(8, 2).transfer_ms(1000) == pytest.approx(3.0)  # 8000 bits at 8 Mbit/s = 1 ms, + 2 ms


# -- split_model: stage files and plan.json ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("devices", [["host-1t", "host-1t"], ["rpi4", "gateway-x86", "host"]])
def test_stages_reproduce_the_whole_model(res_onnx: Path, tmp_path: Path, devices: list[str]) -> None:
    out = tmp_path / "out"
    plan = split_model(res_onnx, devices, out_dir=out, link_mbps=100, objective="throughput", settings=FAST)
    written = json.loads((out / "plan.json").read_text())
    assert [s["path"] for s in written["stages"]] == [f"stage_{k}.onnx" for k in range(len(devices))]
    assert written["cuts"] == plan.cuts and all(c in written["valid_cuts"] for c in plan.cuts)
    assert written["devices"] == devices and written["model"]["nodes"] == 12
    assert written["predicted_latency_ms"] == pytest.approx(
        sum(s["compute_ms"] + s["transfer_ms"] for s in written["stages"]))
    for stage, profile in zip(written["stages"], devices, strict=True):
        speed = {"host-1t": 1.0, "host": 1.0, "rpi4": 0.12, "gateway-x86": 0.6}[profile]
        assert stage["compute_ms"] == pytest.approx(stage["host_ms"] / speed)
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    assert np.max(np.abs(_chain(out, x) - _whole(res_onnx, x))) <= 1e-5
    # the first stage ends at the first cut and takes the model input
    first = onnx.load(str(out / "stage_0.onnx"))
    assert [i.name for i in first.graph.input] == ["input"]
    assert len(first.graph.node) == plan.cuts[0] + 1


def test_manual_cuts_are_used_as_given(res_onnx: Path, tmp_path: Path) -> None:
    plan = split_model(res_onnx, ["host-1t"] * 3, out_dir=tmp_path / "o", link_mbps=50, cuts=[1, 8], settings=FAST)
    assert plan.cuts == [1, 8]
    assert [(s.first_node, s.last_node) for s in plan.stages] == [(0, 1), (2, 8), (9, 11)]
    assert [s.out_bytes for s in plan.stages] == [8 * 16 * 16 * 4, 16 * 8 * 8 * 4, 0]
    assert plan.stages[0].transfer_ms == pytest.approx(8 * 16 * 16 * 4 * 8 / 50e6 * 1000)


def test_split_errors_leave_no_output(res_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(DeviceError, match="unknown device profile 'toaster'"):
        split_model(res_onnx, ["host", "toaster"], out_dir=out, link_mbps=10)
    with pytest.raises(BadInput, match="needs 2 tensors"):
        split_model(res_onnx, ["host", "host"], out_dir=out, link_mbps=10, cuts=[4])
    with pytest.raises(BadInput, match="3 devices need 2 cut"):
        split_model(res_onnx, ["host"] * 3, out_dir=out, link_mbps=10, cuts=[1])
    with pytest.raises(BadInput, match="give --link-mbps"):
        split_model(res_onnx, ["host", "host"], out_dir=out)
    assert not (out / "plan.json").exists() and not list(out.glob("stage_*.onnx"))


# -- the pipeline -------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_matches_whole_model_and_pays_for_the_link(res_onnx: Path, res_npz: Path, tmp_path: Path) -> None:
    from edgeopt.data import load_data

    out = tmp_path / "o"
    # 0.1 Mbit/s and 5 ms: the 4 KB tensor after node 8 takes 328 ms on the wire, stage 1's 256 B 20 ms
    split_model(res_onnx, ["host-1t"] * 3, out_dir=out, link_mbps=0.1, link_latency_ms=5, cuts=[8, 10],
                settings=FAST)
    fast = run_pipeline(out, data=load_data(res_npz), items=6, warmup=1)
    assert fast.stages == 3 and fast.items == 6
    assert fast.max_abs_diff is not None and fast.max_abs_diff <= 1e-5
    slow = run_pipeline(out, data=load_data(res_npz), items=2, warmup=0, simulate_link=True)
    wire = (16 * 8 * 8 * 4 + 16 * 4) * 8 / 0.1e6 * 1000 + 2 * 5
    assert slow.predicted_latency_ms >= wire
    assert slow.latency_ms["min"] >= wire  # the simulated link really delays every item
    # No absolute bounds (the machine may be loaded): the run without the link, measured just before, is the
    # yardstick. The link costs what it should (lower bounds hold under any load); above the prediction, a 25%
    # margin for late wake-ups of the simulated link plus the compute noise measured without it.
    assert slow.latency_ms["p50"] - fast.latency_ms["p50"] >= 0.75 * wire
    assert slow.latency_ms["p50"] >= 0.9 * slow.predicted_latency_ms
    assert slow.latency_ms["p50"] <= 1.25 * slow.predicted_latency_ms + 3 * fast.latency_ms["p90"]
    assert slow.max_abs_diff is not None and slow.max_abs_diff <= 1e-5
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_stage_that_gets_a_bad_tensor_is_reported(res_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    split_model(res_onnx, ["host-1t"] * 2, out_dir=out, link_mbps=100, cuts=[1], settings=FAST)
    other = tmp_path / "other"
    split_model(res_onnx, ["host-1t"] * 2, out_dir=other, link_mbps=100, cuts=[8], settings=FAST)
    (out / "stage_1.onnx").write_bytes((other / "stage_1.onnx").read_bytes())  # expects d_r, gets s_r
    with pytest.raises(PipelineError, match=r"stage 1: rejected item 0: it expects tensor\(s\) \['d_r'\] but got \['s_r'\]"):
        run_pipeline(out, items=2, timeout_s=30)
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_stage_process_that_dies_is_reported(res_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    split_model(res_onnx, ["host-1t"] * 2, out_dir=out, link_mbps=0.2, cuts=[8], settings=FAST)
    killed: list[int] = []

    def kill_stage_1() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for proc in multiprocessing.active_children():
                if proc.name == "edgeopt-stage-1" and proc.pid:
                    time.sleep(1.5)  # let the pipeline get going
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.05)

    threading.Thread(target=kill_stage_1, daemon=True).start()
    with pytest.raises(PipelineError, match=r"stage 1 \(host-1t\), pid \d+ was killed by signal 9"):
        run_pipeline(out, items=40, warmup=0, simulate_link=True, timeout_s=30)
    assert killed
    assert not multiprocessing.active_children()  # no orphans


def test_run_rejects_a_directory_without_a_plan(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="has no plan.json"):
        run_pipeline(tmp_path)


# -- CLI ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_split_then_run(cli, res_onnx: Path, res_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    result = cli("split", res_onnx, "--devices", "rpi4,gateway-x86", "--link-mbps", "20", "-o", out,
                 "--json", tmp_path / "plan.json")
    assert result.exit_code == 0, result.stderr
    assert "stage_0.onnx" in result.stdout and "predicted end-to-end latency" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["devices"] == ["rpi4", "gateway-x86"] and len(plan["cuts"]) == 1
    assert (out / "stage_0.onnx").is_file() and (out / "stage_1.onnx").is_file()
    result = cli("split", "run", out, "--data", res_npz, "--items", "4", "--json", tmp_path / "run.json")
    assert result.exit_code == 0, result.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["stages"] == 2 and run["items"] == 4 and run["max_abs_diff"] <= 1e-5
    assert run["throughput_ips"] > 0 and run["latency_ms"]["p50"] > 0
    # `split plan MODEL` is the same command spelled out
    result = cli("split", "plan", res_onnx, "--devices", "host-1t,host-1t", "--link-mbps", "20", "--cuts", "6",
                 "-o", tmp_path / "again")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["cuts"] == [6]


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "rpi4,toaster", "--link-mbps", "10"], "unknown device profile 'toaster'"),
    (["--devices", "host,host", "--link-mbps", "10", "--cuts", "3"], "cut after node 3 (block_relu) needs 2 tensors"),
    (["--devices", "host,host", "--link-mbps", "10", "--cuts", "x"], "--cuts takes comma-separated node positions"),
    (["--devices", "host,host", "--link-mbps", "-1"], "--link-mbps must be > 0, got -1.0"),
    (["--devices", "host,host", "--link-mbps", "10", "--objective", "fast"], "--objective must be one of"),
])
def test_cli_bad_input_is_one_line_exit_2(cli, res_onnx: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    result = cli("split", res_onnx, *args, "-o", out)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (out / "plan.json").exists()


def test_cli_rejects_non_onnx_model_and_unwritable_outdir(cli, res_onnx: Path, tmp_path: Path) -> None:
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    result = cli("split", text, "--devices", "host,host", "--link-mbps", "10", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "unsupported model file model.txt" in result.stderr
    result = cli("split", res_onnx, "--devices", "host,host", "--link-mbps", "10", "-o", text / "sub")
    assert result.exit_code == 2 and "is not writable" in result.stderr
    result = cli("split", "run", tmp_path)
    assert result.exit_code == 2 and "has no plan.json" in result.stderr


def test_split_rejects_a_pytorch_model_with_the_export_command(tmp_path: Path) -> None:
    from edgeopt.model import Model

    with pytest.raises(ModelError, match="edgeopt split cuts ONNX models; net is torch"):
        split_model(Model.from_torch(object(), source="net"), ["host"], out_dir=tmp_path)
