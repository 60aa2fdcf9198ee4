"""edgeopt prune: unstructured sparsity or structured channel pruning, fine-tuned and measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    SECONDS,
    DeviceOpt,
    JsonOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_onnx_output,
    check_threads,
    console,
    emit_json,
    err_console,
    fmt_bytes,
    fmt_pct,
    image_folder_flags,
    load_data_arg,
    resolve_threads,
    user_errors,
)
from edgeopt.fileio import report_path


@app.command()
@user_errors
@image_folder_flags
def prune(
    model: Annotated[str, typer.Argument(help="PyTorch model: path/to/file.py:factory (with --weights) or a .pt2.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .onnx; .pt, .pt2 and .report.json go beside it.")],
    sparsity: Annotated[float, typer.Option("--sparsity", callback=opt.unit_interval_drop, help="Fraction in [0, 1): weights zeroed, or with "
                                            "--structured, channels removed per layer.")],
    structured: Annotated[bool, typer.Option("--structured", help="Remove whole channels (smaller dense model).")] = False,
    importance: Annotated[str, typer.Option("--importance", help="--structured: l1, l2 or taylor.")] = "l1",
    scope: Annotated[str, typer.Option("--scope", help="Unstructured: layer (each layer to S) or global.")] = "layer",
    skip: Annotated[str | None, typer.Option("--skip", help="Comma-separated layer names to leave alone.")] = None,
    target_macs: Annotated[float | None, typer.Option("--target-macs", callback=opt.positive, help="--structured: prune in small steps "
                                                      "(at most --sparsity) until MACs <= this.")] = None,
    target_latency_ms: Annotated[float | None, typer.Option(
        "--target-latency-ms", callback=opt.positive, help="--structured: remove the fewest channels (at most --sparsity) that bring the "
        "ONNX export's measured batch-1 p50 (--device, --threads) to <= this many ms.")] = None,
    round_to: Annotated[int | None, typer.Option("--round-to", callback=opt.at_least_one, help="--structured: keep channel counts multiples of N.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Fine-tuning data (.npz/folder/sklearn:digits).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Data to judge accuracy on (default: 20% "
                                                  "held out of --data).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", callback=opt.count, help="Fine-tuning epochs after each pruning step.")] = 0,
    lr: Annotated[float, typer.Option("--lr", callback=opt.positive, help="Fine-tuning learning rate.")] = 1e-3,
    distill: Annotated[bool, typer.Option("--distill", help="Fine-tune with distillation from the unpruned model.")] = False,
    steps: Annotated[int, typer.Option("--steps", callback=opt.at_least_one, help="Iterative prune-and-tune steps.")] = 1,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    seconds: SecondsOpt = SECONDS,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the before/after latency measurement "
                                             "(a --target-latency-ms search still times).")] = False,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Prune a PyTorch model; report MACs, params, sparsity, gzip sizes, latency and accuracy before/after."""
    from edgeopt.devices import get_device
    from edgeopt.errors import BadInput
    from edgeopt.fileio import write_json
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import load_model
    from edgeopt.report.prune import prune as run_prune
    from edgeopt.report.prune import save_pruned
    from edgeopt.training import TrainSettings
    from edgeopt.transforms.prune import StructuredPrune, UnstructuredPrune, torch_module

    check_threads(threads)
    if epochs > 0 and data is None:
        raise BadInput("--epochs needs fine-tuning data: pass --data TRAIN.npz")
    targets = target_macs is not None or target_latency_ms is not None
    if not structured and (targets or round_to is not None or importance != "l1"):
        raise BadInput("--target-macs, --target-latency-ms, --round-to and --importance apply to "
                       "--structured pruning")
    if target_macs is not None and target_latency_ms is not None:
        raise BadInput("--target-macs and --target-latency-ms are alternatives: give one")
    if structured and scope != "layer":
        raise BadInput("--scope applies to unstructured pruning")
    names = tuple(s.strip() for s in skip.split(",") if s.strip()) if skip else ()
    tuning = {"train": TrainSettings(epochs=epochs, lr=lr), "distill": distill, "iterative_steps": steps}
    if structured:
        cfg: Any = StructuredPrune(ratio=sparsity, importance=importance, skip=names, target_macs=target_macs,
                                   target_latency_ms=target_latency_ms, round_to=round_to, **tuning)
    else:
        cfg = UnstructuredPrune(sparsity=sparsity, scope=scope, skip=names, **tuning)
    check_onnx_output(out)
    if device is not None:
        get_device(device)
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    torch_module(loaded)
    tune = load_data_arg(data) if data else None
    held = load_data_arg(eval_data) if eval_data else None
    bench = BenchSettings(warmup=10, min_runs=100, min_seconds=seconds, max_seconds=max(20.0, seconds))
    with console.status("pruning..." if epochs == 0 else "pruning and fine-tuning..."):
        result = run_prune(loaded, cfg, data=tune, eval_data=held, threads=resolve_threads(threads, device), device=device,
                           latency=not no_latency, bench_settings=bench, progress=epochs > 0)
    paths = save_pruned(result, out)
    payload = {**result.report, "outputs": {**paths, "report": str(report_path(out))}}
    write_json(report_path(out), payload)
    _print(payload)
    console.print(f"wrote {out} ({fmt_bytes(result.onnx.size_bytes)}), {paths['state_dict']}, {paths['pt2']} "
                  f"and {report_path(out)}")
    emit_json(json_out, payload)


