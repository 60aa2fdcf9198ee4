"""edgeopt bench / eval / devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer import _click as click  # the click typer runs on (see cli/group.py)
from typer.core import TyperGroup

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    SECONDS,
    JsonOpt,
    RunsOpt,
    RuntimeOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_threads,
    console,
    emit_json,
    fmt_bytes,
    fmt_pct,
    image_folder_flags,
    load_data_arg,
    user_errors,
)
from edgeopt.errors import BadInput

FleetOpt = Annotated[str | None, typer.Option(
    "--device", help="Device profile(s): a name or .yaml file; several comma-separated give one column each.")]


def device_list(spec: str | None) -> list[str | None]:
    """``--device a,b`` -> ["a", "b"]; no --device -> [None] (this machine)."""
    if spec is None:
        return [None]
    names = [n.strip() for n in spec.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise BadInput(f"--device takes profile names separated by commas, each once, got {spec!r}")
    return list(names)


@app.command()
@user_errors
@image_folder_flags
def bench(
    models: Annotated[list[str], typer.Argument(help="One or more models; several are timed interleaved.")],
    data: Annotated[str | None, typer.Option("--data", help="Inputs to time with (default: random of the input shape).")] = None,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    batch: Annotated[int, typer.Option("--batch", callback=opt.batch, help="Samples per run.")] = 1,
    runs: RunsOpt = 100,
    seconds: SecondsOpt = SECONDS,
    device: FleetOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Latency (p50/p90/p99/mean), throughput, peak memory and size; several models interleaved."""
    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.model import load_model

    check_threads(threads)
    settings = BenchSettings(min_runs=runs, min_seconds=seconds)
    targets = device_list(device)
    loaded = [load_model(m, weights=weights, trust_pickle=trust_pickle) for m in models]
    dataset = load_data_arg(data) if data else None
    per_device = {}
    for target in targets:
        label = f" on {target}" if target else ""
        with console.status(f"timing {len(loaded)} model(s){label}, interleaved..."):
            per_device[target or "host"] = compare(loaded, settings=settings, batch=batch, data=dataset,
                                                   runtime=runtime, threads=threads, device=target)
    payloads = {name: _bench_payload(results) for name, results in per_device.items()}
    if len(per_device) == 1:
        (results,) = per_device.values()
        _bench_table(results, payloads[next(iter(payloads))])
        emit_json(json_out, next(iter(payloads.values())))
    else:
        _fleet_table(per_device)
        emit_json(json_out, {"devices": payloads})


def _bench_payload(results: list[Any]) -> Any:
    from edgeopt.measure.bench import speedup_interval

    payload = [r.to_dict() for r in results]
    base = results[0].latency_ms["p50"]
    if len(results) > 1:
        for r, entry in zip(results, payload, strict=True):
            interval = speedup_interval(results[0], r) if r is not results[0] else None
            entry["vs_first"] = {"speedup_p50": base / r.latency_ms["p50"],
                                 "interval_90": list(interval) if interval else None}
    return payload[0] if len(payload) == 1 else payload


def _bench_table(results: list[Any], payload: Any) -> None:
    entries = payload if isinstance(payload, list) else [payload]
    table = Table(title="edgeopt bench" + (" (interleaved)" if len(results) > 1 else ""))
    for col in ("model", "runtime", "thr", "batch", "size", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                "items/s", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    if len(results) > 1:
        table.add_column("vs first", justify="right")
        table.add_column("90% interval", justify="right")
    for r, entry in zip(results, entries, strict=True):
        row = [r.model, r.runtime, str(r.threads), str(r.batch), fmt_bytes(r.size_bytes),
               f"{r.latency_ms['p50']:.3f}", f"{r.latency_ms['p90']:.3f}", f"{r.latency_ms['p99']:.3f}",
               f"{r.latency_ms['mean']:.3f}", f"{r.throughput_ips:.1f}", f"{r.peak_rss_mb:.0f}"]
        if len(results) > 1:
            vs = entry["vs_first"]
            interval = vs["interval_90"]
            row += [f"{vs['speedup_p50']:.2f}x", f"{interval[0]:.2f}-{interval[1]:.2f}x" if interval else "-"]
        table.add_row(*row)
    console.print(table)
    console.print(where_line(results[0].measured_on), style="dim")


def _fleet_table(per_device: dict[str, list[Any]]) -> None:
    """One row a model, one p50 column (and speed-up vs the first model) a device."""
    from edgeopt.measure.bench import speedup_interval

    table = Table(title="edgeopt bench: one column per device (each device's models interleaved)")
    table.add_column("model")
    for name in per_device:
        table.add_column(f"{name} p50 ms", justify="right")
        table.add_column(f"{name} vs first", justify="right")
    rows = list(zip(*per_device.values(), strict=True))
    for i, row_results in enumerate(rows):
        cells = [row_results[0].model]
        for results, r in zip(per_device.values(), row_results, strict=True):
            interval = speedup_interval(results[0], r) if i else None
            speed = results[0].latency_ms["p50"] / r.latency_ms["p50"]
            cells += [f"{r.latency_ms['p50']:.3f}",
                      f"{speed:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")]
        table.add_row(*cells)
    console.print(table)
    for results in per_device.values():
        console.print(where_line(results[0].measured_on), style="dim")


