"""Adversarial inputs (issue #21): no code runs from a data file, no input is overwritten, no traceback.

Each case is small (a tiny model or none at all) and asserts what a user would see: exit code 2,
one line on stderr naming the flag or file, no traceback, and nothing written or executed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeopt.training import TrainSettings


def assert_one_line(result, *needles: str) -> str:
    """Exit 2, one ``error:`` line on stderr holding every needle, no traceback anywhere."""
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# -- numeric flags: validated where parsed, before any file is read ---------------------------------
M = "missing.onnx"  # never read: the flag is refused first
NUMERIC_CASES = [
    (["bench", M, "--threads", "99999999999"], "--threads"),
    (["bench", M, "--threads", "10000"], "--threads"),
    (["eval", M, "--data", "d.npz", "--threads", "99999999999"], "--threads"),
    (["quantize", M, "-o", "q.onnx", "--threads", "99999999999"], "--threads"),
    (["serve", M, "--threads", "99999999999"], "--threads"),
    (["bench", M, "--seconds", "nan"], "--seconds"),
    (["bench", M, "--seconds", "inf"], "--seconds"),
    (["optimize", M, "--data", "d.npz", "-o", "out", "--seconds", "nan"], "--seconds"),
    (["optimize", M, "--data", "d.npz", "-o", "out", "--max-drop", "nan"], "--max-drop"),
    (["optimize", M, "--data", "d.npz", "-o", "out", "--time-budget", "-1"], "--time-budget"),
    (["distill", "--teacher", M, "--student", "s", "--data", "d.npz", "-o", "s.onnx", "--temperature", "nan"],
     "--temperature"),
    (["distill", "--teacher", M, "--student", "s", "--data", "d.npz", "-o", "s.onnx", "--lr", "nan"], "--lr"),
    (["distill", "--teacher", M, "--student", "s", "--data", "d.npz", "-o", "s.onnx", "--alpha", "inf"], "--alpha"),
    (["distill", "--teacher", M, "--student", "s", "--data", "d.npz", "-o", "s.onnx", "--seed", "99999999999"],
     "--seed"),
    (["zoo", "--classes", "0"], "--classes"),
    (["split", "run", "plan_dir", "--timeout", "nan"], "--timeout"),
    (["split", "run", "plan_dir", "--timeout", "-1"], "--timeout"),
    (["split", M, "--devices", "host", "-o", "o", "--link-latency-ms", "nan"], "--link-latency-ms"),
    (["prune", "m.py:f", "-o", "p.onnx", "--sparsity", "nan"], "--sparsity"),
    (["prune", "m.py:f", "-o", "p.onnx", "--sparsity", "0.5", "--lr", "inf"], "--lr"),
    (["adapt", M, "--data", "d.npz", "-o", "a.onnx", "--lr", "nan"], "--lr"),
    (["adapt", M, "--data", "d.npz", "-o", "a.onnx", "--memory-mb", "nan"], "--memory-mb"),
    (["export", "m.py:f", "--to", "onnx", "-o", "e.onnx", "--atol", "nan"], "--atol"),
    (["quantize", M, "-o", "q.onnx", "--samples", "0"], "--samples"),
    (["serve", M, "--max-request-mb", "nan"], "--max-request-mb"),  # the safety net in user_errors
]


@pytest.mark.parametrize(("args", "flag"), NUMERIC_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in NUMERIC_CASES])
def test_bad_numeric_flag_is_one_line_exit_2(cli, tmp_path: Path, monkeypatch, args: list[str], flag: str) -> None:
    monkeypatch.chdir(tmp_path)
    err = assert_one_line(cli(*args), flag)
    assert "got" in err or "finite" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_threads_cap_names_the_limit(cli) -> None:
    from edgeopt.devices import MAX_THREADS

    err = assert_one_line(cli("bench", M, "--threads", str(MAX_THREADS + 1)), "--threads")
    assert f"[1, {MAX_THREADS}]" in err and "remote --device may take more" in err
    err = assert_one_line(cli("bench", M, "--threads", "2000"), "--threads")
    assert "[1, 1024]" in err


def test_a_remote_device_may_take_more_threads_than_this_host(tmp_path: Path, digits_onnx: Path) -> None:
    """A 2-core host drives a 16-core board: --threads 16 is the board's business, not this host's."""
    from edgeopt.cli.common import _check_threads_here
    from edgeopt.devices import MAX_THREADS, DeviceProfile
    from edgeopt.errors import BadInput
    from edgeopt.model import load_model
    from edgeopt.runtimes.sessions import resolve_settings

    board = tmp_path / "board.yaml"
    board.write_text("name: board\ndescription: a 64-core board\nssh: edge@10.0.0.7\n")
    many = MAX_THREADS + 8
    _check_threads_here({"threads": many, "device": str(board)})  # allowed
    with pytest.raises(BadInput, match="4 x the"):
        _check_threads_here({"threads": many, "device": f"{board},host"})  # host is one of the devices
    with pytest.raises(BadInput, match="4 x the"):
        resolve_settings(load_model(digits_onnx), threads=many)
    remote = DeviceProfile(name="board", description="", ssh="edge@10.0.0.7")
    assert resolve_settings(load_model(digits_onnx), threads=many, device=remote).threads == many


# -- data loss: no output is ever one of the inputs --------------------------------------------------
def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workdir(tmp_path: Path, digits_onnx: Path, digits_test_npz: Path, digits_factory) -> Path:
    """Copies of a model, data, a recipe, weights and the factory file, as a user would have them."""
    import json
    import shutil

    shutil.copy(digits_onnx, tmp_path / "m.onnx")
    shutil.copy(digits_onnx, tmp_path / "t.onnx")
    shutil.copy(digits_test_npz, tmp_path / "d.npz")
    (tmp_path / "f.tflite").write_bytes(b"TFL3 not really a flatbuffer")
    (tmp_path / "recipe.json").write_text(json.dumps({"name": "fp16", "steps": [
        {"type": "Fp16", "version": 1, "fields": {}}], "runtime": "onnxruntime"}))
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(digits_factory[1], w / "p.pt")
    shutil.copy(Path(digits_factory[0].rpartition(":")[0]), tmp_path / "f.py")
    return tmp_path


OUTPUT_IS_INPUT = {
    "quantize -o input": (["quantize", "m.onnx", "-o", "m.onnx", "--mode", "dynamic"], "m.onnx"),
    "apply -o input model": (["apply", "m.onnx", "recipe.json", "-o", "m.onnx"], "m.onnx"),
    "apply -o recipe": (["apply", "m.onnx", "recipe.json", "-o", "recipe.json"], "recipe.json"),
    "distill -o teacher": (["distill", "--teacher", "t.onnx", "--student", "squeezenet1_1", "--data", "d.npz",
                            "-o", "t.onnx"], "t.onnx"),
    "export tflite -o input": (["export", "f.tflite", "--to", "tflite", "-o", "f.tflite"], "f.tflite"),
    "bench --json model": (["bench", "m.onnx", "--json", "m.onnx"], "m.onnx"),
    "eval --json data": (["eval", "m.onnx", "--data", "d.npz", "--json", "d.npz"], "d.npz"),
    "prune side .pt is --weights": (["prune", "f.py:DigitsCNN", "--weights", "w/p.pt", "-o", "w/p.onnx",
                                     "--sparsity", "0.5"], "w/p.pt"),
    "adapt side .pt is --weights": (["adapt", "f.py:DigitsCNN", "--weights", "w/p.pt", "--data", "d.npz",
                                     "-o", "w/p.onnx"], "w/p.pt"),
    "quantize --json is -o": (["quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic", "--json", "m.onnx"],
                              "m.onnx"),
    "eval --json is the reference": (["eval", "m.onnx", "--data", "d.npz", "--reference", "t.onnx",
                                      "--json", "t.onnx"], "t.onnx"),
    "optimize -o dir holding the model": (["optimize", "opt/model.onnx", "--data", "d.npz", "-o", "opt"],
                                          "opt/model.onnx"),
}


@pytest.mark.parametrize("case", list(OUTPUT_IS_INPUT))
def test_output_equal_to_input_is_refused_and_input_unchanged(cli, workdir: Path, monkeypatch, case: str) -> None:
    import shutil

    monkeypatch.chdir(workdir)
    args, victim = OUTPUT_IS_INPUT[case]
    if victim.startswith("opt/"):
        (workdir / "opt").mkdir()
        shutil.copy(workdir / "m.onnx", workdir / victim)
    before = _sha(workdir / victim)
    assert_one_line(cli(*args), "input file")
    assert _sha(workdir / victim) == before


def test_side_file_never_replaces_a_users_file_but_a_rerun_may(cli, workdir: Path) -> None:
    import shutil

    shutil.copy(workdir / "w" / "p.pt", workdir / "w" / "orig.pt")
    users = workdir / "w" / "p.pt"  # the user's own file, where prune would put OUT.pt
    before = _sha(users)
    args = ["prune", f"{workdir / 'f.py'}:DigitsCNN", "--weights", workdir / "w" / "orig.pt", "--sparsity", "0.3",
            "--no-latency"]
    assert_one_line(cli(*args, "-o", workdir / "w" / "p.onnx"), "p.pt", "no earlier edgeopt run")
    assert _sha(users) == before
    out = workdir / "w" / "again.onnx"
    for _ in range(2):  # a second run replaces the first run's side files
        result = cli(*args, "-o", out)
        assert result.exit_code == 0, result.output
    assert out.with_suffix(".pt").exists() and out.with_suffix(".pt2").exists()


def test_recipe_with_nan_fields_is_refused(cli, workdir: Path) -> None:
    import json

    recipe = workdir / "nan.json"
    recipe.write_text('{"name": "x", "steps": [{"type": "Distill", "version": 1, "fields": {"student": '
                      '"squeezenet1_1", "temperature": NaN}}]}')
    assert_one_line(cli("apply", workdir / "m.onnx", recipe, "-o", workdir / "o.onnx", "--data", workdir / "d.npz"),
                    "finite")
    recipe.write_text(json.dumps({"name": "x", "steps": [], "runtime_options": {"num_streams": float("inf")}}))
    assert_one_line(cli("apply", workdir / "m.onnx", recipe, "-o", workdir / "o.onnx"), "finite")
    assert not (workdir / "o.onnx").exists()


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_output_linked_to_the_input_is_refused(cli, workdir: Path, link: str) -> None:
    model = workdir / "m.onnx"
    alias = workdir / "alias.onnx"
    if link == "hard":
        alias.hardlink_to(model)
    else:
        alias.symlink_to(model)
    before = _sha(model)
    assert_one_line(cli("quantize", model, "-o", alias, "--mode", "dynamic"), "input file")
    assert _sha(model) == before


def test_json_into_a_missing_folder_creates_nothing(cli, workdir: Path) -> None:
    target = workdir / "nonexistent" / "dir" / "x.json"
    assert_one_line(cli("bench", workdir / "m.onnx", "--json", target), "does not exist")
    assert not (workdir / "nonexistent").exists()


@pytest.mark.parametrize("command", ["bench", "eval", "export", "apply"])
def test_output_naming_a_folder_fails_before_any_work(cli, workdir: Path, command: str) -> None:
    folder = workdir / "folder.onnx"
    folder.mkdir()
    m, d = workdir / "m.onnx", workdir / "d.npz"
    args = {"bench": ["bench", m, "--json", folder], "eval": ["eval", m, "--data", d, "--json", folder],
            "export": ["export", "f.py:DigitsCNN", "--to", "onnx", "-o", folder],
            "apply": ["apply", m, workdir / "recipe.json", "-o", folder]}[command]
    assert_one_line(cli(*args), "is a directory")
    assert list(folder.iterdir()) == []


# -- data and models validated on load --------------------------------------------------------------
def _npz(path: Path, x, y=None) -> Path:
    import numpy as np

    arrays = {"x": np.asarray(x, dtype=np.float32)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    np.savez(path, **arrays)
    return path


def test_nan_data_is_refused_before_calibration(cli, tmp_path: Path, digits_onnx: Path) -> None:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((32, 1, 32, 32)).astype(np.float32)
    x[3, 0, 0, :3] = np.nan
    data = _npz(tmp_path / "nan.npz", x, np.zeros(32, np.int64))
    out = tmp_path / "q.onnx"
    assert_one_line(cli("quantize", digits_onnx, "-o", out, "--mode", "static", "--data", data),
                    "3 NaN or infinite", "sample 3")
    assert not out.exists()


def test_eval_on_all_nan_input_refuses(cli, tmp_path: Path, digits_onnx: Path) -> None:
    import numpy as np

    data = _npz(tmp_path / "allnan.npz", np.full((8, 1, 32, 32), np.nan), np.zeros(8, np.int64))
    assert_one_line(cli("eval", digits_onnx, "--data", data), "NaN")


def test_npz_header_declaring_a_huge_shape_is_refused(cli, tmp_path: Path, digits_onnx: Path) -> None:
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**6, 1, 32000, 32000)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
    assert_one_line(cli("eval", digits_onnx, "--data", path), "declares", "GB")


def test_negative_labels_are_refused(cli, tmp_path: Path, digits_onnx: Path) -> None:
    data = _npz(tmp_path / "neg.npz", [[[[0.0] * 32] * 32]] * 2, [0, -1])
    assert_one_line(cli("eval", digits_onnx, "--data", data), "labels y must be class indices >= 0")


@pytest.mark.parametrize("command", ["prune", "adapt"])
def test_labels_outside_the_models_classes_are_one_line(cli, tmp_path: Path, digits_factory, command: str) -> None:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((40, 1, 32, 32))
    data = _npz(tmp_path / "y99.npz", x, [99] + [1] * 39)
    spec, weights = digits_factory
    args = {"prune": ["--sparsity", "0.3", "--data", data, "--epochs", "1", "--eval-data", data, "--no-latency"],
            "adapt": ["--data", data, "--epochs", "1", "--strategy", "last-layer"]}[command]
    out = tmp_path / "o.onnx"
    assert_one_line(cli(command, spec, "--weights", weights, "-o", out, *args), "label 99", "10 classes")
    assert not out.exists()


def test_augment_shift_larger_than_the_images(cli, tmp_path: Path, digits_onnx: Path, digits_test_npz: Path) -> None:
    out = tmp_path / "s.onnx"
    assert_one_line(cli("distill", "--teacher", digits_onnx, "--student", "squeezenet1_1", "--data",
                        digits_test_npz, "-o", out, "--augment-shift", "100000", "--epochs", "1", "--no-baseline"),
                    "--augment-shift 100000")
    assert not out.exists()


def test_zoo_input_size_beyond_memory(cli) -> None:
    assert_one_line(cli("zoo", "--input-size", "3x60000x60000", "--no-latency"), "3x60000x60000", "values per sample")


def _external_onnx(folder: Path, location: str) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(folder / "good.onnx"), save_as_external_data=True, location="good.data", size_threshold=0)
    proto = onnx.load(str(folder / "good.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path = folder / "m.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("location", ["../secret.data", "/etc/hostname", "missing.data", "link.data"])
def test_external_data_errors_are_one_line(cli, tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.data").write_bytes(b"\0" * 64)
    (folder / "link.data").symlink_to(tmp_path / "secret.data")
    path = _external_onnx(folder, location)
    assert_one_line(cli("bench", path, "--runs", "3", "--seconds", "0"), "external data")


def test_onnx_declaring_huge_input_dims(cli, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 60000, 60000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 60000, 60000])])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert_one_line(cli("bench", path, "--runs", "3", "--seconds", "0"), "values per sample")


def test_bench_batch_beyond_memory(cli, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 1024, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 1024, 1024])])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert_one_line(cli("bench", path, "--batch", "65536", "--runs", "2", "--seconds", "0"), "smaller --batch")


def test_thread_count_in_model_metadata_is_checked(cli, tmp_path: Path, digits_onnx: Path) -> None:
    from edgeopt.model import load_model

    model = load_model(digits_onnx).with_metadata(threads="lots").save(tmp_path / "m.onnx")
    assert_one_line(cli("bench", model.path, "--runs", "3", "--seconds", "0"), "edgeopt.threads")


# -- temp files: removed on any exit edgeopt controls, swept when a killed run left them -------------
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_a_killed_run_is_swept_by_the_next_write(cli, tmp_path: Path, digits_onnx: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "q.onnx"
    stale = tmp_path / f".q.onnx.{_dead_pid()}.abc123.tmp"
    stale.write_bytes(b"half a model")
    stale_report = tmp_path / f".q.report.json.{_dead_pid()}.x.tmp"
    stale_report.write_text("{")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".q.onnx.{sleeper.pid}.xyz.tmp"  # a concurrent writer's: left alone
        live.write_bytes(b"in progress")
        result = cli("quantize", digits_onnx, "-o", out, "--mode", "fp16", "--seconds", "0")
        assert result.exit_code == 0, result.output
        assert not stale.exists() and not stale_report.exists()
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [live.name]


def test_atomic_write_that_fails_leaves_no_temp(tmp_path: Path) -> None:
    from edgeopt.fileio import atomic_path

    target = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_failed_adapt_leaves_no_checkpoint_for_resume(tmp_path: Path, digits_factory, digits_test_npz: Path,
                                                      monkeypatch) -> None:
    import importlib

    from edgeopt.adapt import AdaptConfig, adapt
    from edgeopt.adapt.checkpoint import checkpoint_path, save_checkpoint
    from edgeopt.data import load_data
    from edgeopt.errors import ModelError
    from edgeopt.model import load_model

    module = importlib.import_module("edgeopt.adapt.adapt")

    def broken_export(*args, **kwargs):
        raise ModelError("export failed after training")

    monkeypatch.setattr(module, "_export", broken_export)
    model = load_model(digits_factory[0], weights=digits_factory[1])
    data = load_data(digits_test_npz).take(slice(0, 60))
    out = tmp_path / "a.onnx"
    config = AdaptConfig(strategy="last-layer", train=TrainSettings(epochs=1, seed=0))
    with pytest.raises(ModelError, match="export failed"):
        adapt(model, data, config=config, out=out, progress=False)
    assert not checkpoint_path(out).exists()
    # A previous run's checkpoint survives a failed run unchanged.
    save_checkpoint(checkpoint_path(out), state_dict={"w": torch.ones(2)}, info={"complete": True, "runs": []})
    before = checkpoint_path(out).read_bytes()
    with pytest.raises(ModelError, match="export failed"):
        adapt(model, data, config=config, out=out, progress=False)
    assert checkpoint_path(out).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_path(out).name]


@pytest.mark.slow
def test_sigterm_ends_a_command_cleanly(tmp_path: Path, digits_factory, digits_test_npz: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgeopt.adapt.checkpoint import checkpoint_path

    out = tmp_path / "a.onnx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "edgeopt", "adapt", digits_factory[0], "--weights",
                             str(digits_factory[1]), "--data", str(digits_test_npz), "-o", str(out),
                             "--strategy", "full", "--epochs", "5000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint_path(out).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert b"Traceback" not in proc.stderr.read()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -- code execution: nothing runs from a data file unless the user said so -------------------------
torch = pytest.importorskip("torch")

MARKER_NAME = "PWNED"


class _Payload:
    """Pickles to ``os.system("touch MARKER")``: unpickling it is running code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickled(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def genuine_pt2(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A .pt2 written by torch.export.save (dynamic batch) and labelled data that fits it."""
    import numpy as np

    folder = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    net = _TinyNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    path = folder / "genuine.pt2"
    torch.export.save(program, str(path))
    rng = np.random.default_rng(0)
    data = folder / "d.npz"
    np.savez(data, x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 40))
    return path, data, net


def craft_pt2(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None, edit=None, weights_edit=None) -> Path:
    """Rewrite a genuine archive: swap member files, or edit models/model.json / the weights config."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            name, data = info.filename[len(prefix):], zin.read(info)
            if replace and name in replace:
                data = replace[name]
            if edit is not None and name == "models/model.json":
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            if weights_edit is not None and name == "data/weights/model_weights_config.json":
                doc = json.loads(data)
                weights_edit(doc)
                data = json.dumps(doc).encode()
            zout.writestr(prefix + name, data)
    return dst


def _first(doc, key: str):
    """The first dict in a JSON tree that has ``key``."""
    if isinstance(doc, dict):
        if key in doc:
            return doc
        children = list(doc.values())
    elif isinstance(doc, list):
        children = doc
    else:
        return None
    for child in children:
        found = _first(child, key)
        if found is not None:
            return found
    return None


def _guards(marker: Path):
    def edit(doc) -> None:
        doc["guards_code"] = [f"__import__('os').system('touch {marker}') == 0 and L['x'].size()[0] >= 1"]
    return edit


def _sympy(marker: Path):
    def edit(doc) -> None:
        _first(doc, "expr_str")["expr_str"] = f"__import__('os').system('touch {marker}')"
    return edit


def _os_system_node(marker: Path):
    def edit(doc) -> None:
        nodes = doc["graph_module"]["graph"]["nodes"]
        nodes.insert(0, {"target": "torch.os.system", "name": "pwn", "metadata": {},
                         "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                         "outputs": [{"as_int": 0}], "is_hop_single_tensor_return": None})
    return edit


def _pickled_weight(marker: Path):
    def edit(doc) -> None:
        doc["config"]["conv.weight"]["use_pickle"] = True
    return edit


@pytest.mark.parametrize("attack", ["guards", "sympy", "os_system_node", "pickled_weight"])
def test_crafted_pt2_is_refused_and_runs_nothing(cli, genuine_pt2, tmp_path: Path, attack: str) -> None:
    src, data, _ = genuine_pt2
    marker = tmp_path / MARKER_NAME
    evil = tmp_path / "evil.pt2"
    if attack == "pickled_weight":
        craft_pt2(src, evil, weights_edit=_pickled_weight(marker),
                  replace={"data/weights/weight_0": _pickled(_Payload(marker))})
    else:
        edit = {"guards": _guards, "sympy": _sympy, "os_system_node": _os_system_node}[attack](marker)
        craft_pt2(src, evil, edit=edit)
    for args in (("bench", evil, "--runs", "3", "--seconds", "0"), ("eval", evil, "--data", data)):
        assert_one_line(cli(*args), "--trust-pickle", evil.name)
        assert not marker.exists(), f"{attack}: the crafted archive ran code"


def test_pt2_with_pickled_sample_inputs_loads_without_unpickling(cli, genuine_pt2, tmp_path: Path) -> None:
    """The issue's case: torch.export.load unpickles the sample inputs with weights_only=False."""
    src, data, _ = genuine_pt2
    marker = tmp_path / MARKER_NAME
    evil = craft_pt2(src, tmp_path / "samples.pt2",
                     replace={"data/sample_inputs/model.pt": _pickled(_Payload(marker))})
    result = cli("eval", evil, "--data", data)
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_genuine_pt2_runs_in_bench_eval_and_export(cli, genuine_pt2, tmp_path: Path) -> None:
    import json

    import numpy as np

    src, data, net = genuine_pt2
    x = np.load(data)["x"]
    y = np.load(data)["y"]
    with torch.no_grad():
        expected = float(np.mean(net(torch.from_numpy(x)).argmax(1).numpy() == y))
    for trust in ((), ("--trust-pickle",)):
        result = cli("eval", src, "--data", data, "--json", tmp_path / "e.json", *trust)
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == pytest.approx(expected)
    bench = cli("bench", src, "--runs", "3", "--seconds", "0", "--batch", "4", "--json", tmp_path / "b.json")
    assert bench.exit_code == 0, bench.output
    assert json.loads((tmp_path / "b.json").read_text())["batch"] == 4
    out = tmp_path / "g.onnx"
    exported = cli("export", src, "--to", "onnx", "-o", out, "--data", data)
    assert exported.exit_code == 0, exported.output
    again = cli("eval", out, "--data", data, "--json", tmp_path / "o.json")
    assert again.exit_code == 0 and json.loads((tmp_path / "o.json").read_text())["accuracy"] == pytest.approx(expected)


def test_pt2_module_trains_and_evals(genuine_pt2) -> None:
    from edgeopt.model import load_model

    module = load_model(genuine_pt2[0]).module
    assert module.train() is module and module.training
    assert module.eval() is module and not module.training


def test_full_pickle_needs_the_flag_and_then_works(cli, genuine_pt2, tmp_path: Path) -> None:
    import json

    _, data, net = genuine_pt2
    marker = tmp_path / MARKER_NAME
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_pickled(_Payload(marker)))
    assert_one_line(cli("eval", evil, "--data", data), "--trust-pickle")
    assert not marker.exists()
    full = tmp_path / "full.pt"
    torch.save(net, full)
    result = cli("eval", full, "--trust-pickle", "--data", data, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads((tmp_path / "r.json").read_text())["accuracy"] <= 1.0


# -- split run and recipes never import Python named by a data file ---------------------------------
def _evil_py(folder: Path, marker: Path, name: str = "evil.py") -> Path:
    path = folder / name
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\n"
                    "def build():\n    raise RuntimeError('payload ran')\n")
    return path


def _split_dir(tmp_path: Path, digits_onnx: Path, plan: dict) -> Path:
    import json
    import shutil

    out = tmp_path / "split"
    out.mkdir()
    shutil.copy(digits_onnx, out / "stage_0.onnx")
    base = {"stages": [{"path": "stage_0.onnx", "host_ms": 1.0, "transfer_ms": 0.0, "wire_ms": 0.0}],
            "link": {"mbps": 100.0, "latency_ms": 0.0}, "threads": 1, "model": {"path": str(digits_onnx)},
            "predicted_latency_ms": 1.0, "predicted_throughput_ips": 1000.0}
    for key, value in plan.items():
        base[key] = value
    (out / "plan.json").write_text(json.dumps(base))
    return out


@pytest.mark.parametrize("where", ["stage", "model"])
def test_split_run_never_imports_python_named_by_the_plan(cli, tmp_path: Path, digits_onnx: Path, where: str) -> None:
    marker = tmp_path / MARKER_NAME
    if where == "stage":
        out = _split_dir(tmp_path, digits_onnx, {"stages": [{"path": "stage_0.py:build", "host_ms": 1.0,
                                                              "transfer_ms": 0.0, "wire_ms": 0.0}]})
        _evil_py(out, marker, "stage_0.py")
        (out / "stage_0.py:build").write_text("")  # so the old existence check passes
    else:
        out = _split_dir(tmp_path, digits_onnx, {"model": {"path": str(_evil_py(tmp_path, marker)) + ":build"}})
    err = assert_one_line(cli("split", "run", out, "--items", "2", "--timeout", "30"), "plan.json")
    assert ".onnx" in err
    assert not marker.exists()


@pytest.mark.parametrize("threads", [0, 99999999999, "8"])
def test_split_plan_threads_are_checked(cli, tmp_path: Path, digits_onnx: Path, threads) -> None:
    out = _split_dir(tmp_path, digits_onnx, {"threads": threads})
    assert_one_line(cli("split", "run", out, "--items", "2"), "threads")


def _recipe_with_student(student: str) -> dict:
    return {"name": "evil", "steps": [{"type": "Distill", "version": 1, "fields": {"student": student, "epochs": 1}}],
            "runtime": "onnxruntime", "needs": ["train"]}


def test_recipe_naming_python_needs_trust_code(cli, tmp_path: Path, digits_onnx: Path, digits_test_npz: Path) -> None:
    import json

    marker = tmp_path / MARKER_NAME
    evil = _evil_py(tmp_path, marker)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe_with_student(f"{evil}:build")))
    out = tmp_path / "o.onnx"
    assert_one_line(cli("apply", digits_onnx, recipe, "-o", out, "--data", digits_test_npz), "--trust-code")
    assert not marker.exists() and not out.exists()
    recipes = tmp_path / "recipes.json"
    recipes.write_text(json.dumps([_recipe_with_student(f"{evil}:build")]))
    assert_one_line(cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "opt",
                        "--recipes", recipes), "--trust-code")
    assert not marker.exists()
    # With the flag the file is imported (the user vouched for it); its factory then fails cleanly.
    trusted = cli("apply", digits_onnx, recipe, "-o", out, "--data", digits_test_npz, "--trust-code")
    assert marker.exists() and trusted.exit_code == 2 and not out.exists()


