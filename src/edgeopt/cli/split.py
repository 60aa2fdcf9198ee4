"""edgeopt split MODEL (plan and write the stages) and edgeopt split run OUTDIR (run the pipeline).

``split`` is a group whose default command is the planner: ``edgeopt split MODEL ...`` reads as
``edgeopt split plan MODEL ...`` unless the first argument names a sub-command (``run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer import _click as click  # the click typer runs on (see cli/group.py)
from typer.core import TyperGroup

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import JsonOpt, console, emit_json, fmt_bytes, image_folder_flags, user_errors


class _PlanByDefault(TyperGroup):
    """Route ``split MODEL ...`` to ``split plan MODEL ...``; ``split run ...`` stays ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["plan", *args]
        return super().parse_args(ctx, args)


split_app = typer.Typer(cls=_PlanByDefault, no_args_is_help=True,
                        help="Cut a model across devices (split MODEL) and run the parts as a pipeline (split run OUTDIR).")
app.add_typer(split_app, name="split")


@split_app.command("plan")
@user_errors
def plan(
    model: Annotated[str, typer.Argument(help="ONNX model to split.")],
    devices: Annotated[str, typer.Option("--devices", help="Device profiles in pipeline order, e.g. rpi4,gateway-x86.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory: stage_k.onnx and plan.json.")],
    link_mbps: Annotated[float | None, typer.Option("--link-mbps", callback=opt.positive, help="Link bandwidth between stages in Mbit/s (default: the profiles' link_mbps).")] = None,
    link_latency_ms: Annotated[float, typer.Option("--link-latency-ms", callback=opt.non_negative, help="One-way link latency in ms.")] = 0.0,
    objective: Annotated[str, typer.Option("--objective", help="latency (one item end to end) or throughput (pipeline bottleneck).")] = "latency",
    cuts: Annotated[str | None, typer.Option("--cuts", help="Cut after these node positions instead of planning, e.g. 28 or 17,34.")] = None,
    threads: Annotated[int, typer.Option("--threads", callback=opt.threads, help="Intra-op threads per stage (profiling and split run).")] = 1,
    json_out: JsonOpt = None,
) -> None:
    """Pick cut points by device speed and link bandwidth; write stage_k.onnx and plan.json."""
    from edgeopt.errors import BadInput
    from edgeopt.split import split_model

    names = [d.strip() for d in devices.split(",") if d.strip()]
    positions = None
    if cuts is not None:
        try:
            positions = [int(c) for c in cuts.split(",")]
        except ValueError:
            raise BadInput(f"--cuts takes comma-separated node positions, got {cuts!r}") from None
    with console.status("profiling segments and planning the split..."):
        result = split_model(model, names, out_dir=out, link_mbps=link_mbps, link_latency_ms=link_latency_ms,
                             objective=objective, cuts=positions, threads=threads)  # type: ignore[arg-type]
    table = Table(title=f"edgeopt split: {model} -> {out} (objective {result.objective}, "
                        f"link {result.link.mbps:g} Mbit/s + {result.link.latency_ms:g} ms)")
    for col in ("stage", "device", "nodes", "out tensor", "out size", "compute ms", "transfer ms"):
        table.add_column(col, justify="left" if col in ("stage", "device", "out tensor") else "right")
    for s in result.stages:
        table.add_row(s.path, s.device, f"{s.first_node}-{s.last_node}", ", ".join(s.outputs),
                      fmt_bytes(s.out_bytes) if s.out_bytes else "-", f"{s.compute_ms:.2f}",
                      f"{s.transfer_ms:.2f}" if s.index < len(result.stages) - 1 else "-")
    console.print(table)
    console.print(f"cuts after nodes {result.cuts or 'none'}; predicted end-to-end latency "
                  f"{result.predicted_latency_ms:.2f} ms, throughput {result.predicted_throughput_ips:.1f} items/s")
    emit_json(json_out, _read_plan(out))


def _read_plan(out: Path) -> Any:
    import json

    return json.loads((out / "plan.json").read_text())


