"""Adversarial inputs (issue #21): no code runs from a data file, no input is overwritten, no traceback.

Each case is small (a tiny model or none at all) and asserts what a user would see: exit code 2,
one line on stderr naming the flag or file, no traceback, and nothing written or executed.
"""

from __future__ import annotations

from pathlib import Path

import pytest


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
    from edgeopt.cli.options import MAX_THREADS

    err = assert_one_line(cli("bench", M, "--threads", str(MAX_THREADS + 1)), "--threads")
    assert f"[1, {MAX_THREADS}]" in err
