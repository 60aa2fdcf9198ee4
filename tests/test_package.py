"""The public surface is complete, and importing edgeopt stays light."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import edgeopt

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert edgeopt.__all__ == sorted(edgeopt.__all__)
    for name in edgeopt.__all__:
        assert getattr(edgeopt, name) is not None, name


# What shared/DESIGN.md's layout promises on edgeopt/__init__.py, and what the README's example uses.
PROMISED = {"load_model", "load_data", "quantize", "prune", "distill", "export", "benchmark", "evaluate",
            "optimize", "Budget", "Recipe", "apply_recipe", "run_server"}


def documented_names() -> set[str]:
    """The names docs/api.md lists in its tables' first column."""
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^\| `(\w+)` \|", text, re.M))


def test_promised_names_are_public() -> None:
    assert PROMISED <= set(edgeopt.__all__)
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"\bedgeopt\.([a-z_A-Z]\w*)\(", readme))
    assert used <= set(edgeopt.__all__), used - set(edgeopt.__all__)


def test_api_doc_lists_exactly_the_public_names() -> None:
    """Both ways: nothing public is undocumented, and nothing documented is missing."""
    public = set(edgeopt.__all__) - {"__version__"}
    documented = documented_names()
    assert public - documented == set(), "public but not in docs/api.md"
    assert documented - public == set(), "in docs/api.md but not public"


def test_no_module_outside_cli_imports_the_cli() -> None:
    """The library never imports edgeopt.cli (it registers every command and typer)."""
    offenders = []
    for path in (ROOT / "src" / "edgeopt").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "src" / "edgeopt").parts[:1] or path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "edgeopt.cli" or n.startswith("edgeopt.cli.")]
    assert offenders == []


def test_tests_mirror_the_packages() -> None:
    """A maintainer finds a module's tests by its path: tests/<pkg>/ only for a package src/edgeopt/<pkg>/."""
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages = {p.name for p in (ROOT / "src" / "edgeopt").iterdir() if (p / "__init__.py").exists()}
    assert folders and folders <= packages, sorted(folders - packages)


def test_import_does_not_load_heavy_dependencies() -> None:
    code = ("import sys, edgeopt, edgeopt.cli; heavy = [m for m in ('numpy', 'torch', 'openvino', 'ai_edge_litert', "
            "'fastapi', 'ray', 'transformers', 'matplotlib', 'tensorflow', 'executorch') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_devices_lists_host_first(cli) -> None:
    import json

    result = cli("devices", "--json", "-")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload[0]["name"] == "host"
    assert payload[0]["effective_threads"] >= 1
    assert {p["name"] for p in payload} >= {"host", "host-1t", "rpi4"}
