"""Distillation that pays or says so: candidates chosen on validation, --epochs auto, TAKD, notes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeopt.errors import BadInput  # noqa: E402
from edgeopt.search.distill_choice import KdCandidate, kd_settings, parse_epochs, pick, train_schedule  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402

STUDENT_SRC = '''
from torch import nn


def tiny(classes=10):  # 11.5K parameters: 32x fewer than the bundled 372K digits CNN
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, classes))
'''


@pytest.fixture
def student_py(tmp_path: Path) -> str:
    path = tmp_path / "student.py"
    path.write_text(STUDENT_SRC)
    return f"{path}:tiny"


@pytest.fixture(scope="module")
def digits400(tmp_path_factory, digits_train_npz) -> Path:
    from edgeopt.data import load_data

    data = load_data(digits_train_npz).take(slice(0, 400))
    path = tmp_path_factory.mktemp("choice") / "train400.npz"
    np.savez(path, x=data.inputs["x"], y=data.labels)
    return path


@pytest.fixture(scope="module")
def test200(tmp_path_factory, digits_test_npz) -> Path:
    from edgeopt.data import load_data

    data = load_data(digits_test_npz).take(slice(0, 200))
    path = tmp_path_factory.mktemp("choice") / "test200.npz"
    np.savez(path, x=data.inputs["x"], y=data.labels)
    return path


@pytest.fixture(scope="module")
def wrong_teacher(tmp_path_factory, digits_onnx) -> Path:
    """The bundled digits CNN with its classifier rows rolled: it answers (digit + 1) % 10, confidently."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(digits_onnx))
    rolled = 0
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.shape in ((10, 256), (10,)):
            init.CopyFrom(numpy_helper.from_array(np.roll(array, 1, axis=0), init.name))
            rolled += 1
    assert rolled == 2
    path = tmp_path_factory.mktemp("choice") / "wrong_teacher.onnx"
    onnx.save(proto, str(path))
    return path


def test_grid_and_given_values():
    assert kd_settings(None, None, labels=True) == [(1, 0.3), (1, 0.7), (2, 0.3), (2, 0.7), (4, 0.3), (4, 0.7)]
    assert kd_settings(3.0, 0.8, labels=True) == [(3.0, 0.8)]  # given values are used as given
    assert kd_settings(None, 0.5, labels=True) == [(1, 0.5), (2, 0.5), (4, 0.5)]
    # no labels: teacher only, and nothing to choose a temperature on
    assert kd_settings(None, None, labels=False) == [(4.0, 1.0)]
    assert parse_epochs("AUTO") == "auto" and parse_epochs("7") == 7
    for bad in ("0", "ten", "-3"):
        with pytest.raises(BadInput, match="--epochs must be"):
            parse_epochs(bad)
    auto = train_schedule("auto", patience=None, time_budget=None, runs=4)
    assert auto == {"epochs": 100, "patience": 5, "schedule": "plateau", "max_seconds": 450.0}
    assert train_schedule(12, patience=3, time_budget=60, runs=3)["max_seconds"] == 20


def test_a_tie_ships_the_labels_only_student():
    base = KdCandidate("labels-only", "none", val_accuracy=0.9)
    kd = KdCandidate("T=1 alpha=0.3", "teacher", 1.0, 0.3, val_accuracy=0.9)
    better = KdCandidate("T=2 alpha=0.3", "teacher", 2.0, 0.3, val_accuracy=0.91)
    assert pick([kd, base]) is base and pick([base, kd]) is base
    assert pick([base, kd, better]) is better


