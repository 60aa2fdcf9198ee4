"""optimize end to end on the bundled digits CNN: choice, reports, budget, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeopt.measure.bench import BenchSettings
from edgeopt.model import load_model
from edgeopt.search.optimize import optimize
from edgeopt.search.recipe import Recipe
from edgeopt.training import TrainSettings
from edgeopt.transforms import quantize

FAST = BenchSettings(warmup=5, min_runs=50, min_seconds=0.3, max_seconds=3.0)


def recipes() -> list[Recipe]:
    return [
        Recipe("int8-static-qdq", (quantize.StaticInt8(format="qdq", per_channel=True),), needs=("calibration",)),
        Recipe("int8-dynamic", (quantize.DynamicInt8(),)),
        Recipe("fp16", (quantize.Fp16(),)),
    ]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_onnx, digits_test_npz):
    out = tmp_path_factory.mktemp("opt")
    # objective size: which candidate wins does not hang on a latency interval measured on a loaded machine
    # (the latency rule itself is tested with fixed figures in test_search_engine.py)
    result = optimize(digits_onnx, digits_test_npz, out_dir=out, max_drop=0.01, recipes=recipes(), bench=FAST,
                      threads=1, objective="size", progress=False)
    return out, result


@pytest.mark.slow
def test_chooses_the_smallest_int8_within_budget(digits_run) -> None:
    out, result = digits_run
    assert result.chosen is not None
    assert result.chosen.name == "int8-static-qdq"
    assert result.chosen.size_ratio >= 3.5
    assert result.chosen.speedup >= 1 / 1.03  # never chosen if slower (a ratio of interleaved timings)
    assert result.chosen.drop <= 0.01
    by_name = {r.name: r for r in result.results}
    assert by_name["int8-dynamic"].status == "rejected"
    assert "slower" in by_name["int8-dynamic"].reason
    chosen_model = load_model(out / "model.onnx")
    assert chosen_model.metadata["edgeopt.runtime"] == "onnxruntime"
    assert "StaticInt8" in chosen_model.metadata["edgeopt.recipe"]


@pytest.mark.slow
def test_reports_are_complete_and_self_contained(digits_run) -> None:
    out, result = digits_run
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == "int8-static-qdq"
    assert {c["name"] for c in report["candidates"]} == {"int8-static-qdq", "int8-dynamic", "fp16"}
    for c in report["candidates"]:
        assert c["status"] in ("chosen", "rejected", "failed") and c["reason"]
        assert c["latency_ms"]["p50"] > 0 and c["accuracy"] is not None
    assert "original" in report["pareto"] or report["pareto"]
    md = (out / "report.md").read_text()
    assert "Chosen: int8-static-qdq" in md and "| int8-dynamic |" in md
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 3
    for external in ('src="http', "src='http", 'href="http', "url(http", "<link", "<script src"):
        assert external not in page, external
    assert "Chosen: int8-static-qdq" in page


@pytest.mark.slow
def test_rerun_reuses_every_candidate_and_keeps_the_choice(digits_run, digits_onnx, digits_test_npz) -> None:
    out, first = digits_run
    again = optimize(digits_onnx, digits_test_npz, out_dir=out, max_drop=0.01, recipes=recipes(), bench=FAST,
                     objective="size",
                     threads=1, progress=False)
    assert again.reused == 3
    assert again.chosen.name == first.chosen.name
    assert again.chosen.latency_ms == first.chosen.latency_ms  # finished timing reused, not re-measured


def _recipes_file(tmp_path: Path, items: list[Recipe]) -> Path:
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps([r.to_dict() for r in items]))
    return path


@pytest.mark.slow
def test_budget_unreachable_exits_3_naming_the_closest(cli, tmp_path, digits_onnx, digits_test_npz) -> None:
    only_dynamic = _recipes_file(tmp_path, [Recipe("int8-dynamic", (quantize.DynamicInt8(),))])
    result = cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "o", "--recipes", only_dynamic,
                 "--seconds", "0.2", "--threads", "1")
    assert result.exit_code == 3, result.output
    assert "no candidate met the budget" in result.stderr and "closest: int8-dynamic" in result.stderr
    assert not (tmp_path / "o" / "model.onnx").exists()
    assert (tmp_path / "o" / "report.html").exists()


def test_bad_input(cli, tmp_path, digits_onnx, digits_test_npz) -> None:
    no_data = cli("optimize", digits_onnx, "-o", tmp_path / "o")
    assert no_data.exit_code == 2 and "--data" in no_data.output
    missing = cli("optimize", digits_onnx, "--data", tmp_path / "none.npz", "-o", tmp_path / "o")
    assert missing.exit_code == 2 and "data not found" in missing.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", blocker / "out")
    assert unwritable.exit_code == 2 and "not writable" in unwritable.stderr
    negative = cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "o", "--max-drop", "-1")
    assert negative.exit_code == 2 and "--max-drop" in negative.stderr
    bad_objective = cli("optimize", digits_onnx, "--data", digits_test_npz, "-o", tmp_path / "o", "--objective", "joy")
    assert bad_objective.exit_code == 2 and "--objective" in bad_objective.stderr


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_reuses_finished_candidates(tmp_path, digits_onnx, digits_test_npz) -> None:
    plan = _recipes_file(tmp_path, recipes())
    out = tmp_path / "o"
    # --objective size: the choice does not depend on timing on a loaded machine
    cmd = [sys.executable, "-m", "edgeopt", "optimize", str(digits_onnx), "--data", str(digits_test_npz), "-o",
           str(out), "--recipes", str(plan), "--seconds", "0.2", "--threads", "1", "--objective", "size",
           "--json", str(tmp_path / "r.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((out / "candidates").glob("*/result.json")):
        assert proc.poll() is None, "optimize ended before the first candidate was cached"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished on its own
    finished = {p.parent.name for p in (out / "candidates").glob("*/result.json")}
    assert 1 <= len(finished) < len(recipes()), finished  # interrupted with work left to do
    assert not (out / "model.onnx").exists() and not (tmp_path / "r.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reused_candidates"] == len(finished)  # exactly the finished ones, nothing half-built
    assert report["chosen"] == "int8-static-qdq"
    assert load_model(out / "model.onnx").size_bytes < digits_onnx.stat().st_size / 3.5


@pytest.mark.slow
def test_pytorch_model_gets_pruning_recipes_judged_on_held_out_data(tmp_path, digits_factory, digits_train_npz) -> None:
    pytest.importorskip("torch_pruning")
    from edgeopt.data import load_data
    from edgeopt.search.space import training_recipes
    from edgeopt.transforms.export import OnnxExport
    from edgeopt.transforms.prune import StructuredPrune

    spec, weights = digits_factory
    original = load_model(spec, weights=weights)
    from edgeopt.devices import get_device

    names = [r.name for r in training_recipes(original, get_device("host"))]
    assert "prune-50-finetune-int8" in names and "prune-30-finetune" in names
    plan = [Recipe("prune-50-int8", (StructuredPrune(ratio=0.5, train=TrainSettings(epochs=3)), OnnxExport(), quantize.StaticInt8()),
                   needs=("torch", "train", "calibration"))]
    data = load_data(digits_train_npz).take(slice(0, 600))
    result = optimize(original, data, out_dir=tmp_path / "o", max_drop=0.05, recipes=plan, bench=FAST, threads=1,
                      progress=False)
    cand = result.results[0]
    assert cand.status != "failed", cand.reason
    assert cand.size_ratio > 8  # half the channels (about 4x fewer weights) and INT8 (4x smaller each)
    assert cand.speedup > 1.5
    assert result.baseline.accuracy > 0.97


@pytest.mark.slow
def test_ray_executor_builds_candidates_remotely_and_times_them_here(tmp_path, digits_onnx, digits_test_npz) -> None:
    pytest.importorskip("ray")
    plan = [Recipe("int8-static-qdq", (quantize.StaticInt8(),), needs=("calibration",))]
    result = optimize(digits_onnx, digits_test_npz, out_dir=tmp_path / "o", recipes=plan, bench=FAST, threads=1,
                      executor="ray", progress=False)
    assert any("built 1 candidate(s) on Ray" in n for n in result.notes)
    assert result.chosen is not None and result.chosen.size_ratio > 3.5
    assert result.chosen.latency_ms["p50"] < result.baseline.latency_ms["p50"]


def test_fine_tuning_split_is_85_15_disjoint_and_needs_20_samples(digits_test_npz) -> None:
    from edgeopt.data import load_data
    from edgeopt.search.optimize import fine_tuning_split, split_data

    data = load_data(digits_test_npz)
    assert fine_tuning_split(data.take(slice(0, 19)), seed=0) == (None, None)
    train, validation = fine_tuning_split(data, seed=0)
    assert len(train) + len(validation) == len(data)
    assert abs(len(validation) - 0.15 * len(data)) <= 10  # stratified: rounded per class
    assert set(validation.labels) == set(data.labels)
    rows = {r.tobytes() for r in train.inputs["x"]}
    assert not any(r.tobytes() in rows for r in validation.inputs["x"])
    split = split_data(data, eval_fraction=0.5, seed=0)
    assert split.train is not None and len(split.train) + len(split.validation) == len(split.tune)


def test_apply_replays_a_recipe_with_the_fine_tuning_split(cli, tmp_path, digits_onnx, digits_test_npz,
                                                           monkeypatch) -> None:
    import numpy as np

    from edgeopt.data import load_data
    from edgeopt.search import recipe as recipe_module
    from edgeopt.search.optimize import fine_tuning_split

    static = tmp_path / "static.json"
    static.write_text(json.dumps(recipes()[0].to_dict()))
    no_data = cli("apply", digits_onnx, static, "-o", tmp_path / "m.onnx")
    assert no_data.exit_code == 2 and "needs calibration data: pass --data" in no_data.stderr
    dynamic = tmp_path / "dynamic.json"
    dynamic.write_text(json.dumps({"chosen_recipe": recipes()[1].to_dict()}))  # optimize's report.json shape
    done = cli("apply", digits_onnx, dynamic, "-o", tmp_path / "d.onnx")
    assert done.exit_code == 0, done.output
    assert "DynamicInt8" in load_model(tmp_path / "d.onnx").metadata["edgeopt.recipe"]

    seen = {}

    def record(model, plan, ctx):
        seen["ctx"] = ctx
        return model

    monkeypatch.setattr(recipe_module, "apply_recipe", record)
    assert cli("apply", digits_onnx, static, "-o", tmp_path / "s.onnx", "--data", digits_test_npz).exit_code == 0
    train, validation = fine_tuning_split(load_data(digits_test_npz), seed=0)
    assert np.array_equal(seen["ctx"].train.inputs["x"], train.inputs["x"])
    assert np.array_equal(seen["ctx"].validation.inputs["x"], validation.inputs["x"])
