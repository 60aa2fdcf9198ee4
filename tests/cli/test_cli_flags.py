"""Shared flags: image folders work wherever --data does; one meaning and one default per flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer

from edgeopt.cli import app


def _options() -> dict[str, dict[str, object]]:
    """{command path: {--flag: click option}} for every leaf command."""
    found: dict[str, dict[str, object]] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        subs = getattr(command, "commands", {})
        if not subs and path:
            found[" ".join(path)] = {next(o for o in p.opts if o.startswith("--")): p for p in command.params
                                     if any(o.startswith("--") for o in p.opts)}
        for name, sub in subs.items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


OPTIONS = _options()


def test_every_data_flag_comes_with_image_folder_flags() -> None:
    with_data = [c for c, opts in OPTIONS.items() if "--data" in opts]
    assert {"bench", "eval", "quantize", "analyze", "prune", "optimize", "apply", "adapt", "distill", "export",
            "split run"} <= set(with_data)
    for command in with_data:
        missing = {"--input-size", "--mean", "--std"} - set(OPTIONS[command])
        assert not missing, f"{command} takes --data but not {sorted(missing)}"


def test_one_default_and_one_meaning_per_shared_flag() -> None:
    seconds = {c: opts["--seconds"].default for c, opts in OPTIONS.items() if "--seconds" in opts}
    assert {"bench", "quantize", "optimize", "prune", "export", "distill"} <= set(seconds)
    assert set(seconds.values()) == {2.0}, seconds
    # split's --threads is per pipeline stage and devices add stores a profile's: both say so in their help
    threads = {c: opts["--threads"] for c, opts in OPTIONS.items() if "--threads" in opts
               and not c.startswith("split") and c != "devices add"}
    assert len(threads) >= 9
    assert {o.help for o in threads.values()} == {threads["bench"].help}, "--threads reads differently somewhere"
    assert {o.default for o in threads.values()} == {None}
    # (--device reads "name or .yaml" everywhere; bench and eval also take a comma-separated fleet)
    for flag in ("--input-size", "--mean", "--std", "--json", "--weights", "--trust-pickle"):
        helps = {opts[flag].help for c, opts in OPTIONS.items() if flag in opts and c != "zoo"}
        assert len(helps) == 1, (flag, helps)


def test_distill_bench_seconds_is_an_alias_of_seconds() -> None:
    assert {"--seconds", "--bench-seconds"} <= set(OPTIONS["distill"]["--seconds"].opts)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    return tmp_path / "imgs"


def test_quantize_reads_an_image_folder_with_input_size(cli, tmp_path, image_folder, digits_onnx) -> None:
    pytest.importorskip("PIL")
    args = ("quantize", digits_onnx, "--mode", "dynamic", "--data", image_folder, "-o", tmp_path / "q.onnx",
            "--seconds", "0.01", "--threads", "1")
    refused = cli(*args)
    assert refused.exit_code == 2 and "pass --input-size CxHxW" in refused.stderr
    result = cli(*args, "--input-size", "1x32x32", "--mean", "0.5", "--std", "0.25", "--json", tmp_path / "q.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["evaluation"]["n"] == 12 and report["evaluation"]["data"] == str(image_folder)
