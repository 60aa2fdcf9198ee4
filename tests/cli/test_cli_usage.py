"""Usage errors are one line and exit 2 on every command; a bug is one line and exit 1."""

from __future__ import annotations

import pytest
import typer

from edgeopt.cli import app


def _leaves() -> list[tuple[tuple[str, ...], object]]:
    found = []

    def walk(command, path: tuple[str, ...]) -> None:
        subs = getattr(command, "commands", {})
        if not subs and path:
            found.append((path, command))
        for name, sub in subs.items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


LEAVES = _leaves()
TREE = typer.main.get_command(app)


class Ran:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr
        self.output = stdout + stderr


@pytest.fixture
def parse(capsys):
    """Run `edgeopt ARGS` on one prebuilt click tree (typer rebuilds it per call: 0.2 s each)."""

    def run(*args) -> Ran:
        with pytest.raises(SystemExit) as exit_:
            TREE.main(args=[str(a) for a in args], prog_name="edgeopt")
        out = capsys.readouterr()
        return Ran(exit_.value.code, out.out, out.err)

    return run


def _numeric_options() -> list[tuple[tuple[str, ...], str]]:
    """(command path, --flag) for every option that takes a number."""
    cases = []
    for path, command in LEAVES:
        for param in command.params:
            desc = getattr(param, "type_descriptor", None)
            if getattr(param, "param_type_name", "") == "option" and desc is not None \
                    and desc.annotation in (int, float) and not param.is_flag:
                cases.append((path, max(param.opts, key=len)))
    return cases


NUMERIC = _numeric_options()


def one_line(result, *fragments: str) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in result.output, err
    assert "╭" not in err and "Usage:" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert result.stdout == "", result.stdout
    return err


def test_sweep_finds_the_numeric_flags() -> None:
    flags = {(" ".join(p), f) for p, f in NUMERIC}
    assert {("bench", "--threads"), ("bench", "--runs"), ("serve", "--port"), ("prune", "--sparsity")} <= flags
    assert len(NUMERIC) > 40


@pytest.mark.parametrize("path, flag", NUMERIC, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_a_word_for_a_number_is_one_line(parse, path, flag) -> None:
    err = one_line(parse(*path, flag, "two"), flag)
    assert f"(see: edgeopt {' '.join(path)} --help)" in err


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_unknown_flag_is_one_line(parse, path) -> None:
    one_line(parse(*path, "--no-such-flag"), "--no-such-flag")


def test_the_issue_example(cli) -> None:
    err = one_line(cli("bench", "m.onnx", "--threads", "two"), "--threads")
    assert err.endswith("(see: edgeopt bench --help)")


def test_missing_required_option_and_argument(cli, tmp_path) -> None:
    one_line(cli("quantize", tmp_path / "m.onnx"), "--out")
    one_line(cli("bench"), "MODELS")
    one_line(cli("nosuchcommand"), "nosuchcommand")


def test_a_bug_is_one_line_and_exit_1(cli, monkeypatch) -> None:
    import edgeopt.devices

    def broken() -> None:
        return 1 / 0

    monkeypatch.setattr(edgeopt.devices, "list_devices", broken)
    result = cli("devices")
    err = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: internal error") and "ZeroDivisionError: division by zero" in err, err
    assert "test_cli_usage.py" in err  # where it was raised
    monkeypatch.setenv("EDGEOPT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli("devices")


def test_a_bug_in_a_real_process_is_exit_1_without_traceback(tmp_path) -> None:
    import subprocess
    import sys

    code = ("import edgeopt.devices as d\n"
            "d.list_devices = lambda: {}['missing']\n"
            "import sys; sys.argv = ['edgeopt', 'devices']\n"
            "from edgeopt.cli import main; main()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "internal error" in run.stderr and "KeyError: 'missing'" in run.stderr
