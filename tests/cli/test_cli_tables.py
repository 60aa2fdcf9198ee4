"""At 80 columns, tables wrap, drop empty columns or become key/value rows: never `9.1…`."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from rich.table import Table

from edgeopt.cli.tables import fit_table

LONG_NAME = "examples/digits/digits_cnn_with_a_rather_long_name.onnx"


def render(table: Table, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(fit_table(table, console))
    return console.export_text()


def bench_like(rows: int = 1) -> Table:
    table = Table(title="edgeopt bench")
    for col in ("model", "runtime", "thr", "size", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "vs first"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for i in range(rows):
        table.add_row(LONG_NAME, "onnxruntime", "2", "1.4 MB", f"{9.123456 + i:.3f}", "16.812", "123.456",
                      "10.001", "1234.5", "-")
    return table


def test_a_wide_table_becomes_key_value_rows_with_every_number_whole() -> None:
    text = render(bench_like(2), 80)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for value in (LONG_NAME, "9.123", "10.123", "16.812", "123.456", "1234.5", "onnxruntime"):
        assert value in text, value
    assert "vs first" not in text  # an all-`-` column says nothing


def test_long_number_headers_never_push_the_table_past_the_width() -> None:
    """bench with two models in a pytest tmp folder: headers longer than their numbers count in full."""
    table = Table(title="edgeopt bench (interleaved)")
    for col in ("model", "runtime", "thr", "batch", "size", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s",
                "peak RSS MB", "vs first", "90% interval"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for name, interval in (("b", "-"), ("s", "6.08-7.89x")):
        table.add_row(f"/tmp/pytest-of-root/pytest-181/test_x0/{name}.onnx", "onnxruntime", "1", "1", "5.3 KB",
                      "0.046", "0.063", "9.289", "0.233", "4293.4", "136", "1.00x", interval)
    for width in (80, 120, 160, 200):
        text = render(table, width)
        assert max(len(line) for line in text.splitlines()) <= width, width
        assert "90% interval" in text and "6.08-7.89x" in text and "…" not in text


def test_a_table_that_fits_stays_a_table_and_drops_empty_columns() -> None:
    table = Table()
    for col in ("architecture", "params", "MACs", "p50 ms", "cached"):
        table.add_column(col, justify="left" if col == "architecture" else "right")
    table.add_row("mobilenet_v3_small", "2.54M", "60.13M", "-", "")
    table.add_row("shufflenet_v2_x0_5", "1.37M", "43.65M", "-", "")
    text = render(table, 80)
    header = next(line for line in text.splitlines() if "architecture" in line)
    assert "params" in header and "MACs" in header and "p50 ms" not in text and "cached" not in text
    assert "mobilenet_v3_small" in text and "60.13M" in text


def test_long_text_wraps_between_words_instead_of_ending_in_an_ellipsis() -> None:
    table = Table()
    table.add_column("candidate")
    table.add_column("p50 ms", justify="right")
    table.add_column("why")
    table.add_row("int8-static-per-channel", "0.812", "not faster than the original within the 90% interval " * 2)
    text = render(table, 60)
    assert "…" not in text and "int8-static-per-channel" in text and "0.812" in text
    assert max(len(line) for line in text.splitlines()) <= 60


@pytest.fixture
def narrow(monkeypatch):
    from edgeopt.cli import common

    monkeypatch.setattr(common.console, "width", 80)


def _check(result, *values: str) -> None:
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout, result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
    for value in values:
        assert value in result.stdout, (value, result.stdout)


def test_bench_at_80_columns(cli, narrow, tmp_path, digits_onnx) -> None:
    result = cli("bench", digits_onnx, "--runs", "5", "--seconds", "0.01", "--json", tmp_path / "b.json")
    payload = json.loads((tmp_path / "b.json").read_text())
    _check(result, str(digits_onnx), f"{payload['latency_ms']['p50']:.3f}", f"{payload['latency_ms']['p99']:.3f}",
           f"{payload['throughput_ips']:.1f}")


def test_devices_at_80_columns(cli, narrow) -> None:
    from edgeopt.devices import list_devices

    result = cli("devices")
    _check(result, *[p.name for p in list_devices()])


def test_eval_at_80_columns(cli, narrow, digits_onnx, digits_test_npz) -> None:
    _check(cli("eval", digits_onnx, "--data", digits_test_npz, "--reference", digits_onnx), "top-1 accuracy",
           "1.000000")


@pytest.mark.slow
def test_zoo_no_latency_at_80_columns_shows_no_empty_columns(cli, narrow, tmp_path) -> None:
    pytest.importorskip("torch")
    result = cli("zoo", "--input-size", "3x224x224", "--only", "mobilenet_v3_small,shufflenet_v2_x0_5",
                 "--no-latency", "--no-cache", "--json", tmp_path / "z.json")
    _check(result, "mobilenet_v3_small", "shufflenet_v2_x0_5", "60.13M")
    for column in ("p50 ms", "runtime/thr", "ONNX size", "cached"):
        assert column not in result.stdout


def test_recovery_steps_table_says_whether_the_rounded_int8_was_kept(monkeypatch) -> None:
    from types import SimpleNamespace

    import edgeopt.cli.quantize as cq

    console = Console(width=400, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    monkeypatch.setattr(cq, "console", console)
    steps = [{"step": "3 weight rounding", "variant": "openvino-nncf-int8-rounded", "status": "misses budget",
              "agreement": 0.99, "cosine": 0.98724, "drop": 0.0115, "kept": "start of the float-layer search"},
             {"step": "3 mixed precision", "variant": "openvino-nncf-int8-rounded-mixed-2-float",
              "status": "meets budget", "agreement": 1.0, "cosine": 0.99309, "drop": 0.0,
              "float_layers": ["node_Conv_1135", "node_Conv_1147"]}]
    cq._print_steps(SimpleNamespace(results=[], steps=steps))
    text = console.export_text()
    assert "misses budget; kept: start of the float-layer search" in text
    assert "0.9872" in text and "0.9931" in text and "2: node_Conv_1135, node_Conv_1147" in text
    assert "meets budget; kept" not in text