@pytest.mark.slow
def test_when_the_baseline_wins_the_cli_ships_it_and_says_so(cli, tmp_path, wrong_teacher, digits400, test200,
                                                             student_py):
    out = tmp_path / "student.onnx"
    result = cli("distill", "--teacher", wrong_teacher, "--student", student_py, "--data", digits400,
                 "--test-data", test200, "-o", out, "--epochs", "3", "--lr", "0.01", "--temperature", "2",
                 "--alpha", "0.9", "--assistant", "none", "--bench-seconds", "0.05", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["labels-only", "T=2 alpha=0.9"]
    base, kd = report["candidates"]
    assert base["val_accuracy"] > kd["val_accuracy"]  # the teacher teaches the wrong digit
    assert report["chosen"] == "labels-only" and report["student"]["distilled"] is False
    assert report["student"]["accuracy"] == pytest.approx(report["baseline"]["accuracy"], abs=1e-9)
    assert report["distillation_gain_pt"] == 0.0 and report["best_distilled_gain_pt"] < 0
    note = (f"distillation did not beat training on labels alone: the best distilled student (T=2 alpha=0.9) scored "
            f"{100 * kd['val_accuracy']:.2f}% on the validation split, the labels-only student "
            f"{100 * base['val_accuracy']:.2f}%; shipped the labels-only student")
    assert note in report["notes"]
    assert "distillation did not beat training on labels alone" in result.stderr
    assert "labels-only (shipped)" in result.stdout and "student (labels only, shipped)" in result.stdout
    # the file shipped is the labels-only student: its predictions on the test digits give that accuracy
    from edgeopt.data import load_data
    from edgeopt.measure.evaluate import evaluate
    from edgeopt.model import load_model

    assert evaluate(load_model(out), load_data(test200)).accuracy == pytest.approx(base["test_accuracy"])


@pytest.mark.slow
def test_epochs_auto_stops_on_the_plateau(digits_onnx, digits400, student_py):
    from edgeopt.data import load_data
    from edgeopt.model import load_model
    from edgeopt.report.distill import distill
    from edgeopt.transforms.distill import Distill

    result = distill(load_model(digits_onnx), load_data(digits400),
                     Distill(student=student_py, temperature=2.0, alpha=0.5, assistant="none", time_budget=120, train=TrainSettings(epochs="auto", patience=1, lr=1e-2)),
                     baseline=False, bench_seconds=0.05, progress=False)
    r = result.report
    assert r["config"]["train_schedule"] == {"epochs": 100, "patience": 1, "schedule": "plateau", "max_seconds": 120}
    s = r["student"]
    assert s["stopped"] == "patience" and s["epochs_run"] == s["best_epoch"] + 1 < 100
    # nothing chose on the test split: it is held out of the data as well as the validation split
    assert r["data"] == {"train": 281, "validation": 59, "test": 60,
                         "test_source": f"a held-out test split of {load_data(digits400).source} (60)"}
    assert not any("also used for training or choosing" in n for n in r["notes"])


@pytest.mark.slow
def test_notes_for_a_best_epoch_that_is_the_last_and_test_data_that_chose(digits_onnx, digits400, student_py):
    from edgeopt.data import load_data
    from edgeopt.model import load_model
    from edgeopt.report.distill import distill
    from edgeopt.transforms.distill import Distill

    data = load_data(digits400)
    result = distill(load_model(digits_onnx), data, Distill(student=student_py, temperature=2.0, alpha=0.5, assistant="none", train=TrainSettings(epochs=1, lr=1e-2)),
                     test=data.take(slice(0, 50)), baseline=False, bench_seconds=0.05, progress=False)
    r = result.report
    assert r["student"]["best_epoch"] == r["student"]["epochs_run"] == 1
    assert ("the shipped student (T=2 alpha=0.5) had its best validation accuracy in its last epoch (1 of 1); it was "
            "still improving: more --epochs or --epochs auto may give a better model") in r["notes"]
    leak = [n for n in r["notes"] if "also used for training or choosing" in n]
    assert len(leak) == 1 and leak[0].startswith("50 of 50 test samples")
    assert "pass --test-data with samples that chose nothing" in leak[0]


@pytest.mark.slow
def test_takd_for_a_student_32x_smaller(digits_onnx, digits400, student_py):
    """A catalogue network between the two (cnn3_w32, 94K) is distilled first and teaches the student."""
    from edgeopt.data import load_data
    from edgeopt.model import load_model
    from edgeopt.report.distill import distill
    from edgeopt.transforms.distill import Distill

    result = distill(load_model(digits_onnx), load_data(digits400),
                     Distill(student=student_py, temperature=2.0, alpha=0.5, train=TrainSettings(epochs=2, lr=1e-2)),
                     bench_seconds=0.05, progress=False)
    r = result.report
    assert r["assistant"] == "cnn3_w32"
    names = [c["name"] for c in r["candidates"]]
    assert names == ["labels-only", "T=2 alpha=0.5", "T=2 alpha=0.5 via cnn3_w32"]
    takd = r["candidates"][2]
    assert takd["teacher"] == "assistant cnn3_w32" and takd["assistant"]["params"] == 94_186
    assert takd["assistant"]["epochs_run"] == 2 and 0 <= takd["assistant"]["val_accuracy"] <= 1
    assert takd["epochs_run"] == 2 and takd["val_accuracy"] is not None and takd["test_accuracy"] is not None
    best_val = max(c["val_accuracy"] for c in r["candidates"])
    chosen = next(c for c in r["candidates"] if c["name"] == r["chosen"])
    assert chosen["val_accuracy"] == best_val
    assert r["ratios"]["params"] == pytest.approx(372_234 / 11_498)
