"""Validators for numeric command-line options: every number is checked where click parses it.

A NaN learning rate trains nothing, ``--seconds nan`` never stops timing, ``--threads 99999999999``
overflows the runtime's C++ int and ``--threads 10000`` stalls the machine. Each numeric option
therefore names its range here, once, as a click callback:

    lr: Annotated[float, typer.Option("--lr", callback=positive)] = 1e-3
    threads: Annotated[int | None, typer.Option("--threads", callback=threads)] = None

A bad value leaves as one line, ``error: --lr must be > 0, got nan``, and exit code 2, before any
file is read (the same line and code as every other bad input). ``None`` (an optional flag the
user did not give) always passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import typer

from edgeopt.devices import MAX_DEVICE_THREADS

MAX_SECONDS = 24 * 3600.0
# numpy / torch seeds are unsigned 32-bit.
MAX_SEED = 2**32 - 1

Callback = Callable[[Any], Any]


def describe(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """``between 0 and 1``, ``> 0``, ``>= 1``: the range in words, for error messages and help."""
    def fmt(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if lo is not None and hi is not None:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        return f"in {left}{fmt(lo)}, {fmt(hi)}{right}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {fmt(hi)}"
    return "a finite number"


def problem(value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            hi_open: bool = False, why: str = "") -> str | None:
    """What is wrong with ``value`` (``must be > 0, got nan``), or None when it is finite and in range."""
    if value is None:
        return None
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number {describe(lo, hi, lo_open, hi_open)}, got {v}"
        below = lo is not None and (v < lo or (lo_open and v == lo))
        above = hi is not None and (v > hi or (hi_open and v == hi))
        if below or above:
            return f"must be {describe(lo, hi, lo_open, hi_open)}{why}, got {v}"
    return None


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           why: str = "") -> Callback:
    """A click callback accepting finite numbers in the range (``lo_open``: ``lo`` itself excluded)."""

    def callback(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if ctx.resilient_parsing:  # shell completion: never print or exit
            return value
        message = problem(value, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, why=why)
        if message is not None:
            flag = max(param.opts, key=len) if param.opts else f"--{param.name}"
            typer.echo(f"error: {flag} {message}", err=True)
            raise typer.Exit(2)
        return value

    return callback


# The ranges edgeopt's commands share; a command with its own range builds one with number().
finite = number()
positive = number(0, lo_open=True)              # learning rates, budgets, sizes in MB / ms
non_negative = number(0)                        # weights of a loss term, latencies, tolerances
at_least_one = number(1)                        # counts: runs, epochs, samples, batch sizes
count = number(0)                               # counts that may be zero (replay, --epochs 0)
fraction = number(0, 1)                         # [0, 1]
open_fraction = number(0, 1, lo_open=True, hi_open=True)    # (0, 1): a share that leaves both parts
unit_interval_drop = number(0, 1, hi_open=True)             # [0, 1): --max-drop, --sparsity
seconds = number(0, MAX_SECONDS)                 # minimum timed seconds (0: runs only)
timeout = number(0, MAX_SECONDS, lo_open=True)
seed = number(0, MAX_SEED)
cosine = number(-1, 1)
threads = number(1, MAX_DEVICE_THREADS)          # the host's own cap: runtimes/sessions.resolve_settings
batch = number(1, 65536)                        # samples per timed run
classes = number(1, 1_000_000)                  # a classifier head's outputs
temperature = number(0, 100, lo_open=True)      # distillation softmax temperature
warmup = number(0, 1, hi_open=True)             # share of steps with a learning-rate warm-up
max_len = number(1, 8192)                       # tokens per text example
qat_epochs = number(0, 100)                     # QAT recovery: a few epochs from a trained model
