"""The CI skip policy: an unexpected skip fails a CI run; listed skips and local runs pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import pytest


def test_runs():
    assert True


def test_needs_something_missing():
    pytest.importorskip("no_such_module_anywhere")
'''


def run(tmp_path: Path, ci: str | None, source: str = TESTS) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the venv's many plugins cost seconds per run
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.skip_policy",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_an_unexpected_skip_fails_on_ci(tmp_path) -> None:
    result = run(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "unexpected skips on CI" in result.stdout
    assert "test_needs_something_missing" in result.stdout and "no_such_module_anywhere" in result.stdout


def test_the_same_skip_passes_off_ci(tmp_path) -> None:
    result = run(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped" in result.stdout


def test_a_run_without_skips_passes_on_ci(tmp_path) -> None:
    result = run(tmp_path, "true", "def test_runs():\n    assert True\n")
    assert result.returncode == 0, result.stdout


def test_the_allowlist_names_tests_that_exist() -> None:
    from tests.skip_policy import EXPECTED_SKIPS

    for nodeid in EXPECTED_SKIPS:
        path, _, name = nodeid.partition("::")
        assert f"def {name}" in (ROOT / path).read_text(), nodeid