def test_deeply_nested_recipes_json_is_one_line(cli, tmp_path: Path, digits_onnx: Path, digits_test_npz: Path) -> None:
    recipes = tmp_path / "nested.json"
    recipes.write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line(cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "opt",
                        "--recipes", recipes), "nested")
    assert_one_line(cli("apply", digits_onnx, recipes, "-o", tmp_path / "o.onnx"), "nested")


@pytest.mark.slow
def test_keras_h5_lambda_layer_needs_trust_pickle(cli, tmp_path: Path) -> None:
    """A legacy .h5 Lambda layer stores marshalled bytecode that tf-keras runs with the model."""
    tf_keras = pytest.importorskip("tf_keras")
    marker = tmp_path / MARKER_NAME
    namespace: dict = {}  # a lambda without a closure: its bytecode carries the marker path as a constant
    exec(f"payload = lambda x: x * 2.0 + float(__import__('pathlib').Path({str(marker)!r}).touch() is None) * 0.0",
         namespace)
    model = tf_keras.Sequential([tf_keras.layers.Input((4,)), tf_keras.layers.Lambda(namespace["payload"]),
                                 tf_keras.layers.Dense(2)])
    path = tmp_path / "lam.h5"
    model.save(str(path))
    marker.unlink(missing_ok=True)  # building the model ran the lambda once
    out = tmp_path / "lam.tflite"
    assert_one_line(cli("export", path, "--to", "tflite", "-o", out, "--no-bench"), "Lambda", "--trust-pickle")
    assert not marker.exists() and not out.exists()
