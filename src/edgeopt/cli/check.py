"""edgeopt check: per-target operator coverage before any work (exit 0 deploys, 3 fallbacks, 2 cannot export)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli.common import (
    InputShapeOpt,
    JsonOpt,
    TrustPickleOpt,
    WeightsOpt,
    console,
    emit_json,
    err_console,
    image_folder_flags,
    load_data_arg,
    parse_input_shape,
    user_errors,
)

_STYLE = {"native": "green", "delegated": "green", "fallback": "yellow", "unsupported": "bold red"}
_VERDICT_STYLE = {"deploys": "bold green", "fallback": "bold yellow", "cannot export": "bold red"}


@app.command("check")
@user_errors
@image_folder_flags
def check_cmd(
    model: Annotated[str, typer.Argument(help="file.py:factory (+ --weights), .pt2 or .onnx; a .tflite or .pte "
                                              "for its own runtime.")],
    target: Annotated[str, typer.Option("--target", help="onnxruntime, openvino, tflite, executorch; "
                                                         "comma-separated for several.")] = "onnxruntime",
    data: Annotated[str | None, typer.Option("--data", help="Sample inputs for tracing: .npz, or an image folder with --input-size.")] = None,
    input_shape: InputShapeOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="List every op, not only fallbacks and unsupported.")] = False,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Which operators each target runs natively, delegates, runs on a fallback path, or cannot run, with node names.

    Exit code: 0 when the model deploys fully on every target, 3 when it runs only with fallbacks
    (portable kernels outside XNNPACK, Select-TF ops), 2 when a target cannot export or run it.
    """
    from edgeopt.check import check, parse_targets
    from edgeopt.model import load_model

    targets = parse_targets(target)
    shape = parse_input_shape(input_shape)
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle, input_shape=shape)
    dataset = load_data_arg(data) if data else None
    with console.status(f"checking {', '.join(targets)}..."):
        report = check(loaded, targets, data=dataset)
    summary = Table(title=f"edgeopt check: {model}")
    for col in ("target", "verdict", "native", "delegated", "fallback", "unsupported", "seconds"):
        summary.add_column(col, justify="left" if col in ("target", "verdict") else "right")
    for t in report.targets:
        counts = t.to_dict()["node_counts"]
        summary.add_row(t.target, t.verdict, *(str(counts[s]) for s in ("native", "delegated", "fallback",
                                                                         "unsupported")),
                        f"{t.seconds:.1f}", style=_VERDICT_STYLE[t.verdict])
    console.print(summary)
    ops = Table(title="operators" + ("" if show_all else " off the fast path (--all lists every op)"))
    for col in ("target", "op", "status", "nodes", "node names"):
        ops.add_column(col, justify="right" if col == "nodes" else "left", overflow="fold")
    rows = 0
    for t in report.targets:
        for o in t.ops:
            if show_all or o.status in ("fallback", "unsupported"):
                names = ", ".join(o.nodes[:5]) + (" ..." if o.count > 5 else "")
                ops.add_row(t.target, o.op, o.status, str(o.count), names, style=_STYLE[o.status])
                rows += 1
    if rows:
        console.print(ops)
    for t in report.targets:
        line = t.message()
        if t.exit_code == 0:
            console.print(line)
        else:
            err_console.print(line, style=_VERDICT_STYLE[t.verdict])
    emit_json(json_out, report.to_dict())
    if report.exit_code:
        raise typer.Exit(report.exit_code)
