"""edgeopt quantize / analyze."""

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
    MaxDropOpt,
    MetricOpt,
    MinCosineOpt,
    QatEpochsOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_onnx_output,
    check_threads,
    console,
    emit_json,
    fmt_bytes,
    fmt_cos,
    fmt_pct,
    image_folder_flags,
    load_data_arg,
    resolve_threads,
    user_errors,
)
from edgeopt.fileio import report_path

# QAT epochs of the recovery step when --qat-epochs is not given
DEFAULT_QAT_EPOCHS = 3
MODES = ("auto", "dynamic", "static", "fp16", "bf16", "int4")
# Without data, dynamic non-batch dimensions (a transformer's sequence length) are timed at this size.
DEFAULT_DYNAMIC_DIM = 128


def _config(mode: str, *, fmt: str, per_channel: bool | None, calibration: str, activation_type: str,
            weight_type: str, samples: int, exclude: str | None, block_size: int) -> Any:
    from edgeopt.transforms import quantize as q

    excluded = tuple(n for n in (exclude or "").split(",") if n)
    if mode == "static":
        return q.StaticInt8(format=fmt, per_channel=True if per_channel is None else per_channel,  # type: ignore[arg-type]
                            activation_type=activation_type, weight_type=weight_type,  # type: ignore[arg-type]
                            calibration=calibration, samples=samples, exclude_nodes=excluded)  # type: ignore[arg-type]
    if mode == "dynamic":
        return q.DynamicInt8(per_channel=bool(per_channel), weight_type=weight_type,  # type: ignore[arg-type]
                             exclude_nodes=excluded)
    if mode == "fp16":
        return q.Fp16()
    if mode == "int4":
        return q.Int4WeightOnly(block_size=block_size)
    return q.Bf16()


