"""edgeopt export: PyTorch -> verified ONNX; PyTorch / ONNX / Keras -> verified, timed .tflite variants;
PyTorch / ONNX -> verified ExecuTorch .pte (XNNPACK, FP32 or INT8). Each target is checked first
(edgeopt check), so an operator the target lacks stops the export with its name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    SECONDS,
    InputShapeOpt,
    JsonOpt,
    RunsOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_output_dir,
    check_threads,
    console,
    emit_json,
    fmt_bytes,
    image_folder_flags,
    load_data_arg,
    parse_input_shape,
    resolve_threads,
    user_errors,
)

TARGETS = ("onnx", "tflite", "executorch")
_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "executorch": ".pte"}


@app.command()
@user_errors
@image_folder_flags
def export(
    model: Annotated[str, typer.Argument(help="file.py:factory (+ --weights), .pt2, .onnx (tflite/executorch), "
                                              ".keras/.h5 (tflite only), float .tflite (to quantize).")],
    to: Annotated[str, typer.Option("--to", help="Target format: onnx, tflite or executorch.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output file (.onnx, .tflite or .pte).")],
    quantize: Annotated[str, typer.Option(
        "--quantize", help="tflite: none, dynamic, int8 (full integer, needs --data) or fp16; several "
                           "comma-separated are each written as OUT_<mode>.tflite and timed interleaved. "
                           "executorch: none or int8 (PT2E + XNNPACK quantizer, needs --data).")] = "none",
    data: Annotated[str | None, typer.Option("--data", help="Sample inputs (.npz): tracing, verification, "
                                                            "int8 calibration.")] = None,
    input_shape: InputShapeOpt = None,
    run_check: Annotated[bool, typer.Option("--check/--no-check", help="Check the target's operator support "
                                                                       "first (edgeopt check).")] = True,
    opset: Annotated[int | None, typer.Option("--opset", help="onnx: opset version (default: exporter's, 18+).")] = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="onnx: fixed batch dimension.")] = False,
    atol: Annotated[float, typer.Option("--atol", callback=opt.non_negative, help="onnx: max abs diff allowed vs PyTorch.")] = 1e-4,
    min_cosine: Annotated[float | None, typer.Option(
        "--min-cosine", callback=opt.cosine, help="tflite: cosine floor vs the reference (default 0.999 float, 0.98 INT8).")] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="tflite: time every variant in LiteRT.")] = True,
    threads: ThreadsOpt = None,
    seconds: SecondsOpt = SECONDS,
    runs: RunsOpt = 50,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Export to ONNX, TFLite or ExecuTorch; outputs are verified against the source model and reported in OUT's .report.json (model.onnx -> model.report.json)."""
    from edgeopt.errors import BadInput

    if to not in TARGETS:
        raise BadInput(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if out.suffix.lower() != _SUFFIX[to]:
        raise BadInput(f"--out must end in {_SUFFIX[to]} for --to {to}, got {out.name}")
    check_threads(threads)
    check_output_dir(out)
    shape = parse_input_shape(input_shape)
    dataset = load_data_arg(data) if data else None
    loaded = _load_source(model, to, weights=weights, trust_pickle=trust_pickle, input_shape=shape)
    checked = _pre_check(loaded, to, dataset) if run_check and loaded is not None else None
    if to == "onnx":
        if quantize != "none":
            raise BadInput("--quantize applies to --to tflite or executorch; quantize ONNX models with "
                           "edgeopt quantize")
        report = _export_onnx(model, loaded, out, dataset, opset=opset, static_batch=static_batch, atol=atol)
    elif to == "executorch":
        report = _export_executorch(loaded, out, dataset, mode=quantize, min_cosine=min_cosine, checked=checked)
    else:
        report = _export_tflite(model, loaded, out, dataset, modes=_modes(quantize), min_cosine=min_cosine,
                                bench=bench, threads=threads, seconds=seconds, runs=runs, trust_pickle=trust_pickle)
    if checked is not None:
        report["operator_check"] = checked.to_dict()
    from edgeopt.fileio import report_path, write_json

    write_json(report_path(out), report)
    emit_json(json_out, report)


def _modes(text: str) -> list[str]:
    from edgeopt.errors import BadInput
    from edgeopt.transforms.tflite import QUANTIZE_MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in QUANTIZE_MODES]
    if not modes or bad:
        raise BadInput(f"--quantize takes {', '.join(QUANTIZE_MODES)} (comma-separated), got {text!r}")
    if len(set(modes)) != len(modes):
        raise BadInput(f"--quantize lists a mode twice: {text!r}")
    return modes


