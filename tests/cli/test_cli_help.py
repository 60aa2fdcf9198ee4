"""Every command's help renders, reads well at 80 columns, and shows an example that parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import typer

from edgeopt.cli import app
from edgeopt.cli.group import EXAMPLES


def _tree() -> typer.core.TyperGroup:
    return typer.main.get_command(app)  # type: ignore[return-value]


def command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command path under `edgeopt`, found by walking the click tree."""
    paths: list[tuple[str, ...]] = []

    def walk(command, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(_tree(), ())
    return paths


PATHS = command_paths()


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(p) for p in PATHS}
    assert {"bench", "eval", "quantize", "optimize", "split", "split run", "split plan", "serve"} <= names
    assert len(PATHS) >= 16


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "edgeopt")
def test_help_renders(cli, path: tuple[str, ...], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"Usage: edgeopt {' '.join(path)}".rstrip() in out
    # typer's raw type labels and brace-wrapped arguments are not words a user reads
    for raw in ("<bool>", "<str>", "<int>", "<float>", "<path>", "list[str]", "{"):
        assert raw not in out, f"{raw!r} in the help of {' '.join(path)}"
    assert max(len(line) for line in out.splitlines()) <= 80
    assert cli(*path, "-h").stdout == out
    if path:
        assert "Example: edgeopt " + " ".join(path) in " ".join(out.split()), "no example in the help"


def test_split_run_help_shows_the_url_pattern(cli, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = cli("split", "run", "--help")
    assert result.exit_code == 0, result.output
    assert "http://HOST:PORT[/v2/models/NAME]" in result.stdout


def test_metavars_read_as_words(cli, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = cli("bench", "--help").stdout
    assert re.search(r"--threads\s+N\s", out) and re.search(r"--runs\s+INT\s", out)
    assert re.search(r"--trust-pickle\s+Allow", out)  # a flag: no type beside it
    assert "Usage: edgeopt bench [OPTIONS] MODELS..." in out


def _parse(argv: list[str]) -> None:
    """Parse argv the way `edgeopt` would, down to the leaf command, without running it."""
    command, parent, name = _tree(), None, "edgeopt"
    while True:
        ctx = command.make_context(name, list(argv), parent=parent)
        if not hasattr(command, "commands"):
            return
        name, command, argv = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        parent = ctx


@pytest.mark.parametrize("path", sorted(EXAMPLES), ids=str)
def test_examples_name_real_flags(path: str) -> None:
    argv = shlex.split(EXAMPLES[path])
    assert argv[0] == "edgeopt" and " ".join(argv[1:]).startswith(path)
    _parse(argv[1:])  # a renamed flag or a missing required option raises a usage error here


def test_every_command_has_an_example() -> None:
    leaves = {" ".join(p) for p in PATHS if p}
    assert leaves <= set(EXAMPLES), f"no example for {sorted(leaves - set(EXAMPLES))}"


def test_version(cli) -> None:
    from edgeopt._version import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"edgeopt {__version__}"


def test_shell_completion_completes_commands_and_flags() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {"_EDGEOPT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword),
               "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-c", "from edgeopt.cli import main; main()"],
                             capture_output=True, text=True, timeout=60, env={**_env(), **env})
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert complete("edgeopt qua", 1) == ["quantize"]
    assert "--threads" in complete("edgeopt bench --thr", 2)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("_EDGEOPT")}
