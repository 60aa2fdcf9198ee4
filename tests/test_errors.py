"""errors.first_line: the one line a wrapped exception contributes to an EdgeoptError message."""

import pytest

from edgeopt.errors import first_line


@pytest.mark.parametrize(("exc", "expected"), [
    (ValueError("bad shape\n  at node 3\n"), "bad shape"),
    (RuntimeError("\n  leading blank line\nmore"), "leading blank line"),
    (AssertionError(), "AssertionError"),
    (ValueError("   \n "), "ValueError"),
])
def test_first_line(exc: BaseException, expected: str) -> None:
    assert first_line(exc) == expected