@app.command()
@user_errors
@image_folder_flags
def quantize(
    model: Annotated[str, typer.Argument(help="FP32 ONNX model; --mode auto also takes PyTorch file.py:factory "
                                         "with --weights (exported first; with labelled --data, QAT can run).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .onnx (a .report.json is written beside it).")],
    mode: Annotated[str, typer.Option("--mode", help="auto (measure variants, keep the fastest within budget), "
                                      "dynamic, static, fp16, bf16 (OpenVINO run hint) or int4.")] = "auto",
    data: Annotated[str | None, typer.Option("--data", help="Data (.npz, image folder, sklearn:digits): calibrates static and "
                                                   "auto; the other modes only judge on it.")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out data to judge on (default: --mode auto holds "
                                                  "out half of --data; the other modes judge on all of --data, which "
                                                  "static also calibrates on).")] = None,
    max_drop: MaxDropOpt = 0.01,
    metric: MetricOpt = "auto",
    min_cosine: MinCosineOpt = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="auto: only try this runtime (onnxruntime or openvino).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="static: qdq or qoperator.")] = "qdq",
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or per tensor; auto --per-tensor: a target without per-channel INT8 (only per-tensor variants, QAT per tensor).")] = None,
    calibration: Annotated[str, typer.Option("--calibration", help="static: minmax, entropy or percentile.")] = "minmax",
    activation_type: Annotated[str, typer.Option("--activation-type", help="static: u8 or s8.")] = "u8",
    weight_type: Annotated[str, typer.Option("--weight-type", help="s8 or u8.")] = "s8",
    samples: Annotated[int, typer.Option("--samples", callback=opt.at_least_one, help="static: calibration samples used.")] = 128,
    exclude: Annotated[str | None, typer.Option("--exclude", help="static, dynamic: comma-separated node names kept in float.")] = None,
    block_size: Annotated[int, typer.Option("--block-size", callback=opt.at_least_one, help="int4: weights per scale.")] = 32,
    qat_epochs: QatEpochsOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    seconds: SecondsOpt = SECONDS,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Quantize a model and prove the result: size, latency interleaved with FP32, accuracy and agreement."""
    from edgeopt.errors import BadInput
    from edgeopt.fileio import write_json
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import load_model

    if mode not in MODES:
        raise BadInput(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if max_drop < 0 or max_drop >= 1:
        raise BadInput(f"--max-drop must be in [0, 1) (0.01 = 1 point), got {max_drop}")
    from edgeopt.search.budget import Budget

    Budget(metric=metric, max_drop=max_drop, min_cosine=min_cosine)  # type: ignore[arg-type]  # validates the flags
    if mode in ("auto", "static") and data is None:
        raise BadInput(f"--mode {mode} needs calibration data: pass --data CAL.npz"
                       + (" (or use --mode dynamic, which needs none)" if mode == "static" else ""))
    check_threads(threads)
    if runtime is not None and mode != "auto":
        raise BadInput("--runtime applies to --mode auto; the other modes produce ONNX Runtime models "
                       "(bf16: OpenVINO)")
    if qat_epochs is not None and mode != "auto":
        raise BadInput("--qat-epochs applies to --mode auto (QAT is one of its recovery steps)")
    check_onnx_output(out)
    cfg = None if mode == "auto" else _config(mode, fmt=fmt, per_channel=per_channel, calibration=calibration,
                                               activation_type=activation_type, weight_type=weight_type,
                                               samples=samples, exclude=exclude, block_size=block_size)
    original = load_model(model, weights=weights, trust_pickle=trust_pickle)
    from edgeopt.transforms.quantize import check_quantizable

    if not (mode == "auto" and original.format == "torch"):  # auto exports a PyTorch model itself
        check_quantizable(original)
    dataset = load_data_arg(data) if data else None
    held = load_data_arg(eval_data) if eval_data else None
    if dataset is not None:
        dataset.feeds_for(original)
    if held is not None:
        held.feeds_for(original)
    dynamic_dim = None
    if dataset is None and held is None and any(
            s.fixed_shape(1) is None for s in original.inputs):
        dynamic_dim = DEFAULT_DYNAMIC_DIM  # no data: time at a stated length, judge nothing
    bench = BenchSettings(warmup=10, min_runs=100, min_seconds=seconds, max_seconds=max(20.0, seconds),
                          dynamic_dim=dynamic_dim)
    report = report_path(out)
    if mode == "auto":
        _auto(original, dataset, held, out=out, report=report, max_drop=max_drop, metric=metric,
              min_cosine=min_cosine, runtime=runtime, device=device, threads=threads, bench=bench, json_out=json_out,
              per_channel=per_channel, qat_epochs=DEFAULT_QAT_EPOCHS if qat_epochs is None else qat_epochs)
        return
    from edgeopt.transforms.quantize import quantize as run_quantize

    with console.status(f"quantizing ({mode})..."):
        result = run_quantize(original, cfg, data=dataset)
    payload = _measure_one(original, result, mode=mode, cfg=cfg, judge=held or dataset, threads=threads,
                           device=device, bench=bench)
    saved = result.save(out)
    payload["output"] = str(out)
    write_json(report, payload)
    _print_one(payload)
    console.print(f"wrote {out} ({fmt_bytes(saved.size_bytes)}) and {report}")
    emit_json(json_out, payload)


def _measure_one(original: Any, result: Any, *, mode: str, cfg: Any, judge: Any, threads: int | None,
                 device: str | None, bench: Any) -> dict[str, Any]:
    from edgeopt.measure.outcome import measure_outcome
    from edgeopt.transforms.config import config_to_dict

    payload: dict[str, Any] = {"mode": mode, "config": config_to_dict(cfg), "source": original.source}
    with console.status("judging and timing FP32 and the quantized model, interleaved..."):
        outcome = measure_outcome(original, result, data=judge, bench=bench, device=device, threads=threads,
                                  timing_data=judge, name=mode)
    fp32, quant = outcome.before, outcome.after
    payload["fp32"] = {"size_bytes": original.size_bytes, "latency_ms": fp32.latency_ms,
                       "runtime": fp32.runtime, "threads": fp32.threads}
    payload["quantized"] = {"size_bytes": result.size_bytes, "latency_ms": quant.latency_ms,
                            "runtime": quant.runtime, "threads": quant.threads,
                            "runtime_options": outcome.timed[1].options}
    payload["size_ratio"] = round(original.size_bytes / result.size_bytes, 3)
    payload["speedup"] = round(fp32.latency_ms["p50"] / quant.latency_ms["p50"], 3)  # of the two reported timings
    if judge is not None:
        payload["evaluation"] = outcome.evaluation_block()
    payload["notes"] = ["figures measured on this machine; latency batch 1, interleaved with the FP32 model"]
    if judge is None:
        payload["notes"].append("no --data: size and latency only; accuracy and fidelity were not measured "
                                "(pass --data to judge the result against the original)")
    if bench.dynamic_dim is not None:
        dims = {s.name: [d if isinstance(d, int) and d > 0 else (1 if i == 0 else bench.dynamic_dim)
                         for i, d in enumerate(s.shape)] for s in original.inputs}
        payload["timed_shapes"] = dims
        payload["notes"].append(f"no --data and dynamic input dimensions: timed on inputs of 1s with every dynamic "
                                f"non-batch dimension (e.g. the sequence length) set to {bench.dynamic_dim}: "
                                + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in dims.items()))
    return payload


def _print_one(p: dict[str, Any]) -> None:
    table = Table(title=f"edgeopt quantize --mode {p['mode']}: {p['source']}")
    for col in ("model", "runtime", "size", "p50 ms", "speed-up", "smaller", "accuracy", "agreement", "cosine"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    ev = p.get("evaluation") or {}
    table.add_row("fp32", p["fp32"]["runtime"], fmt_bytes(p["fp32"]["size_bytes"]),
                  f"{p['fp32']['latency_ms']['p50']:.3f}", "1.00x", "1.00x", fmt_pct(ev.get("fp32_accuracy")),
                  "-", "-")
    table.add_row(p["mode"], p["quantized"]["runtime"], fmt_bytes(p["quantized"]["size_bytes"]),
                  f"{p['quantized']['latency_ms']['p50']:.3f}", f"{p['speedup']:.2f}x", f"{p['size_ratio']:.2f}x",
                  fmt_pct(ev.get("accuracy")), fmt_pct(ev.get("agreement")),
                  "-" if ev.get("cosine") is None else f"{ev['cosine']:.5f}")
    console.print(table)
    for note in p.get("notes", [])[1:]:
        console.print(note, style="yellow")
    if ev.get("nn_agreement") is not None:
        console.print(f"pooled embeddings: mean cosine {ev['embedding_cosine']:.5f}, nearest-neighbour agreement "
                      f"{fmt_pct(ev['nn_agreement'])} (as expected {fmt_pct(ev.get('nn_expected_agreement'))}) "
                      f"over {ev['n']} samples")


def _auto(original: Any, dataset: Any, held: Any, *, out: Path, report: Path, max_drop: float, metric: str,
          min_cosine: float | None, runtime: str | None, device: str | None, threads: int | None, bench: Any,
          json_out: str | None, per_channel: bool | None = None, qat_epochs: int = 0) -> None:
    from edgeopt.errors import BudgetNotMet
    from edgeopt.fileio import write_json
    from edgeopt.search.auto_quantize import auto_quantize

    with console.status("building and measuring quantization variants..."):
        result = auto_quantize(original, dataset, eval_data=held, max_drop=max_drop, metric=metric,
                               min_cosine=min_cosine, device=device, threads=threads,
                               runtimes=(runtime,) if runtime else None, bench=bench, per_channel=per_channel,
                               qat_epochs=qat_epochs)
    payload = {"mode": "auto", "source": original.source, **result.to_dict(),
               "output": str(out) if result.model is not None else None}
    from edgeopt.devices import get_device
    from edgeopt.report.writer import measured_on_text
    from edgeopt.search.optimize import measured_on

    payload["measured_on"] = measured_on(get_device(device), result.baseline.runtime or "onnxruntime")
    payload["notes"].append(f"{measured_on_text(payload['measured_on'])}; latency batch 1, every variant "
                            "interleaved with FP32")
    table = Table(title=f"edgeopt quantize --mode auto: {original.source}")
    nn = any(r.nn_agreement is not None for r in result.results)
    cols = ("variant", "status", "runtime", "p50 ms", "speed-up", "size", "smaller", "accuracy", "agreement",
            "cosine", *(("NN agr.", "NN expected", "NN ties ok") if nn else ()), "drop pt", "why")
    for col in cols:
        table.add_column(col, justify="left" if col in ("variant", "status", "runtime", "why") else "right",
                         overflow="fold")
    styles = {"chosen": "bold green", "failed": "red", "baseline": "dim"}
    for r in [result.baseline, *result.results]:
        table.add_row(r.name, r.status, r.runtime or "-", f"{r.latency_ms['p50']:.3f}" if r.latency_ms else "-",
                      f"{r.speedup:.2f}x" if r.speedup else "-", fmt_bytes(r.size_bytes) if r.size_bytes else "-",
                      f"{r.size_ratio:.2f}x" if r.size_ratio else "-", fmt_pct(r.accuracy), fmt_pct(r.agreement),
                      fmt_cos(r.cosine),
                      *((fmt_pct(r.nn_agreement), fmt_pct(r.nn_expected_agreement), fmt_pct(r.nn_tie_agreement))
                        if nn else ()),
                      "-" if r.drop is None else f"{100 * r.drop:.2f}", r.reason, style=styles.get(r.status))
    console.print(table)
    if result.steps:
        _print_steps(result)
    if result.model is None or result.chosen is None:
        if out.exists():
            out.unlink()
        write_json(report, payload)
        emit_json(json_out, payload)
        raise BudgetNotMet(f"no quantized variant is faster than the FP32 model within a {100 * max_drop:.2f} pt "
                           f"{result.budget.metric} drop; no model written; see {report}")
    result.model.save(out)
    write_json(report, payload)
    c = result.chosen
    console.print(f"chosen: {c.name} on {c.runtime}: {c.speedup:.2f}x faster, {c.size_ratio:.2f}x smaller, "
                  f"{result.budget.metric} drop {100 * (c.drop or 0):.2f} pt, mean cosine {fmt_cos(c.cosine)}"
                  + (f", NN agreement {fmt_pct(c.nn_agreement)} (as expected {fmt_pct(c.nn_expected_agreement)})"
                     if c.nn_agreement is not None else ""),
                  style="bold")
    console.print(f"wrote {out} and {report}")
    emit_json(json_out, payload)


@app.command()
@user_errors
@image_folder_flags
def analyze(
    model: Annotated[str, typer.Argument(help="FP32 ONNX model.")],
    data: Annotated[str, typer.Option("--data", help="Calibration data; half of it judges unless --eval-data is given.")],
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out data to judge on.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="qdq or qoperator.")] = "qdq",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per channel or per tensor.")] = True,
    calibration: Annotated[str, typer.Option("--calibration", help="minmax, entropy or percentile.")] = "minmax",
    method: Annotated[str, typer.Option("--method", help="one-pass: every layer's INT8 output error (SQNR, cosine) "
                                        "from one run, minutes for 100+ layers; exhaustive: quantize each layer alone "
                                        "and judge the whole model (one quantize + evaluation per layer).")] = "one-pass",
    all_but: Annotated[bool, typer.Option("--all-but/--only", help="exhaustive: also quantize all but each layer (twice the time).")] = True,
    max_eval: Annotated[int, typer.Option("--max-eval", callback=opt.at_least_one, help="Judge on at most this many samples.")] = 256,
    threads: ThreadsOpt = None,
    top: Annotated[int, typer.Option("--top", callback=opt.at_least_one, help="Rows shown in the table (the JSON has all).")] = 20,
    json_out: JsonOpt = None,
) -> None:
    """Per-layer INT8 sensitivity: each layer quantized alone (and all but it), ranked by what it costs."""
    from edgeopt.errors import BadInput
    from edgeopt.model import load_model
    from edgeopt.transforms.quantize import StaticInt8
    from edgeopt.transforms.sensitivity import analyze as run_analyze

    if max_eval < 1:
        raise BadInput(f"--max-eval must be >= 1, got {max_eval}")
    if method not in ("one-pass", "exhaustive"):
        raise BadInput(f"--method must be one-pass or exhaustive, got {method!r}")
    cfg = StaticInt8(format=fmt, per_channel=per_channel, calibration=calibration)  # type: ignore[arg-type]
    loaded = load_model(model)
    dataset = load_data_arg(data)
    held = load_data_arg(eval_data) if eval_data else None
    if method == "one-pass":
        _analyze_one_pass(loaded, dataset, held, cfg=cfg, threads=resolve_threads(threads), max_eval=max_eval, top=top,
                          json_out=json_out)
        return
    with console.status("quantizing one layer at a time...") as status:
        rows = run_analyze(loaded, dataset, config=cfg, eval_data=held, threads=resolve_threads(threads), all_but=all_but,
                           max_eval=max_eval, on_layer=lambda n: status.update(f"analyzing {n}..."))
    labelled = (held or dataset).labels is not None
    table = Table(title=f"edgeopt analyze: {loaded.source} (most sensitive first)")
    for col in ("#", "node", "op", "params", "accuracy" if labelled else "-", "agreement", "cosine",
                "drop pt", "all-but cosine"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right", overflow="fold")
    for i, r in enumerate(rows[:top], 1):
        table.add_row(str(i), r.node, r.op_type, f"{r.params:,}", fmt_pct(r.accuracy), fmt_pct(r.agreement),
                      f"{r.cosine:.5f}", f"{100 * r.drop:.2f}",
                      "-" if r.all_but_cosine is None else f"{r.all_but_cosine:.5f}")
    console.print(table)
    console.print("drop: accuracy (labels) or agreement lost vs FP32 when only that layer is INT8; "
                  "all-but: every other layer INT8.")
    emit_json(json_out, [r.to_dict() for r in rows])


def _analyze_one_pass(loaded: Any, dataset: Any, held: Any, *, cfg: Any, threads: int, max_eval: int, top: int,
                      json_out: str | None) -> None:
    from edgeopt.transforms.layer_error import layer_errors
    from edgeopt.transforms.quantize import check_quantizable
    from edgeopt.transforms.sensitivity import split_for_analysis

    check_quantizable(loaded)
    dataset.feeds_for(loaded)
    calib, judged = split_for_analysis(dataset, held, max_eval=max_eval, seed=0)
    with console.status("measuring every layer's INT8 error in one pass..."):
        rows = layer_errors(loaded, calib, judged, config=cfg, threads=threads)
    table = Table(title=f"edgeopt analyze: {loaded.source} (one pass, worst first)")
    for col in ("#", "node", "op", "params", "SQNR dB", "cosine"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right", overflow="fold")
    for i, r in enumerate(rows[:top], 1):
        table.add_row(str(i), r.node, r.op_type, f"{r.params:,}", f"{r.sqnr_db:.1f}", f"{r.cosine:.5f}")
    console.print(table)
    console.print(f"each layer INT8 alone on its float input, {len(judged)} held-out samples, {len(rows)} layers: "
                  "SQNR of its output (higher is better); --method exhaustive judges the whole model per layer.")
    emit_json(json_out, [r.to_dict() for r in rows])


def _print_steps(result: Any) -> None:
    """The INT8 recovery steps as measured: what each tried, its fidelity, its latency when timed."""
    timed = {r.name: r for r in result.results if r.latency_ms}
    table = Table(title="INT8 recovery steps (each built and judged on the held-out data)")
    for col in ("step", "variant", "result", "agreement", "cosine", "drop pt (90%)", "p50 ms", "float layers"):
        table.add_column(col, justify="left" if col in ("step", "variant", "result", "float layers") else "right",
                         overflow="fold")
    for s in result.steps:
        agreement = s.get("accuracy") if s.get("accuracy") is not None else (
            s.get("confident_agreement") if s.get("confident_agreement") is not None else s.get("agreement"))
        interval = s.get("drop_interval")
        drop = "-" if s.get("drop") is None else f"{100 * s['drop']:.2f}" + (
            f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")
        r = timed.get(s.get("variant") or "")
        floats = s.get("float_layers") or []
        status = (s.get("status") or "-") + (f"; kept: {s['kept']}" if s.get("kept") else "")
        table.add_row(s["step"], s.get("variant") or "-", status, fmt_pct(agreement),
                      "-" if s.get("cosine") is None else f"{s['cosine']:.4f}", drop,
                      f"{r.latency_ms['p50']:.2f}" if r is not None else "-",
                      (f"{len(floats)}: " + ", ".join(floats[:3]) + (" ..." if len(floats) > 3 else "")) if floats
                      else "-")
    console.print(table)