def _load_source(spec: str, to: str, *, weights: Path | None, trust_pickle: bool,
                 input_shape: tuple[int, ...] | None) -> Any:
    """The source Model (None for a Keras file, which goes its own way to TFLite)."""
    from edgeopt.model import load_model

    if to == "tflite":
        from edgeopt.transforms.keras import KERAS_SUFFIXES

        if Path(spec).suffix.lower() in KERAS_SUFFIXES:
            return None
    return load_model(spec, weights=weights, trust_pickle=trust_pickle, input_shape=input_shape)


def _pre_check(source: Any, to: str, dataset: Any) -> Any:
    """edgeopt check for the target, before converting: stop with its message when it cannot export."""
    from edgeopt.check import TARGET_FOR_FORMAT, check
    from edgeopt.errors import UnsupportedOperation

    if source.format not in ("torch", "onnx") or (to == "onnx" and source.format != "torch"):
        return None  # nothing to convert (the export itself says why), or a .tflite to quantize
    with console.status(f"checking {TARGET_FOR_FORMAT[to]} operator support..."):
        report = check(source, [TARGET_FOR_FORMAT[to]], data=dataset, convert=False)
    result = report.targets[0]
    if result.exit_code == 2:
        raise UnsupportedOperation(f"export stopped before converting: {result.message()} "
                                   f"(details: edgeopt check {source.source} --target {result.target})")
    if result.exit_code == 3:
        from edgeopt.cli.common import err_console

        err_console.print(f"[yellow]warning:[/] {result.message()}")
    return result


def _export_onnx(spec: str, source: Any, out: Path, dataset: Any, *, opset: int | None, static_batch: bool,
                 atol: float) -> dict[str, Any]:
    from edgeopt.errors import BadInput
    from edgeopt.transforms.export import OnnxExport, to_onnx

    if opset is not None and not 7 <= opset <= 30:
        raise BadInput(f"--opset must be between 7 and 30, got {opset}")
    if source.format != "torch":
        raise BadInput(f"{spec} is already {source.format}; --to onnx exports PyTorch models "
                       "(file.py:factory with --weights, or .pt2)")
    cfg = OnnxExport(dynamic_batch=not static_batch, opset=opset, atol=atol)
    with console.status("exporting to ONNX and verifying against PyTorch..."):
        exported, check = to_onnx(source, cfg, data=dataset)
    saved = exported.save(out)
    opset_used = max((o.version for o in exported.onnx.opset_import if o.domain in ("", "ai.onnx")), default=None)
    table = Table(title="edgeopt export --to onnx")
    for col in ("output", "size", "opset", "batch", "max abs diff", "cosine", "samples"):
        table.add_column(col, justify="left" if col == "output" else "right")
    table.add_row(str(out), fmt_bytes(saved.size_bytes), str(opset_used), "static" if static_batch else "dynamic",
                  f"{check.max_abs_diff:.3g}", f"{check.cosine:.6f}", str(check.samples))
    console.print(table)
    return {"source": spec, "to": "onnx", "output": str(out), "size_bytes": saved.size_bytes,
            "sha256": saved.sha256, "opset": opset_used, "dynamic_batch": not static_batch, "atol": atol,
            "inputs": [t.to_dict() for t in saved.inputs], "outputs": [t.to_dict() for t in saved.outputs],
            "check": check.to_dict()}


def _variant_path(out: Path, mode: str, several: bool) -> Path:
    return out.with_name(f"{out.stem}_{mode}{out.suffix}") if several else out


