"""Vision distillation: API, recipe transform, CLI outputs and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeopt.data import Dataset, load_data  # noqa: E402
from edgeopt.errors import BadInput, ConfigError, DataError  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.report.distill import distill  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402
from edgeopt.transforms.config import TransformContext, apply_config, config_from_dict, config_to_dict  # noqa: E402
from edgeopt.transforms.distill import Distill  # noqa: E402

STUDENT_SRC = '''
from torch import nn

INPUT_SHAPE = (1, 1, 32, 32)


def tiny(classes=10):
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, classes))


def seven():
    return tiny(7)


def big():  # 414K parameters: more than the bundled 372K teacher, no BatchNorm
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 400), nn.ReLU(), nn.Linear(400, 10))
'''


@pytest.fixture
def student_py(tmp_path: Path) -> Path:
    path = tmp_path / "student.py"
    path.write_text(STUDENT_SRC)
    return path


@pytest.fixture(scope="module")
def small_train(tmp_path_factory, digits_train_npz) -> Path:
    data = load_data(digits_train_npz).take(slice(0, 400))
    path = tmp_path_factory.mktemp("distill") / "train400.npz"
    np.savez(path, x=data.inputs["x"], y=data.labels)
    return path


def test_config_validates_and_round_trips():
    cfg = Distill(student="squeezenet1_1", alpha=0.5, feature_weight=0.5, train=TrainSettings(epochs=3, patience=2))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    auto = Distill(student="cnn3_w16", time_budget=60.0, assistant="none", train=TrainSettings(epochs="auto"))  # T and alpha chosen
    assert config_from_dict(json.loads(json.dumps(config_to_dict(auto)))) == auto
    for bad, message in [({"alpha": 1.5}, "--alpha must be in"), ({"temperature": 0}, "--temperature must be > 0"),
                         ({"val_fraction": 1.0}, "--val-fraction"), ({"augment_shift": -1}, "--augment-shift must be >= 0"),
                         ({"time_budget": 0}, "--time-budget must be > 0")]:
        with pytest.raises(BadInput, match=message):
            Distill(**bad)
    # the shared training settings: one check (TrainSettings), one error type, the flag named
    for bad, message in [({"epochs": 0}, "--epochs must be an integer >= 1 or 'auto', got 0"),
                         ({"epochs": "forever"}, "--epochs must be an integer >= 0 or 'auto', got 'forever'"),
                         ({"warmup": -0.1}, r"--warmup must be in \[0, 1\), got -0.1"),
                         ({"patience": 0}, "--patience must be an integer >= 1, got 0")]:
        with pytest.raises(ConfigError, match=message):
            Distill(train=TrainSettings(**bad))


@pytest.mark.slow
def test_distill_from_onnx_teacher_learns_and_reports(digits_onnx, small_train, student_py, digits_test_npz):
    teacher = load_model(digits_onnx)
    test = load_data(digits_test_npz).take(slice(0, 200))
    result = distill(teacher, load_data(small_train), Distill(student=f"{student_py}:tiny", temperature=4.0, alpha=0.7, assistant="none", train=TrainSettings(epochs=4, lr=1e-2)),
                     test=test, bench_seconds=0.2, progress=False)
    r = result.report
    assert r["teacher"]["accuracy"] > 0.97  # the bundled digits CNN
    assert r["student"]["accuracy"] > 0.7  # an 11.5K-parameter CNN after 4 short epochs (chance: 0.1)
    assert r["student"]["params"] == 11_498
    assert r["student"]["params"] == sum(p.numel() for p in result.student.module.parameters())
    assert r["teacher"]["params"] == 372_234 and r["teacher"]["macs"] is None
    assert r["ratios"]["params"] == pytest.approx(372_234 / 11_498) and r["ratios"]["size"] > 10
    assert r["latency"]["interleaved"] and r["student"]["latency_ms"]["p50"] > 0
    assert r["baseline"]["accuracy"] is not None and "distillation_gain_pt" in r
    assert r["data"] == {"train": 340, "validation": 60, "test": 200, "test_source": test.source}
    # The ONNX export is the trained student: same predictions as PyTorch.
    from edgeopt.measure.evaluate import predict
    from edgeopt.training import predict_torch

    onnx_out = predict(result.student_onnx, test)
    torch_out = predict_torch(result.student.module, test)
    assert np.allclose(onnx_out, torch_out, atol=1e-3)
    assert [i.name for i in result.student_onnx.inputs] == ["input"]


@pytest.mark.slow
def test_feature_matching_with_a_torch_teacher(digits_factory, small_train):
    spec, weights = digits_factory
    teacher = load_model(spec, weights=weights)
    data = load_data(small_train)
    result = distill(teacher, data, Distill(student="squeezenet1_1", feature_weight=1.0, temperature=2.0, alpha=0.5, train=TrainSettings(epochs=1)),
                     baseline=False, bench_seconds=0.1, progress=False)
    r = result.report
    assert r["config"]["feature_weight"] == 1.0 and r["baseline"] is None
    # torch-pruning counts BatchNorm's scale and shift; the ONNX export folds them into the convs
    assert r["teacher"]["macs"] > 0 and r["teacher"]["params"] == 372_682
    assert r["student"]["epochs_run"] == 1
    # the feature hooks are removed after training: inference has no side effects left
    net = result.student.module
    assert all(not m._forward_pre_hooks for m in net.modules())


@pytest.mark.slow
def test_augmented_distillation_runs_an_onnx_teacher_on_each_shifted_batch(digits_onnx, small_train, student_py,
                                                                           monkeypatch):
    """With --augment-shift the ONNX teacher runs in ONNX Runtime on every batch (not once up front)."""
    import edgeopt.transforms.distill as distill_module

    calls = []
    real = distill_module.teacher_function

    def counting(teacher):
        run = real(teacher)
        return lambda batch: calls.append(len(batch["x"])) or run(batch)

    monkeypatch.setattr(distill_module, "teacher_function", counting)
    test = load_data(small_train).take(slice(300, 400))
    result = distill(load_model(digits_onnx), load_data(small_train).take(slice(0, 300)),
                     Distill(student=f"{student_py}:tiny", augment_shift=2, temperature=4.0, alpha=0.7, assistant="none", train=TrainSettings(epochs=3, lr=1e-2, warmup=0.1)),
                     test=test, bench_seconds=0.1, progress=False)
    r = result.report
    n = r["data"]["train"]
    # one sample (the teacher's number of classes), the held-out 43 plain and shifted (the views
    # check), then every batch of 64 in each of 3 epochs: one teacher function, one ORT session
    assert n == 257 and calls == [1, 43, 43] + [64, 64, 64, 64, 1] * 3
    assert r["config"]["augment_shift"] == 2 and r["config"]["warmup"] == 0.1
    assert r["baseline"]["accuracy"] is not None and "augmentation" in r["baseline"]["description"]
    # the bundled teacher never saw shifted digits: the report says its soft targets there are poor
    views = r["teacher"]["validation_accuracy_on_views"]
    assert views["plain"] > 0.95 and views["shifted"] < views["plain"] - 0.05
    # so its soft targets lose to the labels, and the labels-only student ships, with a note
    assert r["chosen"] == "labels-only"
    assert any(n.startswith("distillation did not beat training on labels alone") for n in r["notes"])
    assert r["notes"][0] == (f"the teacher is {100 * views['shifted']:.1f}% accurate on images shifted by up to 2 px "
                          f"({100 * views['plain']:.1f}% unshifted): its soft targets on the shifted views are poor; "
                          "train the teacher with the same shifts or lower --augment-shift")


def test_report_notes_a_student_that_did_not_learn_and_is_not_smaller(digits_onnx, small_train, student_py):
    result = distill(load_model(digits_onnx), load_data(small_train), Distill(student=f"{student_py}:big", temperature=4, alpha=0.7, train=TrainSettings(epochs=1, lr=1e-9)),
                     baseline=False, bench_seconds=0.05, progress=False)
    r = result.report
    assert r["student"]["best_epoch"] == 0 and r["student"]["params"] == 414_010
    best = 100 * r["student"]["best_val_accuracy"]
    assert r["notes"] == [
        f"the student never beat its initial weights on the held-out split in 1 epoch(s) (best {best:.1f}%): "
        "train longer (--epochs) or change --lr",
        "the student has 414,010 parameters, the teacher 372,234: pick a smaller student (see edgeopt zoo)"]


def test_feature_matching_needs_a_torch_teacher(digits_onnx, small_train):
    with pytest.raises(BadInput, match="feature matching needs a PyTorch teacher"):
        distill(load_model(digits_onnx), load_data(small_train), Distill(feature_weight=1.0), progress=False)


def test_unlabelled_data_with_hard_loss_is_refused(digits_onnx):
    data = Dataset({"x": np.zeros((20, 1, 32, 32), np.float32)}, None, source="unlabelled.npz")
    with pytest.raises(DataError, match=r"has no labels \(y\) but alpha 0.7 < 1 asks for the hard-label loss"):
        distill(load_model(digits_onnx), data, Distill(alpha=0.7), progress=False)


@pytest.mark.slow
def test_recipe_step_returns_the_student_onnx(digits_onnx, small_train, student_py, monkeypatch):
    import importlib

    bench = importlib.import_module("edgeopt.measure.bench")
    data = load_data(small_train)
    train, val = data.split(0.8, seed=0)
    teacher = load_model(digits_onnx)
    # a recipe's student is timed once, by the search: the step itself times nothing
    monkeypatch.setattr(bench, "compare", lambda *a, **k: pytest.fail("the distill step timed a model"))
    config = Distill(student=f"{student_py}:tiny", temperature=2.0, alpha=0.5, assistant="none", train=TrainSettings(epochs=1))
    out = apply_config(teacher, config, TransformContext(train=train, validation=val, progress=False))
    assert out.format == "onnx" and out.size_bytes < teacher.size_bytes / 10
    # the same rule as edgeopt distill: the labels-only student was a candidate
    assert out.metadata["edgeopt.distill_chosen"] in ("labels-only", "T=2 alpha=0.5")
    # the INT8 variant of the recipe reuses the trained student instead of training it again
    again = apply_config(teacher, config, TransformContext(train=train, validation=val, progress=False))
    assert again is out
    assert out.outputs[0].shape[-1] == 10


# -- CLI --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_distill_writes_onnx_state_dict_and_report(cli, tmp_path, digits_onnx, small_train, student_py):
    out = tmp_path / "out" / "student.onnx"
    result = cli("distill", "--teacher", digits_onnx, "--student", f"{student_py}:tiny", "--data", small_train,
                 "-o", out, "--epochs", "2", "--lr", "0.01", "--temperature", "3", "--alpha", "0.8", "--assistant", "none",
                 "--bench-seconds", "0.1", "--threads", "1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["temperature"] == 3.0 and report["config"]["alpha"] == 0.8
    assert report["latency"]["threads"] == 1
    student = load_model(out)
    assert student.metadata["edgeopt.distilled_from"] == str(digits_onnx)
    state = torch.load(out.with_suffix(".pt"), weights_only=True)
    assert sum(v.numel() for v in state.values()) == report["student"]["params"]
    assert "teacher / student" in result.stdout and "(shipped)" in result.stdout
    other = "student (no teacher)" if report["student"]["distilled"] else "student (best distilled)"
    assert other in result.stdout  # the candidate not shipped is shown beside the one that is


@pytest.mark.parametrize("student, message", [
    ("seven", "has 7 outputs but the teacher has 10"),
    ("mobilenet_v9", "unknown architecture 'mobilenet_v9'; known: mobilenet_v2_0.5"),
])
def test_cli_bad_student_exit_2_one_line(cli, tmp_path, digits_onnx, small_train, student_py, student, message):
    spec = f"{student_py}:{student}" if student == "seven" else student
    out = tmp_path / "s.onnx"
    result = cli("distill", "--teacher", digits_onnx, "--student", spec, "--data", small_train, "-o", out)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.glob("s.*")) == []


def test_cli_unlabelled_data_exit_2(cli, tmp_path, digits_onnx, student_py):
    data = tmp_path / "nolabels.npz"
    np.savez(data, x=np.zeros((30, 1, 32, 32), np.float32))
    out = tmp_path / "s.onnx"
    result = cli("distill", "--teacher", digits_onnx, "--student", f"{student_py}:tiny", "--data", data, "-o", out,
                 "--alpha", "0.7")
    assert result.exit_code == 2
    assert "has no labels (y) but alpha 0.7 < 1 asks for the hard-label loss; pass --alpha 1" in result.stderr
    assert not out.exists()


def test_cli_output_must_be_onnx(cli, tmp_path, digits_onnx, small_train):
    result = cli("distill", "--teacher", digits_onnx, "--student", "squeezenet1_1", "--data", small_train,
                 "-o", tmp_path / "s.tflite")
    assert result.exit_code == 2 and "-o must name an .onnx file" in result.stderr
