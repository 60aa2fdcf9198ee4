"""`--json -`: stdout is exactly one JSON document for every command; tables and notes go to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

TINY_TORCH = '''
import torch.nn as nn

INPUT_SHAPE = (1, 1, 16, 16)

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
'''


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory) -> tuple[str, Path]:
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("json_torch")
    (root / "tiny.py").write_text(TINY_TORCH)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_json_model", root / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.build().state_dict(), root / "tiny.pt")
    return f"{root / 'tiny.py'}:build", root / "tiny.pt"


def _args(command: str, tmp: Path, onnx: Path, npz: Path, torch_model: tuple[str, Path] | None) -> list:
    """The cheapest real run of each command (tiny models, a few runs, one epoch)."""
    spec, weights = torch_model if torch_model else ("", Path())
    return {
        "bench": ["bench", onnx, "--runs", "3", "--seconds", "0.01"],
        "eval": ["eval", onnx, "--data", npz],
        "devices": ["devices"],
        "devices list": ["devices", "list"],
        "check": ["check", onnx, "--target", "onnxruntime,openvino"],
        "quantize": ["quantize", onnx, "--mode", "dynamic", "-o", tmp / "q.onnx", "--data", npz, "--seconds", "0.01"],
        "analyze": ["analyze", onnx, "--data", npz, "--only", "--max-eval", "8"],
        "zoo": ["zoo", "--input-size", "1x16x16", "--classes", "10", "--only", "squeezenet1_1", "--no-latency",
                "--no-cache"],
        "prune": ["prune", spec, "--weights", weights, "--sparsity", "0.3", "-o", tmp / "p.onnx", "--no-latency"],
        "distill": ["distill", "--teacher", onnx, "--student", spec, "--data", npz, "-o", tmp / "s.onnx",
                    "--epochs", "1", "--no-baseline", "--bench-seconds", "0.01", "--threads", "1",
                    "--temperature", "2", "--alpha", "0.5", "--assistant", "none"],
        "export": ["export", spec, "--weights", weights, "--to", "onnx", "-o", tmp / "e.onnx"],
        "optimize": ["optimize", onnx, "--data", npz, "-o", tmp / "opt", "--recipes", _dynamic_only(tmp),
                     "--seconds", "0.01", "--threads", "1", "--metric", "agreement", "--max-drop", "0.5"],
        "split plan": ["split", "plan", onnx, "--devices", "rpi4,gateway-x86", "-o", tmp / "parts"],
        "split run": ["split", "run", tmp / "parts", "--items", "4"],
        "adapt": ["adapt", spec, "--weights", weights, "--data", npz, "-o", tmp / "a.onnx", "--strategy",
                  "last-layer", "--epochs", "1"],
    }[command]


def _dynamic_only(tmp: Path) -> Path:
    from edgeopt.search.recipe import Recipe
    from edgeopt.transforms.quantize import DynamicInt8

    path = tmp / "recipes.json"
    path.write_text(json.dumps([Recipe("int8-dynamic", (DynamicInt8(),)).to_dict()]))
    return path


TORCH_COMMANDS = {"zoo", "prune", "distill", "export", "adapt"}
SLOW = TORCH_COMMANDS | {"quantize", "optimize", "split plan", "split run"}
COMMANDS = ["bench", "eval", "devices", "devices list", "quantize", "analyze", "zoo", "prune", "distill", "export", "optimize",
            "split plan", "split run", "adapt", "check"]
# Exit 3 (budget not met) still prints the JSON: a machine reads why.
OK_CODES = {"optimize": (0, 3)}


def test_every_json_command_is_covered() -> None:
    """A new command with --json joins COMMANDS (and so this module's runs)."""
    from edgeopt.cli import app

    found: set[str] = set()

    def walk(command, path: tuple[str, ...]) -> None:
        if any("--json" in getattr(p, "opts", ()) for p in command.params):
            found.add(" ".join(path))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    # `devices check` needs a device over SSH: tests/runtimes/test_remote.py json.loads its whole stdout
    assert found - {"split", "devices check"} <= set(COMMANDS), f"add {sorted(found - set(COMMANDS))} to COMMANDS"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One folder, model and data for the whole module: split run runs the parts split plan wrote."""
    from tests.conftest import make_onnx_cnn

    tmp = tmp_path_factory.mktemp("json_runs")
    import numpy as np

    rng = np.random.default_rng(1)
    np.savez(tmp / "tiny.npz", x=rng.standard_normal((40, 1, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, size=40))
    return tmp, make_onnx_cnn(tmp / "tiny.onnx"), tmp / "tiny.npz"


@pytest.mark.parametrize("command", [c if c not in SLOW else pytest.param(c, marks=pytest.mark.slow)
                                     for c in COMMANDS])
def test_json_stdout_is_one_document(cli, shared, command, request) -> None:
    tmp, onnx, npz = shared
    torch_model = request.getfixturevalue("torch_model") if command in TORCH_COMMANDS else None
    if command == "split run" and not (tmp / "parts" / "plan.json").exists():
        assert cli(*_args("split plan", tmp, onnx, npz, None)).exit_code == 0
    args = _args(command, tmp, onnx, npz, torch_model)
    result = cli(*args, "--json", "-")
    assert result.exit_code in OK_CODES.get(command, (0,)), result.stderr
    payload = json.loads(result.stdout)  # the whole stdout, nothing before or after
    assert payload, "empty JSON document"
    assert result.stderr.strip(), "the human-readable output should be on stderr"


def test_json_file_and_stdout_agree_and_table_goes_to_stdout_without_it(cli, tmp_path, tiny_onnx, tiny_npz) -> None:
    with_json = cli("eval", tiny_onnx, "--data", tiny_npz, "--json", "-")
    to_file = cli("eval", tiny_onnx, "--data", tiny_npz, "--json", tmp_path / "e.json")
    assert json.loads(with_json.stdout) == json.loads((tmp_path / "e.json").read_text())
    assert "top-1 accuracy" in to_file.stdout and "top-1 accuracy" in with_json.stderr


def test_json_into_a_missing_folder_is_refused_before_work(cli, tmp_path, tiny_onnx) -> None:
    result = cli("bench", tiny_onnx, "--json", tmp_path / "no" / "such" / "x.json")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --json {tmp_path / 'no' / 'such' / 'x.json'}: folder " \
                                    f"{tmp_path / 'no' / 'such'} does not exist"
    assert not (tmp_path / "no").exists()
    folder = cli("devices", "--json", tmp_path)
    assert folder.exit_code == 2 and "is a directory" in folder.stderr


def test_subprocess_stdout_is_pure_json(tiny_onnx) -> None:
    """A real pipe: file descriptor 1 carries the document alone (C-level and child output go to 2)."""
    run = subprocess.run([sys.executable, "-m", "edgeopt", "bench", str(tiny_onnx), "--runs", "3", "--seconds",
                          "0.01", "--json", "-"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["latency_ms"]["p50"] > 0
    assert "edgeopt bench" in run.stderr