@split_app.command("run")
@user_errors
@image_folder_flags
def run(
    outdir: Annotated[Path, typer.Argument(help="Directory written by edgeopt split.")],
    data: Annotated[str | None, typer.Option("--data", help="Inputs for the whole model (default: random of its input shape).")] = None,
    items: Annotated[int, typer.Option("--items", callback=opt.at_least_one, help="Items per pass (latency pass, then streamed pass).")] = 32,
    simulate_link: Annotated[bool, typer.Option("--simulate-link", help="Apply the plan's link bandwidth and latency between stages.")] = False,
    simulate_devices: Annotated[bool, typer.Option("--simulate-devices", help="Slow each stage to its device's relative_speed.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", callback=opt.threads, help="Intra-op threads per stage (default: the plan's).")] = None,
    reference: Annotated[str | None, typer.Option("--reference", help="Whole ONNX model to compare outputs with (default: the one split).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", callback=opt.timeout, help="Seconds to wait for a stage before calling it stuck.")] = 60.0,
    stage_urls: Annotated[str | None, typer.Option("--stage-urls", help="Run the stages on OIP v2 servers instead: http://HOST:PORT[/v2/models/NAME] per stage, comma-separated, in order.")] = None,
    in_flight: Annotated[int | None, typer.Option("--in-flight", callback=opt.at_least_one, help="With --stage-urls: items in flight in the streamed pass (default: stages + 1).")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Run the stages as processes linked by TCP (or on OIP v2 servers): latency per item, throughput, max abs diff vs the whole model."""
    from edgeopt.cli.common import load_data_arg
    from edgeopt.errors import BadInput

    if stage_urls is None:
        if in_flight is not None:
            raise BadInput("--in-flight applies to --stage-urls only; the local pipeline streams every item")
    else:
        for flag, given in (("--simulate-link", simulate_link), ("--simulate-devices", simulate_devices),
                            ("--threads", threads is not None)):
            if given:
                raise BadInput(f"{flag} does not apply to --stage-urls: remote stages run on their own "
                               "devices and links, with the servers' own settings")
    dataset = load_data_arg(data) if data else None
    if stage_urls is not None:
        from edgeopt.split.remote import run_remote

        with console.status("running the stages on their OIP servers..."):
            result = run_remote(outdir, stage_urls, data=dataset, items=items, in_flight=in_flight,
                                reference=reference, timeout_s=timeout)
        title = (f"edgeopt split run: {outdir} ({result.stages} stages on OIP servers, "
                 f"{result.in_flight} in flight; predicted: the plan's devices and link)")
    else:
        from edgeopt.split.pipeline import run_pipeline

        with console.status("running the pipeline..."):
            result = run_pipeline(outdir, data=dataset, items=items, simulate_link=simulate_link,
                                  simulate_devices=simulate_devices, threads=threads, reference=reference,
                                  timeout_s=timeout)
        title = (f"edgeopt split run: {outdir} ({result.stages} stages, {result.threads} thread(s) each"
                 + (", simulated link" if simulate_link else "") + ")")
    table = Table(title=title)
    for col in ("", "measured", "predicted", "measured/predicted"):
        table.add_column(col, justify="left" if not col else "right")
    lat, pred = result.latency_ms["p50"], result.predicted_latency_ms
    table.add_row("latency p50 ms", f"{lat:.2f}", f"{pred:.2f}", f"{lat / pred:.2f}" if pred else "-")
    table.add_row("latency mean / p90 ms", f"{result.latency_ms['mean']:.2f} / {result.latency_ms['p90']:.2f}", "-", "-")
    tput, ptput = result.throughput_ips, result.predicted_throughput_ips
    table.add_row("throughput items/s", f"{tput:.1f}", f"{ptput:.1f}", f"{tput / ptput:.2f}" if ptput else "-")
    table.add_row("max abs diff vs whole model", "-" if result.max_abs_diff is None else f"{result.max_abs_diff:.3g}",
                  "-", "-")
    console.print(table)
    if result.remote:
        stages = Table(title="per stage (latency pass)")
        for col in ("stage", "server", "round trip p50 ms", "server mean ms"):
            stages.add_column(col, justify="left" if col in ("stage", "server") else "right")
        for k, r in enumerate(result.remote):
            stages.add_row(str(k), r["url"], f"{r['round_trip_ms']['p50']:.2f}",
                           "-" if r["server_mean_ms"] is None else f"{r['server_mean_ms']:.2f}")
        console.print(stages)
    emit_json(json_out, result.to_dict())
