"""On CI (env CI=true) a skipped test fails the run unless it is listed in EXPECTED_SKIPS.

A missing extra turns dozens of tests into skips; without this, CI stays green while testing
nothing of ONNX Runtime quantization or serving. Each entry says why the skip is acceptable there.
Loaded from tests/conftest.py (``pytest_plugins``); ``-p tests.skip_policy`` loads it elsewhere.
"""

from __future__ import annotations

import os

import pytest

# node id (or a prefix of one) -> why it may skip on CI
EXPECTED_SKIPS: dict[str, str] = {
    "tests/report/test_report.py::test_headless_chromium": ".ci/run installs Chromium best effort (no apt, no root)",
    "tests/serve/test_serve_limits.py::test_max_connections_must_fit_the_file_descriptor_limit":
        "needs a finite file-descriptor limit below the flag's maximum (a runner's ulimit)",
    "tests/runtimes/test_remote.py": ".ci/run installs openssh-server best effort; without sshd the SSH tests skip",
}

_skipped: list[tuple[str, str]] = []


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def expected(nodeid: str) -> bool:
    return any(nodeid.startswith(prefix) for prefix in EXPECTED_SKIPS)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module-level importorskip: every test in the file
        _skipped.append((report.nodeid, _reason(report)))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    unexpected = [(n, r) for n, r in _skipped if not expected(n)]
    if os.environ.get("CI") == "true" and unexpected:
        terminalreporter.section("unexpected skips on CI (tests/skip_policy.py EXPECTED_SKIPS)", red=True)
        for nodeid, reason in unexpected:
            terminalreporter.line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and any(not expected(n) for n, _ in _skipped) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
