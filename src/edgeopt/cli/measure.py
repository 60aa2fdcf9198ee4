"""edgeopt bench / eval / devices."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    DeviceOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    RunsOpt,
    RuntimeOpt,
    SecondsOpt,
    StdOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_threads,
    console,
    emit_json,
    fmt_bytes,
    fmt_pct,
    load_data_arg,
    user_errors,
)


@app.command()
@user_errors
def bench(
    models: Annotated[list[str], typer.Argument(help="One or more models; several are timed interleaved.")],
    data: Annotated[str | None, typer.Option("--data", help="Inputs to time with (default: random of the input shape).")] = None,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    batch: Annotated[int, typer.Option("--batch", callback=opt.batch, help="Samples per run.")] = 1,
    runs: RunsOpt = 100,
    seconds: SecondsOpt = 2.0,
    device: DeviceOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Latency (p50/p90/p99/mean), throughput, peak memory and size; several models interleaved."""
    from edgeopt.measure.bench import BenchSettings, compare, speedup_interval
    from edgeopt.model import load_model

    check_threads(threads)
    settings = BenchSettings(min_runs=runs, min_seconds=seconds)
    loaded = [load_model(m, weights=weights, trust_pickle=trust_pickle) for m in models]
    dataset = load_data_arg(data, input_size, mean, std) if data else None
    with console.status(f"timing {len(loaded)} model(s), interleaved..."):
        results = compare(loaded, settings=settings, batch=batch, data=dataset, runtime=runtime,
                          threads=threads, device=device)
    table = Table(title="edgeopt bench" + (" (interleaved)" if len(results) > 1 else ""))
    for col in ("model", "runtime", "thr", "batch", "size", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                "items/s", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    if len(results) > 1:
        table.add_column("vs first", justify="right")
        table.add_column("90% interval", justify="right")
    base = results[0].latency_ms["p50"]
    payload = [r.to_dict() for r in results]
    for r, entry in zip(results, payload, strict=True):
        row = [r.model, r.runtime, str(r.threads), str(r.batch), fmt_bytes(r.size_bytes),
               f"{r.latency_ms['p50']:.3f}", f"{r.latency_ms['p90']:.3f}", f"{r.latency_ms['p99']:.3f}",
               f"{r.latency_ms['mean']:.3f}", f"{r.throughput_ips:.1f}", f"{r.peak_rss_mb:.0f}"]
        if len(results) > 1:
            interval = speedup_interval(results[0], r) if r is not results[0] else None
            entry["vs_first"] = {"speedup_p50": base / r.latency_ms["p50"],
                                 "interval_90": list(interval) if interval else None}
            row += [f"{base / r.latency_ms['p50']:.2f}x", f"{interval[0]:.2f}-{interval[1]:.2f}x" if interval else "-"]
        table.add_row(*row)
    console.print(table)
    emit_json(json_out, payload[0] if len(payload) == 1 else payload)


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Model to evaluate.")],
    data: Annotated[str, typer.Option("--data", help=".npz, image folder, or sklearn:digits.")],
    reference: Annotated[str | None, typer.Option("--reference", help="Reference model for agreement and cosine.")] = None,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Accuracy (top-1, top-5) on labelled data; agreement and cosine against --reference."""
    from edgeopt.errors import DataError
    from edgeopt.measure.evaluate import evaluate
    from edgeopt.model import load_model

    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    ref = load_model(reference) if reference else None
    dataset = load_data_arg(data, input_size, mean, std)
    if dataset.labels is None and ref is None:
        raise DataError(f"{dataset.source} has no labels (y) and no --reference was given: nothing to measure")
    with console.status("evaluating..."):
        result = evaluate(loaded, dataset, reference=ref, runtime=runtime, threads=threads)
    table = Table(title=f"edgeopt eval: {loaded.source}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples", str(result.n))
    table.add_row("top-1 accuracy", fmt_pct(result.accuracy))
    table.add_row("top-5 accuracy", fmt_pct(result.top5))
    if ref is not None:
        classes = result.kind == "classes"
        table.add_row("output judged as", "class scores" if classes else "embeddings / other outputs")
        table.add_row("agreement vs reference", fmt_pct(result.agreement) + ("" if classes else " (not meaningful)"))
        if classes:
            table.add_row(f"agreement where reference is clear (n={result.n_confident})",
                          fmt_pct(result.confident_agreement))
            table.add_row("KL divergence of probabilities", "-" if result.kl is None else f"{result.kl:.5f}")
        table.add_row("cosine vs reference (mean)", f"{result.cosine:.6f}")
        table.add_row("cosine vs reference (5th pct / min)", f"{result.cosine_p5:.6f} / {result.min_cosine:.6f}")
        if result.embedding_cosine is not None:
            table.add_row("pooled embedding cosine (mean)", f"{result.embedding_cosine:.6f}")
        if result.nn_agreement is not None:
            table.add_row("nearest-neighbour agreement (pooled)", fmt_pct(result.nn_agreement))
    console.print(table)
    payload = {k: v for k, v in result.to_dict().items() if k != "min_cosine" or ref is not None}
    emit_json(json_out, payload)


@app.command()
@user_errors
def devices(json_out: JsonOpt = None) -> None:
    """List device profiles: runtime, threads, memory budget, precisions, relative speed."""
    from edgeopt.devices import list_devices

    profiles = list_devices()
    table = Table(title="device profiles")
    for col in ("name", "runtime", "threads", "memory MB", "precisions", "rel. speed", "description"):
        table.add_column(col)
    for p in profiles:
        table.add_row(p.name, p.runtime, str(p.threads or f"all ({p.effective_threads()})"),
                      str(p.memory_mb or "-"), ", ".join(p.precisions), f"{p.relative_speed:g}", p.description)
    console.print(table)
    emit_json(json_out, [p.to_dict() for p in profiles])
