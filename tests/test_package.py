"""The public surface is complete, and importing edgeopt stays light."""

import subprocess
import sys

import edgeopt


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert edgeopt.__all__ == sorted(edgeopt.__all__)
    for name in edgeopt.__all__:
        assert getattr(edgeopt, name) is not None, name


def test_import_does_not_load_heavy_dependencies() -> None:
    code = ("import sys, edgeopt, edgeopt.cli; heavy = [m for m in ('torch', 'openvino', 'ai_edge_litert', "
            "'fastapi', 'ray', 'transformers', 'matplotlib', 'tensorflow') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_devices_lists_host_first(cli) -> None:
    import json

    result = cli("devices", "--json", "-")
    assert result.exit_code == 0
    payload = json.loads(result.stdout[result.stdout.index("[\n"):])
    assert payload[0]["name"] == "host"
    assert payload[0]["effective_threads"] >= 1
    assert {p["name"] for p in payload} >= {"host", "host-1t", "rpi4"}
