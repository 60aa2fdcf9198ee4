"""edgeopt distill / zoo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    SECONDS,
    DeviceOpt,
    JsonOpt,
    ThreadsOpt,
    TrustPickleOpt,
    check_onnx_output,
    check_threads,
    console,
    emit_json,
    err_console,
    fmt_bytes,
    fmt_pct,
    image_folder_flags,
    user_errors,
)


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@app.command()
@user_errors
def zoo(
    input_size: Annotated[str, typer.Option("--input-size", help="CxHxW the networks are built for.")] = "3x224x224",
    classes: Annotated[int, typer.Option("--classes", callback=opt.classes, help="Outputs of each network's head.")] = 1000,
    sort: Annotated[str, typer.Option("--sort", help="params, macs, latency or name.")] = "params",
    only: Annotated[str | None, typer.Option("--only", help="Comma-separated subset of architecture names.")] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip ONNX export and timing (fast).")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rebuild and re-time instead of using ~/.cache/edgeopt/zoo.")] = False,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """The edge-architecture catalogue for your input size and classes: params, MACs, batch-1 latency."""
    from edgeopt.data import parse_size
    from edgeopt.errors import BadInput
    from edgeopt.transforms.architectures import zoo as run_zoo

    if sort not in ("params", "macs", "latency", "name"):
        raise BadInput(f"--sort must be params, macs, latency or name, got {sort!r}")
    if sort == "latency" and no_latency:
        raise BadInput("--sort latency needs latency: drop --no-latency")
    check_threads(threads)
    size = parse_size(input_size)
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    with console.status("building the catalogue...") as status:
        entries = run_zoo(input_size=size, classes=classes, names=names, device=device, threads=threads,
                          latency=not no_latency, use_cache=not no_cache,
                          progress=lambda msg: status.update(msg))
    key = {"params": lambda e: e.params, "macs": lambda e: e.macs, "name": lambda e: e.name,
           "latency": lambda e: e.latency_ms["p50"] if e.latency_ms else float("inf")}[sort]
    entries.sort(key=key)
    table = Table(title=f"edgeopt zoo: {input_size}, {classes} classes" + ("" if no_latency else " (interleaved)"))
    for col in ("architecture", "params", "MACs", "ONNX size", "p50 ms", "runtime/thr", "cached"):
        table.add_column(col, justify="left" if col == "architecture" else "right")
    for e in entries:
        table.add_row(e.name, _fmt_count(e.params), _fmt_count(e.macs), fmt_bytes(e.onnx_bytes) if e.onnx_bytes else "-",
                      f"{e.latency_ms['p50']:.3f}" if e.latency_ms else "-",
                      f"{e.runtime}/{e.threads}" if e.runtime else "-", "yes" if e.cached else "")
    console.print(table)
    emit_json(json_out, [e.to_dict() for e in entries])


def _epochs_option(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    """``--epochs``: a count >= 1 or ``auto``, checked where click parses it (one line, exit 2)."""
    from edgeopt.errors import BadInput
    from edgeopt.search.distill_choice import parse_epochs

    if ctx.resilient_parsing or value is None:
        return value
    try:
        parse_epochs(value)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return value


@app.command()
@user_errors
@image_folder_flags
def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher: model.onnx, file.py:factory, or (text) a local Hugging Face folder.")],
    student: Annotated[str, typer.Option("--student", help="Catalogue name (see edgeopt zoo), file.py:factory, or 'half' for a BERT teacher.")],
    data: Annotated[str, typer.Option("--data", help="Training data: .npz (x, y) or, for transformers, .jsonl (text, label).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Student .onnx; a .pt state_dict and .report.json go beside it.")],
    epochs: Annotated[str, typer.Option("--epochs", callback=_epochs_option, help="Training epochs of each candidate, or 'auto': until the validation accuracy plateaus (--patience, default 5) within --time-budget.")] = "10",
    temperature: Annotated[float | None, typer.Option("--temperature", callback=opt.temperature, help="Softmax temperature of the soft targets (default: 1, 2 and 4 tried, chosen on the validation split).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", callback=opt.fraction, help="Weight of the soft (teacher) loss; 1 - alpha goes to labels (default: 0.3 and 0.7 tried).")] = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", callback=opt.positive, help="Minutes for all candidates together (default with --epochs auto: 30).")] = None,
    assistant: Annotated[str, typer.Option("--assistant", help="Vision: 'auto' (a catalogue network between teacher and a 10x smaller student, TAKD), 'none', or a catalogue name.")] = "auto",
    feature_loss: Annotated[bool, typer.Option("--feature-loss", help="Also match features (vision) or hidden states (text).")] = False,
    feature_weight: Annotated[float, typer.Option("--feature-weight", callback=opt.non_negative, help="Weight of the feature / hidden-state loss.")] = 1.0,
    patience: Annotated[int | None, typer.Option("--patience", callback=opt.at_least_one, help="Stop after P epochs without a better validation accuracy.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", callback=opt.open_fraction, help="Held-out fraction (< 0.5) that picks the epoch and the candidate; without --test-data as much again is held out for the figures.")] = 0.15,
    test_data: Annotated[str | None, typer.Option("--test-data", help="Data the report's accuracies use; it chooses nothing (default: another --val-fraction held out of --data).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", callback=opt.positive, help="Learning rate (default 2e-3 vision, 1e-4 text).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", callback=opt.at_least_one, help="Training batch size.")] = 64,
    warmup: Annotated[float | None, typer.Option("--warmup", callback=opt.warmup, help="Fraction of the steps with a linear learning-rate warm-up (text default 0.1).")] = None,
    augment_shift: Annotated[int, typer.Option("--augment-shift", callback=opt.count, help="Vision: shift images by up to N pixels each batch; the teacher sees the same view.")] = 0,
    seed: Annotated[int, typer.Option("--seed", callback=opt.seed, help="Seed for split, init and shuffling.")] = 0,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Skip the labels-only candidate (the student trained without the teacher).")] = False,
    max_len: Annotated[int, typer.Option("--max-len", callback=opt.max_len, help="Text: tokens per example.")] = 64,
    bench_seconds: Annotated[float, typer.Option("--seconds", "--bench-seconds", callback=opt.seconds, help="Minimum timed seconds per model (latency).")] = SECONDS,
    teacher_weights: Annotated[Path | None, typer.Option("--teacher-weights", help="state_dict for a file.py:factory teacher.")] = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Knowledge distillation: a small student learns from a teacher; ships the best of the distilled
    candidates and the same student trained on labels alone, chosen on the validation split."""
    from edgeopt.errors import BadInput
    from edgeopt.fileio import report_path, write_json
    from edgeopt.search.distill_choice import parse_epochs

    check_threads(threads)
    n_epochs = parse_epochs(epochs)
    if time_budget is not None and time_budget <= 0:
        raise BadInput(f"--time-budget must be > 0 minutes, got {time_budget:g}")
    budget_s = time_budget * 60 if time_budget is not None else None
    check_onnx_output(out)
    weights_path = out.with_suffix(".pt")
    report_file = report_path(out)
    if data.lower().endswith(".jsonl"):
        if assistant != "auto":
            raise BadInput("--assistant is for vision students; a text student is the teacher's every other layer")
        report = _distill_text(teacher, student, data, out, weights_path, epochs=n_epochs, temperature=temperature,
                               alpha=alpha, feature_weight=feature_weight if feature_loss else 0.0,
                               patience=patience, val_fraction=val_fraction, test_data=test_data, lr=lr,
                               batch_size=batch_size, seed=seed, baseline=not no_baseline, max_len=max_len,
                               warmup=warmup, augment_shift=augment_shift, time_budget=budget_s,
                               teacher_weights=teacher_weights, trust_pickle=trust_pickle, device=device,
                               threads=threads, bench_seconds=bench_seconds)
    else:
        report = _distill_vision(teacher, student, data, out, weights_path, epochs=n_epochs, temperature=temperature,
                                 alpha=alpha, feature_weight=feature_weight if feature_loss else 0.0,
                                 patience=patience, val_fraction=val_fraction, test_data=test_data, lr=lr,
                                 batch_size=batch_size, seed=seed, baseline=not no_baseline,
                                 warmup=warmup, augment_shift=augment_shift, time_budget=budget_s,
                                 assistant=assistant, teacher_weights=teacher_weights,
                                 trust_pickle=trust_pickle, device=device,
                                 threads=threads, bench_seconds=bench_seconds)
    report["outputs"] = {"onnx": str(out), "state_dict": str(weights_path), "report": str(report_file)}
    write_json(report_file, report)
    _print_report(report)
    err_console.print(f"wrote {out}, {weights_path}, {report_file}")
    emit_json(json_out, report)