def _print(report: dict[str, Any]) -> None:
    if "sparsity" in report:
        table = Table(title="sparsity per layer")
        for col in ("layer", "parameters", "zeros", "sparsity"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for row in report["sparsity"]:
            table.add_row(row["layer"], str(row["parameters"]), str(row["zeros"]), f"{row['sparsity_pct']:.2f}%")
        console.print(table)
    summary = Table(title="before / after")
    for col in ("metric", "before", "after", "change"):
        summary.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("macs", "params"):
        v = report[key]
        summary.add_row("MACs" if key == "macs" else "parameters", f"{v['before']:,}", f"{v['after']:,}",
                        f"-{v['reduction_pct']:.2f}%")
    before, after = report["sizes"]["before"], report["sizes"]["after"]
    for key, label in (("onnx_bytes", "ONNX size"), ("onnx_gzip_bytes", "ONNX gzip"),
                       ("state_dict_gzip_bytes", "state_dict gzip")):
        summary.add_row(label, fmt_bytes(before[key]), fmt_bytes(after[key]), f"{after[key] / before[key]:.2f}x")
    if "latency" in report:
        lat = report["latency"]
        summary.add_row(f"p50 latency ms (ORT, {lat['threads']} thr, interleaved)", f"{lat['before_ms']['p50']:.3f}",
                        f"{lat['after_ms']['p50']:.3f}", f"{lat['speedup_p50']:.2f}x faster")
    if "accuracy" in report:
        acc = report["accuracy"]
        summary.add_row(f"accuracy ({acc['samples']} held-out)", fmt_pct(acc["before"]), fmt_pct(acc["after"]),
                        f"{-acc['drop_pts']:+.2f} pt")
    console.print(summary)
    if "note" in report:
        console.print(f"note: {report['note']}")
    _print_target(report)
    console.print(f"export check: max abs diff {report['export_check']['max_abs_diff']:.2e} (ONNX vs pruned PyTorch)")


def _print_target(report: dict[str, Any]) -> None:
    """Say whether the MAC or latency target was met; a target missed within --sparsity is a warning."""
    fields = report["config"]["fields"]
    if report.get("target_macs_met") is False:
        err_console.print(f"[yellow]warning:[/yellow] target MACs {fields['target_macs']:,.0f} not met within "
                          f"--sparsity {fields['ratio']}: reached {report['macs']['after']:,}")
    if "target_latency" not in report:
        return
    t = report["target_latency"]
    setting = f"{t['runtime']}, {t['threads']} thread{'s' if t['threads'] != 1 else ''}, batch 1"
    if not t["met"]:
        err_console.print(f"[yellow]warning:[/yellow] target latency {t['target_ms']:g} ms not met within "
                          f"--sparsity {fields['ratio']}: reached {t['reached_ms']:.3f} ms "
                          f"(original {t['original_ms']:.3f} ms; {setting})")
    elif not report["steps"]:
        console.print(f"target latency {t['target_ms']:g} ms: the original already meets it "
                      f"({t['original_ms']:.3f} ms; {setting}), nothing pruned")
    else:
        timed = sum(s["timed"] for s in t["timings"]) - 1
        console.print(f"target latency {t['target_ms']:g} ms met: {t['reached_ms']:.3f} ms with {t['ratio']:.2%} of "
                      f"channels removed, original {t['original_ms']:.3f} ms ({setting}; {timed} candidates timed)")