def _export_executorch(source: Any, out: Path, dataset: Any, *, mode: str, min_cosine: float | None,
                       checked: Any) -> dict[str, Any]:
    from edgeopt.transforms.executorch import ExecutorchExport, to_executorch

    cfg = ExecutorchExport(quantize=mode, min_cosine=min_cosine)
    lowered = checked.artifact if checked is not None and mode == "none" else None
    with console.status(f"exporting to ExecuTorch ({mode}, XNNPACK) and verifying against PyTorch..."):
        exported, check = to_executorch(source, cfg, data=dataset, lowered=lowered)
    saved = exported.save(out)
    d = check.delegation
    table = Table(title="edgeopt export --to executorch (XNNPACK)")
    for col in ("output", "quantize", "size", "cosine", "agreement", "max abs diff", "delegated nodes",
                "portable nodes"):
        table.add_column(col, justify="left" if col in ("output", "quantize") else "right")
    table.add_row(str(out), mode, fmt_bytes(saved.size_bytes), f"{check.cosine:.6f}", f"{100 * check.agreement:.1f}%",
                  f"{check.max_abs_diff:.3g}", f"{d.delegated_nodes} in {d.subgraphs} subgraph(s)",
                  str(len(d.portable_nodes)))
    console.print(table)
    if d.portable_nodes:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(d.portable_ops.items()))
        console.print(f"on portable kernels (not XNNPACK): {ops}; nodes: "
                      f"{', '.join(n for n, _ in d.portable_nodes[:10])}{' ...' if len(d.portable_nodes) > 10 else ''}")
    else:
        console.print("every operator runs in the XNNPACK delegate")
    return {"source": source.source, "to": "executorch", "quantize": mode, "output": str(out),
            "size_bytes": saved.size_bytes, "sha256": saved.sha256, "batch": 1,
            "inputs": [t.to_dict() for t in saved.inputs], "outputs": [t.to_dict() for t in saved.outputs],
            "check": check.to_dict()}


def _export_tflite(spec: str, source: Any, out: Path, dataset: Any, *, modes: list[str], min_cosine: float | None,
                   bench: bool, threads: int | None, seconds: float, runs: int,
                   trust_pickle: bool = False) -> dict[str, Any]:
    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.transforms.keras import KERAS_SUFFIXES, keras_to_tflite
    from edgeopt.transforms.tflite import TfliteExport, export_tflite

    configs = [TfliteExport(quantize=m, min_cosine=min_cosine) for m in modes]
    settings = BenchSettings(min_runs=runs, min_seconds=seconds) if bench else None
    with console.status(f"converting to TFLite ({', '.join(modes)}) and verifying..."):
        if source is None and Path(spec).suffix.lower() in KERAS_SUFFIXES:
            from edgeopt.transforms.keras import load_keras

            keras_model = load_keras(spec, trust_pickle=trust_pickle)
            variants = [keras_to_tflite(keras_model, c, data=dataset, source=spec) for c in configs]
        else:
            variants = export_tflite(source, configs, data=dataset)
    timings = None
    if settings is not None:
        with console.status(f"timing {len(variants)} variant(s) in LiteRT, interleaved..."):
            timings = compare([m for m, _ in variants], settings=settings, runtime="litert",
                              threads=resolve_threads(threads))
    several = len(variants) > 1
    saved = [m.save(_variant_path(out, mode, several)) for (m, _), mode in zip(variants, modes, strict=True)]
    base_size = saved[0].size_bytes
    base_p50 = timings[0].latency_ms["p50"] if timings else None
    rows = []
    for i, (model, (_, check)) in enumerate(zip(saved, variants, strict=True)):
        row: dict[str, Any] = {"quantize": modes[i], "output": str(model.path), "size_bytes": model.size_bytes,
                               "size_vs_first": model.size_bytes / base_size, "sha256": model.sha256,
                               "inputs": [t.to_dict() for t in model.inputs], "check": check.to_dict()}
        if timings:
            t = timings[i]
            row["latency_ms"] = t.latency_ms
            row["speedup_vs_first"] = base_p50 / t.latency_ms["p50"]
            row["bench"] = {k: v for k, v in t.to_dict().items() if k not in ("model", "latency_ms")}
        rows.append(row)
    table = Table(title="edgeopt export --to tflite" + (" (timed interleaved, LiteRT)" if timings else ""))
    cols = ["output", "quantize", "size", "size vs first", "cosine", "agreement", "max abs diff"]
    if timings:
        cols += ["p50 ms", "p90 ms", "speed vs first"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("output", "quantize") else "right")
    for row in rows:
        c = row["check"]
        cells = [row["output"], row["quantize"], fmt_bytes(row["size_bytes"]), f"{row['size_vs_first']:.2f}x",
                 f"{c['cosine']:.5f}", f"{100 * c['agreement']:.1f}%", f"{c['max_abs_diff']:.3g}"]
        if timings:
            cells += [f"{row['latency_ms']['p50']:.3f}", f"{row['latency_ms']['p90']:.3f}",
                      f"{row['speedup_vs_first']:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    if timings:
        console.print(f"reference for cosine: {rows[0]['check']['reference']}; timed with "
                      f"{timings[0].threads} thread(s); speed > 1x is faster than the first variant")
    return {"source": spec, "to": "tflite", "variants": rows}