def _distill_vision(teacher: str, student: str, data: str, out: Path, weights_path: Path, *, epochs: int | str,
                    temperature: float | None, alpha: float | None, feature_weight: float, patience: int | None,
                    val_fraction: float, test_data: str | None, lr: float | None, batch_size: int, seed: int,
                    baseline: bool, warmup: float | None, augment_shift: int, time_budget: float | None,
                    assistant: str, teacher_weights: Path | None,
                    trust_pickle: bool, device: str | None, threads: int | None, bench_seconds: float) -> dict:
    import torch

    from edgeopt.cli.common import load_data_arg
    from edgeopt.fileio import atomic_path
    from edgeopt.model import load_model
    from edgeopt.report.distill import distill
    from edgeopt.training import TrainSettings
    from edgeopt.transforms.distill import Distill

    train = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=patience, warmup=warmup)
    config = Distill(student=student, train=train, temperature=temperature, alpha=alpha,
                     feature_weight=feature_weight, val_fraction=val_fraction, augment_shift=augment_shift,
                     time_budget=time_budget, assistant=assistant)
    t_model = load_model(teacher, weights=teacher_weights, trust_pickle=trust_pickle)
    dataset = load_data_arg(data)
    test = load_data_arg(test_data) if test_data else None
    result = distill(t_model, dataset, config, test=test, baseline=baseline, device=device, threads=threads,
                     bench_seconds=bench_seconds)
    meta = {"distilled_from": t_model.source, "student": student}
    result.student_onnx.with_metadata(**meta).save(out)
    with atomic_path(weights_path) as tmp:
        torch.save(result.student.module.state_dict(), tmp)
    return result.report


