"""The edgeopt command line: one typer app; each command group lives in its own module.

Command modules stay thin: parse flags, call the public API, print rich tables, write --json.
Errors a user can fix leave as one line and exit code 2 (3 for an unmet budget).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from edgeopt.cli.group import EdgeoptGroup

app = typer.Typer(
    name="edgeopt",
    cls=EdgeoptGroup,
    help="Make models smaller and faster for edge devices, and prove it by measurement.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command group; each registers its commands on `app` when imported.
COMMAND_MODULES = ["measure", "quantize", "prune", "distill", "export", "check", "optimize", "serve", "split", "adapt"]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def _show_version(value: bool) -> None:
    if value:
        from edgeopt._version import __version__

        typer.echo(f"edgeopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """edgeopt: quantize, prune, distill, export, optimize, serve, split and adapt models for the edge."""


_register()


def main() -> None:
    app(prog_name="edgeopt")
