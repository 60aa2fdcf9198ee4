"""edgeopt adapt: strategies, measured memory, guards, checkpoints/resume, export, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeopt.adapt import (  # noqa: E402
    AdaptConfig,
    BiasLast,
    FullFinetune,
    LastLayer,
    SparseUpdate,
    adapt,
    checkpoint_path,
    get_strategy,
    is_quantized,
    load_checkpoint,
    mark_trainable,
    measure_training_memory,
    save_checkpoint,
)
from edgeopt.data import Dataset  # noqa: E402
from edgeopt.errors import BudgetNotMet, ConfigError, DataError, ModelError  # noqa: E402
from edgeopt.measure.evaluate import evaluate, predict  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402

NET = textwrap.dedent('''
    from torch import nn

    INPUT_SHAPE = (1, 1, 8, 8)


    def build():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
''')
# Parameters: conv 72, bn 16, conv 1152, bn 32, linear 48+3 = 1323.
TOTAL = 1323


def patterns(n: int, *, seed: int, shifted: bool) -> Dataset:
    """Three classes: a bright row, column or diagonal; the shifted domain moves and dims them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(0.0, 0.1, (n, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        k = 2 if not shifted else 5
        if label == 0:
            x[i, 0, k, :] += 1.0
        elif label == 1:
            x[i, 0, :, k] += 1.0
        else:
            x[i, 0][np.eye(8, dtype=bool)[:, ::-1] if shifted else np.eye(8, dtype=bool)] += 1.0
    if shifted:
        x = 0.6 * x + 0.3
    return Dataset(inputs={"x": x.astype(np.float32)}, labels=y.astype(np.int64), source="shifted" if shifted else "clean")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny CNN trained on the clean domain: (file.py:factory spec, state_dict path)."""
    from edgeopt.training import TrainConfig, fit

    root = tmp_path_factory.mktemp("adapt_base")
    (root / "net.py").write_text(NET)
    spec = f"{root / 'net.py'}:build"
    torch.manual_seed(0)
    model = load_model(spec)
    fit(model.module, patterns(240, seed=0, shifted=False), config=TrainConfig(train=TrainSettings(epochs=15, lr=1e-2)), progress=False)
    weights = root / "net.pt"
    torch.save(model.module.state_dict(), weights)
    return spec, weights


@pytest.fixture(scope="module")
def local_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapt_data") / "local.npz"
    d = patterns(120, seed=1, shifted=True)
    np.savez(path, x=d.inputs["x"], y=d.labels)
    return path


def load(base: tuple[str, Path]):
    return load_model(base[0], weights=base[1])


# -- strategies --------------------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "expected"), [
    (LastLayer(), 16 * 3 + 3),
    (BiasLast(), 51 + 8 + 16),                 # last layer + BatchNorm biases (convs have none)
    (SparseUpdate(blocks=2), 51 + 1152 + 24),  # last two weight layers + every bias
    (FullFinetune(), TOTAL),
])
def test_strategies_select_exact_parameters(base, strategy, expected) -> None:
    module = load(base).module
    params = mark_trainable(module, strategy)
    assert sum(p.numel() for p in params) == expected
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected


def test_strategy_errors() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'tiny'"):
        get_strategy("tiny")
    with pytest.raises(ConfigError, match="blocks >= 1"):
        SparseUpdate(blocks=0)
    with pytest.raises(ConfigError, match="unknown strategy"):
        AdaptConfig(strategy="everything")
    with pytest.raises(ConfigError, match="--memory-mb must be > 0"):
        AdaptConfig(memory_mb=0)


# -- memory --------------------------------------------------------------------------------------
def test_measured_memory_grows_with_strategy_and_batch(base) -> None:
    module = load(base).module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    data = patterns(96, seed=3, shifted=True)
    last = measure_training_memory(module, data, LastLayer(), batch_size=32)
    full = measure_training_memory(module, data, FullFinetune(), batch_size=32)
    full_big = measure_training_memory(module, patterns(384, seed=3, shifted=True), FullFinetune(), batch_size=128)
    # Activations for a 32x16x8x8 float map alone are 128 KB; full training keeps several.
    assert 0.1 < last.peak_mb < full.peak_mb < full_big.peak_mb
    assert full_big.peak_step_bytes > 3 * full.peak_step_bytes
    # float32 parameters + BatchNorm running mean/var + two int64 num_batches_tracked
    assert full.weights_bytes == (TOTAL + 2 * (8 + 16)) * 4 + 2 * 8 == 5500
    assert (last.trainable_params, full.trainable_params) == (51, TOTAL)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trial_peak_covers_a_whole_training_run(base) -> None:
    """The 3-step trial must not under-report what a longer run with validation really allocates."""
    import copy

    from edgeopt.adapt.memory import _peak_live_bytes
    from edgeopt.adapt.strategies import frozen_norm_statistics
    from edgeopt.training import TrainConfig, fit

    module = load(base).module
    data = patterns(100, seed=4, shifted=True)
    trial = measure_training_memory(module, data, FullFinetune(), batch_size=32)
    real = copy.deepcopy(module)
    params = mark_trainable(real, FullFinetune())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof, \
            frozen_norm_statistics(real):
        fit(real, data, config=TrainConfig(train=TrainSettings(epochs=3, batch_size=32)), validation=data.take(slice(0, 40)),
            params=params, progress=False)
    whole_run = _peak_live_bytes(prof) + trial.weights_bytes
    assert whole_run <= trial.peak_bytes * 1.05


# -- adapt API -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_budget_picks_most_capable_fitting_or_refuses(base, tmp_path) -> None:
    model = load(base)
    local = patterns(60, seed=1, shifted=True)
    trials = {s.name: measure_training_memory(model.module, local.split(0.8, seed=0)[0], s, batch_size=32)
              for s in (LastLayer(), FullFinetune())}
    too_small = trials["last-layer"].peak_mb / 2
    out = tmp_path / "never.onnx"
    with pytest.raises(BudgetNotMet, match="no strategy fits in --memory-mb") as err:
        adapt(model, local, config=AdaptConfig(memory_mb=too_small, train=TrainSettings(epochs=1)), out=out, progress=False)
    assert err.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []
    budget = (trials["last-layer"].peak_mb + trials["full"].peak_mb) / 2
    result = adapt(model, local, config=AdaptConfig(memory_mb=budget, train=TrainSettings(epochs=2)), progress=False)
    table = result.report["strategies"]
    assert [row["strategy"] for row in table] == ["last-layer", "bias-last", "sparse", "full"]
    fitting = [row["strategy"] for row in table if row["peak_mb"] <= budget]
    assert result.report["strategy"]["name"] == fitting[-1] != "full"
    assert result.report["peak_memory_mb"] <= budget


def test_forgetting_exactly_the_limit_is_allowed() -> None:
    from edgeopt.adapt.adapt import _rollback_reason

    cfg = AdaptConfig(max_forget=0.02)
    before = {"local": 0.5, "original": 1.0}
    assert _rollback_reason(before, {"local": 0.9, "original": 0.98}, cfg) is None  # 1.0 - 0.98 = 0.020000000000000018
    assert _rollback_reason(before, {"local": 0.9, "original": 0.97}, cfg) == (
        "original-domain accuracy dropped 3.0 pt (> --max-forget 2.0 pt)")


@pytest.mark.slow
def test_auto_falls_back_to_a_less_capable_strategy_when_one_forgets(base) -> None:
    local = patterns(120, seed=1, shifted=True)
    original = patterns(90, seed=9, shifted=False)
    cfg = AdaptConfig(max_forget=0.05, train=TrainSettings(epochs=15, lr=0.05))  # at this rate full fine-tuning forgets the clean domain
    r = adapt(load(base), local, original=original, config=cfg, progress=False).report
    assert [a["strategy"] for a in r["attempts"]] == ["full", "sparse"]
    full = r["attempts"][0]
    assert full["rollback_reason"].startswith("original-domain accuracy dropped")
    assert full["accuracy_after"]["original"] < r["accuracy_before"]["original"] - 0.05
    assert r["strategy"]["name"] == "sparse" and not r["rolled_back"]
    assert r["accuracy_after"]["original"] >= r["accuracy_before"]["original"] - 0.05
    assert r["accuracy_after"]["local"] > r["accuracy_before"]["local"]
    # a strategy the user named is not swapped for another: it is rolled back
    named = adapt(load(base), local, original=original, config=AdaptConfig(**{**cfg.__dict__, "strategy": "full"}),
                  progress=False).report
    assert named["rolled_back"] and [a["strategy"] for a in named["attempts"]] == ["full"]


@pytest.mark.slow
def test_rollback_when_nothing_to_gain_output_is_input(base) -> None:
    model = load(base)
    clean = patterns(60, seed=7, shifted=False)  # the model already gets these right
    result = adapt(model, clean, config=AdaptConfig(strategy="full", train=TrainSettings(epochs=2, lr=1e-2)), progress=False)
    assert result.rolled_back
    assert "no improvement" in result.report["rollback_reason"] or "worse" in result.report["rollback_reason"]
    for key, value in model.module.state_dict().items():
        assert torch.equal(result.state_dict[key], value), key
    got = predict(result.model, clean)
    with torch.no_grad():
        ref = model.module(torch.from_numpy(clean.inputs["x"])).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_data_errors(base) -> None:
    model = load(base)
    local = patterns(30, seed=1, shifted=True)
    with pytest.raises(DataError, match="--replay takes its samples from the original data"):
        adapt(model, local, config=AdaptConfig(replay=5), progress=False)
    with pytest.raises(DataError, match="leaves no original samples"):
        adapt(model, local, config=AdaptConfig(replay=30), original=patterns(30, seed=2, shifted=False),
              progress=False)
    with pytest.raises(DataError, match="at least 10"):
        adapt(model, local.take(slice(0, 5)), progress=False)
    unlabelled = Dataset(inputs=local.inputs, labels=None, source="nolabels.npz")
    with pytest.raises(DataError, match="no labels"):
        adapt(model, unlabelled, progress=False)


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_corrupt(tmp_path) -> None:
    path = tmp_path / "m.onnx.ckpt.pt"
    save_checkpoint(path, state_dict={"w": torch.ones(3)}, info={"epoch": 2, "runs": [{"samples": 5}]})
    state, info = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(3)) and info["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx.ckpt.pt"]  # no temp files left
    path.write_bytes(b"half a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ModelError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "missing.ckpt.pt")


# -- inputs and re-quantization ------------------------------------------------------------------
def test_onnx_input_converts_with_onnx2torch_or_says_what_to_pass(tmp_path) -> None:
    from tests.conftest import make_onnx_cnn

    onnx_model = load_model(make_onnx_cnn(tmp_path / "cnn.onnx", channels=8, classes=10, size=16))
    rng = np.random.default_rng(0)
    local = Dataset(inputs={"input": rng.standard_normal((40, 1, 16, 16)).astype(np.float32)},
                    labels=np.arange(40) % 10, source="local")
    result = adapt(onnx_model, local, config=AdaptConfig(strategy="last-layer", train=TrainSettings(epochs=1)), progress=False)
    assert result.report["trainable_params"] == 8 * 10 + 10
    assert result.report["total_params"] == 8 * 9 + 8 + 90
    assert result.model.inputs[0].shape[1:] == (1, 16, 16)


@pytest.mark.slow
def test_requantize_like_deployed_and_refuse_quantized_input(base, tmp_path) -> None:
    from edgeopt.transforms.export import to_onnx
    from edgeopt.transforms.quantize import StaticInt8, quantize

    local = patterns(60, seed=1, shifted=True)
    fp32, _ = to_onnx(load(base), data=local)
    int8 = quantize(fp32, StaticInt8(), data=local).save(tmp_path / "int8.onnx")
    assert is_quantized(int8) and not is_quantized(fp32)
    with pytest.raises(ModelError, match="is quantized and cannot be trained"):
        adapt(int8, local, progress=False)
    # onnx2torch has no converter for ReduceMean-18, which the torch.export exporter emits for pooling.
    with pytest.raises(ModelError, match="ReduceMean.*pass the PyTorch model as file.py:factory"):
        adapt(fp32, local, progress=False)
    result = adapt(load(base), local, deployed=int8, config=AdaptConfig(strategy="last-layer", train=TrainSettings(epochs=8, lr=1e-2)),
                   progress=False)
    assert is_quantized(result.model)
    assert result.report["quantized"]["type"] == "StaticInt8"
    assert {n.op_type for n in result.model.onnx.graph.node} & {"QuantizeLinear", "QLinearConv"}
    acc = evaluate(result.model, local, threads=1).accuracy
    assert acc >= result.report["accuracy_before"]["local"]


# -- CLI -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_adapt_improves_local_keeps_bn_stats_and_writes_outputs(cli, base, local_npz, tmp_path) -> None:
    from edgeopt.data import load_data

    spec, weights = base
    original = tmp_path / "orig.npz"
    o = patterns(90, seed=9, shifted=False)
    np.savez(original, x=o.inputs["x"], y=o.labels)
    out = tmp_path / "out" / "adapted.onnx"
    res = cli("adapt", spec, "--weights", weights, "--data", local_npz, "-o", out, "--strategy", "last-layer",
              "--epochs", "15", "--lr", "0.01", "--original-data", original, "--replay", "30", "--json", "-")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert not r["rolled_back"], r["rollback_reason"]
    assert r["accuracy_after"]["local"] >= r["accuracy_before"]["local"] + 0.2
    assert r["strategy"]["name"] == "last-layer" and r["trainable_params"] == 51 and r["total_params"] == TOTAL
    assert r["samples"] == {"local_train": 96, "local_validation": 24, "replay": 30, "original_check": 60}
    assert r["accuracy_after"]["original"] is not None and r["peak_memory_mb"] > 0
    # Only the classifier changed: BatchNorm running statistics and conv weights are the input's.
    state = torch.load(out.with_suffix(".pt"), weights_only=True)
    start = load(base).module.state_dict()
    for key, value in start.items():
        if not key.startswith("8."):
            assert torch.equal(state[key], value), key
    assert not torch.equal(state["8.weight"], start["8.weight"])
    saved = load_model(out)
    assert saved.metadata["edgeopt.adapted_strategy"] == "last-layer"
    local_val = load_data(local_npz).split(0.8, seed=0)[1]
    assert evaluate(saved, local_val, threads=1).accuracy == pytest.approx(r["accuracy_after"]["local"], abs=1e-6)
    on_disk = json.loads(out.with_name("adapted.report.json").read_text())
    assert on_disk["outputs"]["size_bytes"] == out.stat().st_size
    ck_state, info = load_checkpoint(checkpoint_path(out))
    assert info["complete"] is True and torch.equal(ck_state["8.weight"], state["8.weight"])


def test_cli_bad_input_one_line_exit_2(cli, base, local_npz, tmp_path) -> None:
    spec, weights = base
    out = tmp_path / "a.onnx"
    res = cli("adapt", spec, "--weights", weights, "--data", local_npz, "-o", out, "--strategy", "bogus")
    assert res.exit_code == 2 and "unknown strategy 'bogus'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("adapt", spec, "--weights", weights, "--data", local_npz, "-o", tmp_path / "a.pt")
    assert res.exit_code == 2 and "-o must name an .onnx file" in res.stderr
    res = cli("adapt", spec, "--weights", weights, "--data", local_npz, "-o", out, "--resume")
    assert res.exit_code == 2 and "no checkpoint to resume from" in res.stderr
    res = cli("adapt", spec, "--weights", weights, "--data", tmp_path / "nope.npz", "-o", out)
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    res = cli("adapt", spec, "--weights", weights, "--data", local_npz, "-o", out, "--memory-mb", "0.001")
    assert res.exit_code == 3 and "no strategy fits in --memory-mb 0.001" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kill_mid_run_then_resume_gives_valid_model(cli, base, local_npz, tmp_path) -> None:
    spec, weights = base
    out = tmp_path / "adapted.onnx"
    ckpt = checkpoint_path(out)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "edgeopt", "adapt", spec, "--weights", str(weights), "--data", str(local_npz),
           "-o", str(out), "--strategy", "full", "--lr", "0.01"]
    proc = subprocess.Popen([*cmd, "--epochs", "5000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "adapt ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half-written model
    state, info = load_checkpoint(ckpt)  # the checkpoint is whole
    assert info["complete"] is False and info["epoch"] >= 1
    res = cli(*cmd[3:], "--epochs", "3", "--resume", "--json", "-")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["resumed"] is True and len(report["runs"]) == 2
    model = load_model(out)
    from edgeopt.data import load_data

    outputs = predict(model, load_data(local_npz))
    assert outputs.shape == (120, 3) and np.isfinite(outputs).all()
    _, done = load_checkpoint(ckpt)
    assert done["complete"] is True
