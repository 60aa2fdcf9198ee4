"""The edgeopt command line: one typer app; each command group lives in its own module.

Command modules stay thin: parse flags, call the public API, print rich tables, write --json.
Errors a user can fix leave as one line and exit code 2 (3 for an unmet budget).
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edgeopt",
    help="Make models smaller and faster for edge devices, and prove it by measurement.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command group; each registers its commands on `app` when imported.
COMMAND_MODULES = ["measure", "quantize", "prune", "distill", "export", "optimize", "serve", "split", "adapt"]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


@app.callback()
def _root() -> None:
    """edgeopt: quantize, prune, distill, export, optimize, serve, split and adapt models for the edge."""


_register()


def main() -> None:
    app()
