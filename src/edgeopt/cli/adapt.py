"""edgeopt adapt: fine-tune a model on local data within a measured memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    JsonOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_onnx_output,
    console,
    emit_json,
    err_console,
    fmt_pct,
    image_folder_flags,
    load_data_arg,
    user_errors,
)


@app.command()
@user_errors
@image_folder_flags
def adapt(
    model: Annotated[str, typer.Argument(help="PyTorch model (file.py:factory with --weights, or .pt2) or an FP32 .onnx.")],
    data: Annotated[str, typer.Option("--data", help="Labelled local data (.npz with x and y).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Adapted ONNX; OUT.pt, a .report.json and OUT.ckpt.pt go beside it.")],
    memory_mb: Annotated[float | None, typer.Option("--memory-mb", callback=opt.positive, help="Peak training memory allowed (measured).")] = None,
    strategy: Annotated[str, typer.Option("--strategy", help="auto, last-layer, bias-last, sparse or full.")] = "auto",
    epochs: Annotated[int, typer.Option("--epochs", callback=opt.at_least_one, help="Training epochs (early stopping on local validation).")] = 20,
    lr: Annotated[float, typer.Option("--lr", callback=opt.positive, help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", callback=opt.at_least_one, help="Training batch size (activation memory scales with it).")] = 32,
    original_data: Annotated[str | None, typer.Option("--original-data", help="Labelled original-domain data: held-out check and replay source.")] = None,
    replay: Annotated[int, typer.Option("--replay", callback=opt.count, help="Original samples mixed into training (needs --original-data).")] = 0,
    max_forget: Annotated[float | None, typer.Option("--max-forget", callback=opt.fraction, help="Roll back if original accuracy drops more than this (0.02 = 2 pt).")] = None,
    distill: Annotated[float, typer.Option("--distill", callback=opt.fraction, help="Weight of distillation from the starting model (0..1).")] = 0.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT's checkpoint with new local data.")] = False,
    deployed: Annotated[str | None, typer.Option("--deployed", help="The ONNX model now on the device; if quantized, the output is re-quantized alike.")] = None,
    quantized: Annotated[bool, typer.Option("--quantized", help="Re-quantize the output to static INT8.")] = False,
    seed: Annotated[int, typer.Option("--seed", callback=opt.seed, help="Seed for splits, replay choice and training.")] = 0,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Adapt MODEL to local data: strategy chosen by measured memory, rollback if worse, atomic checkpoints."""
    from edgeopt.adapt import AdaptConfig
    from edgeopt.adapt import adapt as run_adapt
    from edgeopt.model import load_model
    from edgeopt.training import TrainSettings

    check_onnx_output(out)
    config = AdaptConfig(strategy=strategy, memory_mb=memory_mb,
                         train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed),
                         replay=replay, max_forget=max_forget, distill=distill, quantize=quantized)
    source = load_model(model, weights=weights, trust_pickle=trust_pickle)
    local = load_data_arg(data)
    original = load_data_arg(original_data) if original_data else None
    reference = load_model(deployed) if deployed else None
    result = run_adapt(source, local, config=config, original=original, out=out, resume=resume, deployed=reference,
                       progress=True)
    report = result.report
    if len(result.trials) > 1 or memory_mb is not None:
        table = Table(title="strategies (peak training memory measured)")
        for col in ("strategy", "trainable params", "peak MB", "fits"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for row in report["strategies"]:
            table.add_row(row["strategy"], f"{row['trainable_params']:,}", f"{row['peak_mb']:.2f}",
                          "yes" if row["fits"] else "no")
        console.print(table)
    summary = Table(title=f"edgeopt adapt: {report['strategy']['name']}")
    for col in ("data", "before", "after"):
        summary.add_column(col, justify="left" if col == "data" else "right")
    summary.add_row("local validation", fmt_pct(report["accuracy_before"]["local"]), fmt_pct(report["accuracy_after"]["local"]))
    if report["accuracy_before"]["original"] is not None:
        summary.add_row("original (held out)", fmt_pct(report["accuracy_before"]["original"]),
                        fmt_pct(report["accuracy_after"]["original"]))
    console.print(summary)
    console.print(f"trainable parameters {report['trainable_params']:,} of {report['total_params']:,}; "
                  f"peak training memory {report['peak_memory_mb']:.2f} MB"
                  + (f" (budget {memory_mb:g} MB)" if memory_mb is not None else ""))
    for attempt in report["attempts"][:-1]:
        err_console.print(f"tried {attempt['strategy']} first: {attempt['rollback_reason']}; "
                          "fell back to a strategy that trains fewer parameters")
    if result.rolled_back:
        err_console.print(f"rolled back: {report['rollback_reason']}; the output is the input model")
    console.print(f"wrote {out}, {report['outputs']['state_dict']}, {out.stem}.report.json")
    emit_json(json_out, report)
