"""The root command group: how every command's help reads and how every error leaves.

typer builds the click command tree afresh on each run; ``EdgeoptGroup`` receives it whole, so the
help polish lives here once instead of in every command module:

- help texts are escaped for rich (a ``[/v2/models/NAME]`` in a help string is text, not markup);
- metavars read as words (``--threads N``, ``MODEL...``), flags show no ``<bool>``;
- each command ends its help with one example (``EXAMPLES``; a test parses every one);
- a usage error is one line on stderr and exit 2; an unexpected exception (a bug) is one line
  and exit 1 (``EDGEOPT_DEBUG=1`` re-raises it for the traceback).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from typer import _click as click  # typer 0.29 vendors click (pinned in pyproject): its classes live here
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.exceptions import Abort

# One runnable example per command, keyed by its path under `edgeopt` ("split run").
EXAMPLES: dict[str, str] = {
    "bench": "edgeopt bench examples/digits/digits_cnn.onnx --threads 1 --json -",
    "eval": "edgeopt eval int8.onnx --data examples/digits/test.npz --reference examples/digits/digits_cnn.onnx",
    "devices": "edgeopt devices list --json devices.json",
    "devices list": "edgeopt devices list --json devices.json",
    "devices add": ("edgeopt devices add pi --ssh pi@raspberrypi.local --key ~/.ssh/id_ed25519 "
                    "--python /home/pi/venv/bin/python"),
    "devices check": "edgeopt devices check pi --json pi.json",
    "quantize": "edgeopt quantize examples/digits/digits_cnn.onnx --data examples/digits/test.npz -o int8.onnx",
    "analyze": "edgeopt analyze examples/digits/digits_cnn.onnx --data examples/digits/test.npz --top 5",
    "prune": ("edgeopt prune examples/digits/digits_cnn.py:DigitsCNN --weights examples/digits/digits_cnn.pt "
              "--sparsity 0.3 --structured --data examples/digits/train.npz --epochs 1 -o pruned.onnx"),
    "zoo": "edgeopt zoo --input-size 3x96x96 --classes 10 --no-latency",
    "distill": ("edgeopt distill --teacher examples/digits/digits_cnn.onnx --student mobilenet_v3_small "
                "--data examples/digits/train.npz -o student.onnx --epochs 3"),
    "export": ("edgeopt export examples/digits/digits_cnn.py:DigitsCNN --weights examples/digits/digits_cnn.pt "
               "--to onnx -o digits.onnx"),
    "check": ("edgeopt check examples/digits/digits_cnn.py:DigitsCNN --weights examples/digits/digits_cnn.pt "
              "--target onnxruntime,tflite,executorch --json check.json"),
    "optimize": ("edgeopt optimize examples/digits/digits_cnn.onnx --data examples/digits/test.npz -o out "
                 "--max-drop 0.01"),
    "apply": "edgeopt apply examples/digits/digits_cnn.onnx out/report.json -o again.onnx --data examples/digits/test.npz",
    "serve": "edgeopt serve digits=examples/digits/digits_cnn.onnx --port 8000 --max-batch 8",
    "split": "edgeopt split examples/digits/digits_cnn.onnx --devices rpi4,gateway-x86 -o parts",
    "split plan": "edgeopt split plan examples/digits/digits_cnn.onnx --devices rpi4,gateway-x86 -o parts",
    "split run": "edgeopt split run parts --items 32 --json -",
    "adapt": ("edgeopt adapt examples/digits/digits_cnn.py:DigitsCNN --weights examples/digits/digits_cnn.pt "
              "--data local.npz -o adapted.onnx --memory-mb 64"),
}

# Metavars by the parameter's Python type, where a declaration names none (`metavar=` wins).
TYPE_METAVARS: dict[Any, str] = {int: "INT", float: "NUM", str: "TEXT", Path: "PATH", bool: ""}


def _escape(text: str | None) -> str | None:
    from rich.markup import escape

    return None if text is None else escape(text)


def polish(command: click.Command, path: str = "") -> None:
    """Readable metavars, rich-safe help and the example epilog, on ``command`` and below."""
    command.help = _escape(command.help)
    command.short_help = _escape(command.short_help)
    example = EXAMPLES.get(path)
    if example and not command.epilog:
        command.epilog = _escape(f"Example: {example}")
    for param in command.params:
        _polish_param(param)
    help_option = command.get_help_option

    def flag_help_option(ctx: click.Context) -> Any:
        option = help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = flag_help_option  # type: ignore[method-assign]
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            polish(sub, f"{path} {name}".strip())


def _polish_param(param: click.Parameter) -> None:
    if isinstance(param, TyperOption):
        param.help = _escape(param.help)
        if param.is_flag:
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = _type_metavar(param)
    elif isinstance(param, TyperArgument) and not isinstance(param, _Argument):
        param.help = _escape(param.help)
        if param.metavar is None:
            param.metavar = (param.name or "arg").upper() + ("..." if param.nargs != 1 else "")
        param.__class__ = _Argument


class _Argument(TyperArgument):
    """An argument shown by its metavar alone: ``MODELS...`` in usage, no ``<list[str]>`` beside it."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.required else f"[{name}]"


def _type_metavar(param: TyperOption) -> str:
    desc = param.type_descriptor
    if desc.is_choice:
        return "|".join(str(c) for c in desc.choices or ())
    if desc.is_path:
        return "PATH"
    return TYPE_METAVARS.get(desc.annotation, param.name.upper() if param.name else "VALUE")


def usage_line(exc: UsageError) -> str:
    """``error: <what> (see: edgeopt CMD --help)``: one line for any click usage error."""
    message = " ".join(exc.format_message().split())
    where = exc.ctx.command_path if exc.ctx is not None else "edgeopt"
    return f"error: {message} (see: {where} --help)"


def bug_line(exc: BaseException) -> str:
    """One line for an exception nobody expected: its type, message and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        parts = Path(last.filename).parts
        short = "/".join(parts[parts.index("edgeopt"):]) if "edgeopt" in parts else Path(last.filename).name
        where = f" at {short}:{last.lineno}"
    message = " ".join(str(exc).split())[:300]
    return (f"error: internal error (a bug in edgeopt; please report it): {type(exc).__name__}: {message}{where}; "
            "EDGEOPT_DEBUG=1 shows the traceback")


class EdgeoptGroup(TyperGroup):
    """The root group: polished help on the whole tree, one-line errors with DESIGN's exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        polish(self)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        # typer appends --install-completion / --show-completion after building the group
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag:
                param.metavar = ""
        return params

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:
            sys.exit(2)  # the help is already on screen
        except UsageError as exc:
            click.echo(usage_line(exc), err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except Exception as exc:
            if os.environ.get("EDGEOPT_DEBUG"):
                raise
            click.echo(bug_line(exc), err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