def _distill_text(teacher: str, student: str, data: str, out: Path, weights_path: Path, *, epochs: int | str,
                  temperature: float | None, alpha: float | None, feature_weight: float, patience: int | None,
                  val_fraction: float, test_data: str | None, lr: float | None, batch_size: int, seed: int,
                  baseline: bool, max_len: int, warmup: float | None, augment_shift: int, time_budget: float | None,
                  teacher_weights: Path | None, trust_pickle: bool, device: str | None, threads: int | None,
                  bench_seconds: float) -> dict:
    import torch

    from edgeopt.errors import BadInput
    from edgeopt.fileio import atomic_path, write_json
    from edgeopt.report.distill import distill_text
    from edgeopt.text_data import load_jsonl
    from edgeopt.training import TrainSettings
    from edgeopt.transforms.distill_text import DistillText, load_text_teacher

    if augment_shift:
        raise BadInput("--augment-shift shifts images; it does not apply to text")
    if student not in ("half", "every-other"):
        raise BadInput(f"for a transformer teacher the student is built from it: use --student half, not {student!r}")
    module, vocab = load_text_teacher(teacher, weights=teacher_weights, trust_pickle=trust_pickle)
    train = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=patience, warmup=warmup)
    config = DistillText(train=train, temperature=temperature, alpha=alpha, hidden_weight=feature_weight,
                         val_fraction=val_fraction, max_len=max_len, time_budget=time_budget)
    texts = load_jsonl(data)
    test = load_jsonl(test_data) if test_data else None
    result = distill_text(module, texts, config, vocab=vocab, test=test, baseline=baseline, device=device,
                          threads=threads, bench_seconds=bench_seconds)
    result.student_onnx.with_metadata(distilled_from=teacher, student="half").save(out)
    with atomic_path(weights_path) as tmp:
        torch.save(result.student_module.state_dict(), tmp)
    vocab_path = out.with_suffix(".vocab.json")
    write_json(vocab_path, result.vocab.to_dict())
    result.report["vocab"] = str(vocab_path)
    return result.report


def _print_report(report: dict) -> None:
    t, s, b = report["teacher"], report["student"], report.get("baseline")
    candidates = report.get("candidates", [])
    if len(candidates) > 1:
        table = Table(title="candidates: chosen on validation, test chose nothing")
        for col in ("candidate", "val acc", "test acc", "best epoch"):
            table.add_column(col, justify="left" if col == "candidate" else "right")
        for c in candidates:
            mark = " (shipped)" if c["name"] == report["chosen"] else ""
            table.add_row(c["name"] + mark, fmt_pct(c["val_accuracy"]), fmt_pct(c["test_accuracy"]),
                          f"{c['best_epoch']}/{c['epochs_run']}")
        console.print(table)
    distilled = s.get("distilled", True)
    table = Table(title=f"edgeopt distill: {report['config']['student']} (latency interleaved, batch 1)")
    for col in ("", "params", "MACs", "ONNX size", "p50 ms", "accuracy"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("teacher", _fmt_count(t["params"]), _fmt_count(t.get("macs")), fmt_bytes(t["onnx_bytes"]),
                  f"{t['latency_ms']['p50']:.3f}", fmt_pct(t["accuracy"]))
    table.add_row("student (distilled)" if distilled else "student (labels only, shipped)", _fmt_count(s["params"]),
                  _fmt_count(s.get("macs")), fmt_bytes(s["onnx_bytes"]), f"{s['latency_ms']['p50']:.3f}",
                  fmt_pct(s["accuracy"]))
    if s.get("accuracy_before_training") is not None:
        table.add_row("student before training", "", "", "", "", fmt_pct(s["accuracy_before_training"]))
    if b is not None and distilled:
        table.add_row("student (no teacher)", "", "", "", "", fmt_pct(b["accuracy"]))
    elif not distilled and report.get("best_distilled_gain_pt") is not None:
        best = b["accuracy"] + report["best_distilled_gain_pt"] / 100
        table.add_row("student (best distilled)", "", "", "", "", fmt_pct(best))
    r = report["ratios"]
    table.add_row("teacher / student", f"{r['params']:.1f}x", f"{r['macs']:.1f}x" if r.get("macs") else "-",
                  f"{r['size']:.1f}x", f"{r['speedup_p50']:.2f}x", "")
    console.print(table)
    source = report.get("data", {}).get("test_source")
    if source:
        console.print(f"accuracy: {source}")
    for note in report.get("notes", []):
        err_console.print(f"[yellow]note:[/yellow] {note}")
