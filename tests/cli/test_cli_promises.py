"""Promises the README and DESIGN make that no other test held: --device FILE.yaml, and the search
space `make demo` runs. (--trust-pickle through the CLI: test_adversarial.py; exit 1 for a bug:
test_cli_usage.py.)"""

from __future__ import annotations

import json

import pytest

PROFILE = """name: my-board
description: a board described in a file, not bundled
runtime: onnxruntime
threads: 1
memory_mb: 300
precisions: [fp32, int8]
relative_speed: 0.5
"""


def test_device_yaml_file_sets_runtime_threads_and_is_named_in_the_report(cli, tmp_path, digits_onnx) -> None:
    profile = tmp_path / "board.yaml"
    profile.write_text(PROFILE)
    result = cli("bench", digits_onnx, "--device", profile, "--runs", "5", "--seconds", "0.01", "--json", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["threads"] == 1 and payload["runtime"] == "onnxruntime"  # the file's, not the host's
    assert payload["measured_on"]["device"] == "my-board"
    two = tmp_path / "two.yaml"
    two.write_text(PROFILE.replace("threads: 1", "threads: 2").replace("my-board", "two-core"))
    again = json.loads(cli("bench", digits_onnx, "--device", two, "--runs", "5", "--seconds", "0.01",
                           "--json", "-").stdout)
    assert again["threads"] == 2 and again["measured_on"]["device"] == "two-core"


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "board.yaml"),
])
def test_a_broken_device_yaml_is_one_line_exit_2(cli, tmp_path, digits_onnx, text, message) -> None:
    profile = tmp_path / "board.yaml"
    profile.write_text(text)
    result = cli("bench", digits_onnx, "--device", profile, "--runs", "5", "--seconds", "0.01")
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), result.output
    assert message in err


def test_a_missing_device_yaml_is_one_line_exit_2(cli, tmp_path, digits_onnx) -> None:
    result = cli("eval", digits_onnx, "--data", tmp_path / "d.npz", "--device", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_every_recipe_of_the_demo_search_space_builds_and_agrees(digits_onnx, digits_test_npz) -> None:
    """`make demo` runs optimize on the digits CNN with the default space: each recipe in it must build a
    model that runs on its runtime and agrees with the original (no timing: that is optimize's job)."""
    from edgeopt.data import load_data
    from edgeopt.devices import get_device
    from edgeopt.measure.evaluate import evaluate
    from edgeopt.model import load_model
    from edgeopt.search.recipe import apply_recipe
    from edgeopt.search.space import default_recipes
    from edgeopt.transforms.config import TransformContext

    original = load_model(digits_onnx)
    data = load_data(digits_test_npz)
    calibration, judge = data.take(slice(0, 64)), data.take(slice(64, 164))
    recipes = default_recipes(original, get_device(None))
    names = [r.name for r in recipes]
    assert len(names) == len(set(names)) >= 8
    assert "int8-qdq-u8s8-perchannel" in names and "int8-dynamic" in names
    failures = []
    for recipe in recipes:
        try:
            built = apply_recipe(original, recipe, TransformContext(calibration=calibration))
            result = evaluate(built, judge, reference=original, threads=1)
        except Exception as exc:  # noqa: BLE001 - collect every broken recipe, then fail once
            failures.append(f"{recipe.name}: {type(exc).__name__}: {exc}")
            continue
        if result.agreement < 0.9:
            failures.append(f"{recipe.name}: agreement {result.agreement:.2f} with the original")
    assert not failures, failures