def where_line(where: dict[str, Any]) -> str:
    """``measured on pi (pi@10.0.0.7:22): Cortex-A72, 4 cores, NEON, onnxruntime 1.20.1``."""
    via = f" ({where['ssh']})" if where.get("ssh") else " (this machine)"
    isa = ", ".join(where.get("isa") or []) or "no SIMD flags reported"
    return (f"measured on {where.get('device')}{via}: {where.get('cpu')}, {where.get('usable_cores')} usable "
            f"core(s), {isa}; {where.get('runtime')} {where.get('runtime_version') or '?'}")


@app.command("eval")
@user_errors
@image_folder_flags
def eval_(
    model: Annotated[str, typer.Argument(help="Model to evaluate.")],
    data: Annotated[str, typer.Option("--data", help=".npz, image folder, or sklearn:digits.")],
    reference: Annotated[str | None, typer.Option("--reference", help="Reference model for agreement and cosine.")] = None,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    device: FleetOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Accuracy (top-1, top-5) on labelled data; agreement and cosine against --reference."""
    from edgeopt.errors import DataError
    from edgeopt.measure.evaluate import evaluate
    from edgeopt.model import load_model

    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    ref = load_model(reference) if reference else None
    dataset = load_data_arg(data)
    if dataset.labels is None and ref is None:
        raise DataError(f"{dataset.source} has no labels (y) and no --reference was given: nothing to measure")
    per_device = {}
    for target in device_list(device):
        with console.status("evaluating" + (f" on {target}" if target else "") + "..."):
            per_device[target or "host"] = evaluate(loaded, dataset, reference=ref, runtime=runtime,
                                                    threads=threads, device=target)
    table = Table(title=f"edgeopt eval: {loaded.source}")
    table.add_column("metric")
    for name in per_device:
        table.add_column(name if len(per_device) > 1 else "value", justify="right")
    results = list(per_device.values())
    table.add_row("samples", *[str(r.n) for r in results])
    table.add_row("top-1 accuracy", *[fmt_pct(r.accuracy) for r in results])
    table.add_row("top-5 accuracy", *[fmt_pct(r.top5) for r in results])
    if ref is not None:
        first = results[0]
        table.add_row("output judged as", *["class scores" if r.kind == "classes" else "embeddings / other outputs"
                                            for r in results])
        table.add_row("agreement vs reference", *[fmt_pct(r.agreement) + ("" if r.kind == "classes" else
                                                                          " (not meaningful)") for r in results])
        if first.kind == "classes":
            table.add_row(f"agreement where reference is clear (n={first.n_confident})",
                          *[fmt_pct(r.confident_agreement) for r in results])
            table.add_row("KL divergence of probabilities", *["-" if r.kl is None else f"{r.kl:.5f}" for r in results])
        table.add_row("cosine vs reference (mean)", *[f"{r.cosine:.6f}" for r in results])
        table.add_row("cosine vs reference (5th pct / min)",
                      *[f"{r.cosine_p5:.6f} / {r.min_cosine:.6f}" for r in results])
        if first.embedding_cosine is not None:
            table.add_row("pooled embedding cosine (mean)", *[f"{r.embedding_cosine:.6f}" for r in results])
        if first.nn_agreement is not None:
            table.add_row("nearest-neighbour agreement (pooled)", *[fmt_pct(r.nn_agreement) for r in results])
            table.add_row("  as expected (steadier than the count; 90 % over samples)",
                          *[f"{fmt_pct(r.nn_expected_agreement)} +- {100 * (r.nn_expected_margin or 0):.1f} pt"
                            for r in results])
            table.add_row("  near-ties allowed (what --metric neighbours judges)",
                          *[fmt_pct(r.nn_tie_agreement) for r in results])
            table.add_row(f"  where the reference's neighbour is clear (n={first.n_nn_confident})",
                          *[fmt_pct(r.nn_confident_agreement) for r in results])
    console.print(table)
    payloads = {}
    for name, r in per_device.items():
        payloads[name] = {k: v for k, v in r.to_dict().items() if k != "min_cosine" or ref is not None}
        payloads[name]["measured_on"] = r.measured_on
        console.print(where_line(r.measured_on), style="dim")
    emit_json(json_out, next(iter(payloads.values())) if len(payloads) == 1 else {"devices": payloads})


class _ListByDefault(TyperGroup):
    """``edgeopt devices [--json OUT]`` lists; ``devices add|check|list ...`` are the sub-commands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


devices_app = typer.Typer(cls=_ListByDefault, add_completion=False,
                          help="Device profiles: list them (default), add a remote one over SSH, check a remote one.")
app.add_typer(devices_app, name="devices")


@devices_app.command("list")
@user_errors
def devices_list(json_out: JsonOpt = None) -> None:
    """List device profiles: runtime, threads, memory budget, precisions, relative speed, where."""
    from edgeopt.devices import list_devices, user_profile_dir

    profiles = list_devices()
    table = Table(title="device profiles")
    for col in ("name", "runtime", "threads", "memory MB", "precisions", "rel. speed", "where / description"):
        table.add_column(col)
    for p in profiles:
        threads = str(p.threads) if p.threads else ("all (device)" if p.ssh else f"all ({p.effective_threads()})")
        table.add_row(p.name, p.runtime, threads, str(p.memory_mb or "-"), ", ".join(p.precisions),
                      "measured" if p.ssh else f"{p.relative_speed:g}",
                      f"ssh {p.ssh}" if p.ssh else p.description)
    console.print(table)
    console.print(f"your profiles: {user_profile_dir()} (edgeopt devices add NAME --ssh user@host)", style="dim")
    emit_json(json_out, [p.to_dict() for p in profiles])


@devices_app.command("add")
@user_errors
def devices_add(
    name: Annotated[str, typer.Argument(help="A name for the device, used as --device NAME.")],
    ssh: Annotated[str, typer.Option("--ssh", metavar="USER@HOST[:PORT]", help="How to reach the device over SSH.")],
    key: Annotated[Path | None, typer.Option("--key", help="Private key the device accepts (default: what ssh offers).")] = None,
    python: Annotated[str | None, typer.Option("--python", help="Python on the device (default: python3).")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help="Folder on the device for the runner and models (default: .cache/edgeopt in the home).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads on the device (default: all it allows).")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="Memory budget on the device in MB.")] = None,
    known_hosts: Annotated[Path | None, typer.Option("--known-hosts", help="known_hosts file to check the host key against (default: OpenSSH's).")] = None,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="Trust the host key on first use (ssh StrictHostKeyChecking=accept-new).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an existing profile of that name.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Connect once and report the device (as devices check).")] = False,
) -> None:
    """Add a remote device: bench, eval, quantize and optimize with --device NAME then measure on it."""
    from edgeopt.devices import add_device, get_device

    check_threads(threads)
    if memory_mb is not None and memory_mb < 1:
        raise BadInput(f"--memory-mb must be >= 1, got {memory_mb}")
    path = add_device(name, ssh=ssh, ssh_key=str(key) if key else None, python=python, workdir=workdir,
                      threads=threads, memory_mb=memory_mb, known_hosts=str(known_hosts) if known_hosts else None,
                      accept_new_host_key=accept_new_host_key, replace=replace)
    console.print(f"wrote {path}; no password is stored (the device authenticates your SSH key)")
    if check:
        _print_check(get_device(name), None)
    else:
        console.print(f"next: edgeopt devices check {name}")


