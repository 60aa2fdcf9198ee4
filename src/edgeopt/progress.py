"""Consoles and progress bars that the library and the CLI share.

Library code (the training loop, the search) shows progress and short notes on stderr without
importing ``edgeopt.cli``, which would register every command and pull in typer. stdout stays free
for tables and ``--json -``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def progress_bar(*, enabled: bool = True, eta: bool = False) -> Progress:
    """A transient bar on stderr; ``eta`` shows time remaining (known totals) instead of elapsed."""
    clock = TimeRemainingColumn() if eta else TimeElapsedColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), clock,
                    console=err_console, transient=True, disable=not enabled)


def note(message: str) -> None:
    """One line of progress for a person (not markup: model names may contain brackets)."""
    err_console.print(message, markup=False)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Drop what native code writes to file descriptor 2 inside the block.

    torch's profiler (kineto) prints ``profiler_start``/``profiler_stop`` lines from C++ that no
    Python setting turns off; they would precede edgeopt's own one-line messages. Nothing of ours
    prints inside such a block, and an exception still propagates after fd 2 is restored.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