@devices_app.command("check")
@user_errors
def devices_check(
    name: Annotated[str, typer.Argument(help="A remote device profile (see edgeopt devices).")],
    json_out: JsonOpt = None,
) -> None:
    """Connect to a remote device: CPU, cores, ISA flags, memory, Python, runtimes; what is missing."""
    from edgeopt.devices import get_device

    profile = get_device(name)
    if not profile.ssh:
        raise BadInput(f"device {name} is measured on this machine, not over SSH: nothing to check "
                       "(add a remote one with edgeopt devices add NAME --ssh user@host)")
    _print_check(profile, json_out)


def _print_check(profile: Any, json_out: str | None) -> None:
    from edgeopt.errors import DeviceError
    from edgeopt.runtimes.remote import check_device

    with console.status(f"connecting to {profile.name} ({profile.ssh})..."):
        report = check_device(profile)
    info = report["info"]
    table = Table(title=f"device {profile.name} ({report['ssh']})")
    table.add_column("what")
    table.add_column("found")
    runtimes = info.get("runtimes") or {}
    rows = [("host", f"{info.get('hostname')} ({info.get('system')} {info.get('machine')})"),
            ("CPU", str(info.get("cpu"))),
            ("cores", f"{info.get('usable_cores')} usable of {info.get('cores')}"),
            ("ISA", ", ".join(info.get("isa") or []) or "-"),
            ("memory", f"{info.get('memory_mb')} MB ({info.get('memory_available_mb')} MB available)"),
            ("python", f"{info.get('python')} ({info.get('python_executable')})"),
            ("numpy", info.get("numpy") or "MISSING")]
    for rt, found in runtimes.items():
        rows.append((rt, f"{found['version']} ({found['package']})" if found else
                     ("MISSING (required)" if rt == "onnxruntime" else "-")))
    rows.append(("workdir", f"{report['workdir']} (runner {report['runner']})"))
    for what, found in rows:
        table.add_row(what, found)
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", style="yellow")
    if report["missing"]:
        emit_json(json_out, report)
        raise DeviceError(f"device {profile.name} is missing {', '.join(report['missing'])}: run on the device: "
                          f"{report['fix']}")
    console.print(f"ready: edgeopt bench MODEL --device {profile.name}", style="bold green")
    emit_json(json_out, report)
